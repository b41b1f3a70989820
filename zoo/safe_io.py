"""Crash-safe files and folders, and tensor trees stored without pickle.

Everything zoo writes (checkpoints, meta-training state, results) goes through here:

* :func:`atomic_write_bytes` / :func:`atomic_write_text` write ``.NAME.tmp-PID-XXXX`` beside
  the destination, flush and ``fsync`` it, ``os.replace`` it over the destination and
  ``fsync`` the folder. A reader sees the old file or the new one, never a torn one.
* :func:`replace_dir` puts a fully written, fsynced staging folder in place of a folder.
  On Linux the two are swapped in one ``renameat2(RENAME_EXCHANGE)`` call, so the
  destination exists at every instant. Where that call is missing (other systems, some
  file systems) the old folder is first renamed to ``.NAME.old-PID-XXXX``; a process
  killed between the two renames leaves no ``NAME`` but that complete old folder, and
  :func:`recover` renames it back.
* :func:`recover` runs before every save and load: it restores a moved-aside folder whose
  destination is missing and deletes the temporaries of processes that no longer run.
* :func:`save_tree` / :func:`load_tree` store a nested structure of dicts, lists, numbers,
  strings and tensors as ``NAME.safetensors`` (the tensors) plus ``NAME.json`` (the rest),
  so optimizer and meta-training state need neither pickle nor ``torch.load``.

``OSError`` from the file system (a full disk, a read-only folder) is re-raised as the
caller's :class:`~zoo.errors.ZooError` subclass with the path and the reason; the
destination is untouched and the temporaries are removed.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .errors import CheckpointError, ZooError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "describe_os_error",
    "file_digest",
    "folder_digest",
    "load_tree",
    "recover",
    "replace_dir",
    "save_tree",
    "staging_dir",
]

logger = logging.getLogger(__name__)

# Writes go out in pieces of this size so that an interruption can fall between them
# (the fault tests kill the process at every piece boundary).
CHUNK = 1 << 20
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")
# renameat2(2) flag: swap the two paths atomically (Linux >= 3.15, glibc >= 2.28).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
TREE_FORMAT = "zoo.tree/1"

# Test hook: called with a label before every file-system step of a write, so the fault
# tests can kill the process or fail the call at each point. None in normal use.
fault_hook: Callable[[str], None] | None = None


def _point(label: str) -> None:
    if fault_hook is not None:
        fault_hook(label)


def _temp_name(destination: Path, what: str) -> Path:
    return destination.with_name(f".{destination.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_dir(path: Path) -> None:
    _point("fsync-dir")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_fd(path: Path, data: bytes) -> None:
    _point("open")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        for start in range(0, max(len(view), 1), CHUNK):
            _point("write")
            piece = view[start : start + CHUNK]
            while piece:
                written = os.write(fd, piece)
                piece = piece[written:]
        _point("fsync")
        os.fsync(fd)
    finally:
        os.close(fd)


def describe_os_error(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "the disk is full (no space left on device); free space and save again"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write there ({error.strerror}); choose another folder"
    return error.strerror or str(error)


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a *new* file ``path`` and fsync it (no rename; for staging folders)."""
    _write_fd(Path(path), data)


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes, *, error: type[ZooError] = CheckpointError
) -> Path:
    """Replace ``path`` with ``data`` atomically (temporary name, fsync, rename, fsync dir)."""
    path = Path(path)
    temp = _temp_name(path, "tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_fd(temp, data)
        _point("replace")
        os.replace(temp, path)
        _fsync_dir(path.parent)
    except OSError as failure:
        _remove(temp)
        raise error(f"could not write {path}: {describe_os_error(failure)}") from failure
    except BaseException:
        _remove(temp)
        raise
    return path


def atomic_write_text(
    path: str | os.PathLike, text: str, *, error: type[ZooError] = CheckpointError
) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), error=error)


def staging_dir(destination: Path) -> Path:
    """A new, empty ``.NAME.tmp-PID-XXXX`` folder beside ``destination``."""
    staging = _temp_name(destination, "tmp")
    _point("mkdir")
    staging.mkdir()
    return staging


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system cannot."""
    if os.environ.get("ZOO_NO_RENAME_EXCHANGE"):  # lets the tests run the fallback path
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_dir(staging: Path, directory: Path) -> None:
    """Put the complete folder ``staging`` at ``directory``; the old one survives any crash."""
    _fsync_dir(staging)
    _point("swap")
    if directory.exists() and _exchange(staging, directory):
        # ``staging`` now holds the old folder: a leftover temporary if we die here.
        _after_commit(directory, staging)
        return
    if directory.exists():
        old = _temp_name(directory, "old")
        os.rename(directory, old)
        try:
            _point("between-renames")  # the window: only ``old`` holds the last good folder
            os.rename(staging, directory)
        except BaseException:
            os.rename(old, directory)
            raise
        _after_commit(directory, old)
    else:
        os.rename(staging, directory)
        _after_commit(directory, None)


def _after_commit(directory: Path, old: Path | None) -> None:
    """Make the rename durable and drop the old folder. The new folder is in place, so a
    failure here is a warning, not an error: raising would report a completed save as
    failed (and the caller might retry over it)."""
    try:
        _fsync_dir(directory.parent)
        if old is not None:
            _point("remove-old")
            shutil.rmtree(old)
    except OSError as error:
        logger.warning("saved %s, but could not finish tidying up: %s", directory, error)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def recover(destination: str | os.PathLike) -> list[str]:
    """Repair what an interrupted save of ``destination`` left; returns what was done.

    A missing ``destination`` with a moved-aside ``.NAME.old-*`` folder gets that folder
    back (the newest if several). Temporaries of ``destination`` whose process is gone
    are deleted; those of running processes are left alone.
    """
    destination = Path(destination)
    parent = destination.parent
    actions: list[str] = []
    try:
        entries = list(parent.iterdir()) if parent.is_dir() else []
    except OSError:
        return actions
    leftovers = []
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match and match["name"] == destination.name:
            leftovers.append((entry, match["what"], int(match["pid"])))
    if not destination.exists():
        olds = [e for e, what, pid in leftovers if what == "old" and not _alive(pid)]
        if olds:
            newest = max(olds, key=lambda p: p.stat().st_mtime)
            os.rename(newest, destination)
            _fsync_dir(parent)
            actions.append(f"restored {destination.name} from {newest.name}")
            logger.warning("restored %s from an interrupted save (%s)", destination, newest.name)
    for entry, _what, pid in leftovers:
        if entry.exists() and not _alive(pid):
            _remove(entry)
            actions.append(f"removed {entry.name}")
            logger.info("removed stale temporary %s", entry)
    return actions


# ---------------------------------------------------------------------- digests


def file_digest(path: str | os.PathLike) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_digest(path: str | os.PathLike) -> str:
    """sha256 over the names and bytes of a folder's files (sorted): equal folders, equal digest."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------- tensor trees


def _encode(value, tensors: dict, where: str):
    if isinstance(value, torch.Tensor):
        key = where  # named by its path, so equal trees give equal bytes in any dict order
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            if {"__tensor__", "__int_keys__", "__float__"} & set(value):
                raise ValueError(f"{where}: reserved key in state")
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in value):
            return {
                "__int_keys__": {
                    str(k): _encode(v, tensors, f"{where}.{k}") for k, v in value.items()
                }
            }
        raise ValueError(f"{where}: dict keys must be all str or all int")
    if isinstance(value, list | tuple):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"{where}: cannot store a {type(value).__name__} without pickle")


def _decode(value, tensors: dict, used: set, where: str):
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            key = value["__tensor__"]
            if not isinstance(key, str) or key not in tensors:
                raise ValueError(f"{where} refers to a tensor {key!r} the file does not hold")
            used.add(key)
            return tensors[key]
        if set(value) == {"__float__"}:
            if value["__float__"] not in ("nan", "inf", "-inf"):
                raise ValueError(f"{where}: bad float {value['__float__']!r}")
            return float(value["__float__"])
        if set(value) == {"__int_keys__"}:
            inner = value["__int_keys__"]
            if not isinstance(inner, dict):
                raise ValueError(f"{where}: __int_keys__ must map to an object")
            try:
                return {int(k): _decode(v, tensors, used, f"{where}.{k}") for k, v in inner.items()}
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from error
        return {k: _decode(v, tensors, used, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors, used, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def tree_files(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.safetensors", directory / f"{name}.json"


def dump_tree(tree) -> tuple[bytes, bytes]:
    """``(safetensors bytes, json bytes)`` for a nested structure (see :func:`save_tree`)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors, "state")
    payload = save_safetensors_bytes(tensors, metadata={"format": TREE_FORMAT})
    text = json.dumps({"format": TREE_FORMAT, "tree": skeleton}, sort_keys=True, allow_nan=False)
    return payload, (text + "\n").encode("utf-8")


def parse_tree(payload: bytes, text: bytes, where: str, *, error=CheckpointError):
    """Inverse of :func:`dump_tree`; malformed input raises ``error`` naming ``where``."""
    try:
        document = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as failure:
        raise error(f"{where}: the JSON part is not valid JSON ({failure})") from failure
    if not isinstance(document, dict) or document.get("format") != TREE_FORMAT:
        raise error(f"{where}: not a zoo state file (expected format {TREE_FORMAT!r})")
    try:
        tensors = load_safetensors_bytes(payload)
    except (SafetensorError, ValueError, OSError, OverflowError, MemoryError) as failure:
        raise error(
            f"{where}: the tensor part is not a readable safetensors file ({failure})"
        ) from failure
    used: set = set()
    try:
        tree = _decode(document.get("tree"), tensors, used, "state")
    except (ValueError, RecursionError) as failure:
        raise error(f"{where}: {failure}") from failure
    if used != set(tensors):
        raise error(f"{where}: tensors {sorted(set(tensors) - used)[:5]} are not described")
    return tree


def save_tree(directory: Path, name: str, tree) -> None:
    """Write ``tree`` as ``NAME.safetensors`` + ``NAME.json`` inside (staging) ``directory``."""
    payload, text = dump_tree(tree)
    weights, config = tree_files(directory, name)
    write_file(weights, payload)
    write_file(config, text)


def load_tree(directory: Path, name: str, *, error=CheckpointError):
    """Read what :func:`save_tree` wrote; never unpickles anything."""
    weights, config = tree_files(directory, name)
    try:
        payload, text = weights.read_bytes(), config.read_bytes()
    except OSError as failure:
        raise error(f"cannot read {name} state in {directory}: {failure}") from failure
    return parse_tree(payload, text, str(config), error=error)
