"""Pull, publish and list pretrained optimizers on the Hugging Face Hub, pinned to commits.

A Hub reference reads ``hf://owner/name[@revision]``; the revision is a branch, a tag or a
commit sha and defaults to ``main``. A branch or tag is resolved to its commit sha once, and
every file is then fetched from that one commit, so a checkpoint can never mix weights of
one commit with the config of another.

    >>> result = pull("hf://someone/lstm2-mnist")        # doctest: +SKIP
    >>> result.pinned                                     # paste this to pin what you use
    'hf://someone/lstm2-mnist@5c0f...'

Downloads go through ``huggingface_hub`` (``snapshot_download``) into its cache (or a
``local_dir``). After a download the files are checked against the commit's tree (git blob
ids, which for Git-LFS files cover the content's sha256) and then loaded strictly, so a
damaged cached file is reported, never silently reused; ``force=True`` fetches it again.

Environment. ``HF_ENDPOINT``, ``HF_HUB_CACHE``/``HF_HOME``, ``HF_HUB_OFFLINE`` and
``HF_TOKEN`` are read at call time (``huggingface_hub`` reads most of them once, at import),
and the endpoint and cache are passed to the client explicitly, so a process that sets them
after importing the client (a notebook, a test) talks to the Hub it names.

Publishing (:func:`publish`) validates the folder, checks the token, creates the repo if
needed and uploads weights, config and model card in one commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .checkpoint import CARD, CONFIG, WEIGHTS, PretrainedOptimizer, load_checkpoint
from .errors import CheckpointError, ConfigError, HubError

__all__ = [
    "HUB_PREFIX",
    "LIBRARY_NAME",
    "ZOO_TAG",
    "CachedCheckpoint",
    "HubListing",
    "HubRef",
    "PublishResult",
    "PullResult",
    "cached_checkpoints",
    "card_metadata",
    "is_hub_ref",
    "list_hub",
    "load",
    "publish",
    "pull",
]

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf://"
LIBRARY_NAME = "zoo"
ZOO_TAG = "learned-optimizer"  # the tag `zoo list --hub` searches for
DEFAULT_REVISION = "main"
LOCK_VERSION = 1
_SHA = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The text of a Git-LFS pointer (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md).
_LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n"


# ---------------------------------------------------------------------- references


@dataclass(frozen=True)
class HubRef:
    """``hf://owner/name[@revision]`` parsed; ``revision`` is None for the default branch."""

    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, ref: str | os.PathLike) -> HubRef:
        text = str(ref)
        if not text.startswith(HUB_PREFIX):
            raise ConfigError(f"{text!r} is not a Hub reference; write hf://owner/name[@revision]")
        body = text[len(HUB_PREFIX) :]
        repo_id, _, revision = body.partition("@")
        if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
            raise ConfigError(
                f"{text!r}: {repo_id!r} is not a Hub repo id; write hf://owner/name[@revision]"
            )
        if "@" in body and not revision:
            raise ConfigError(
                f"{text!r}: empty revision after '@'; write hf://owner/name[@revision]"
            )
        return cls(repo_id, revision or None)

    @property
    def is_pinned(self) -> bool:
        """Whether the revision is a full commit sha (immutable)."""
        return self.revision is not None and bool(_SHA.match(self.revision))

    def at(self, revision: str) -> HubRef:
        return HubRef(self.repo_id, revision)

    def __str__(self) -> str:
        suffix = f"@{self.revision}" if self.revision else ""
        return f"{HUB_PREFIX}{self.repo_id}{suffix}"


def is_hub_ref(ref: object) -> bool:
    return isinstance(ref, str) and ref.startswith(HUB_PREFIX)


# ---------------------------------------------------------------------- settings


@dataclass(frozen=True)
class _Settings:
    endpoint: str
    cache_dir: Path
    offline: bool


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _settings(offline: bool | None = None) -> _Settings:
    from huggingface_hub import constants

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    if os.environ.get("HF_HUB_CACHE"):
        cache = Path(os.environ["HF_HUB_CACHE"])
    elif os.environ.get("HF_HOME"):
        cache = Path(os.environ["HF_HOME"]) / "hub"
    else:
        cache = Path(constants.HF_HUB_CACHE)
    if offline is None:
        offline = _truthy(os.environ.get("HF_HUB_OFFLINE")) or constants.HF_HUB_OFFLINE
    return _Settings(endpoint, cache.expanduser(), bool(offline))


def _api(settings: _Settings, token: str | None = None):
    from huggingface_hub import HfApi

    return HfApi(
        endpoint=settings.endpoint,
        token=token,
        library_name=LIBRARY_NAME,
        library_version=__version__,
    )


def _storage_folder(settings: _Settings, repo_id: str) -> Path:
    # The cache layout huggingface_hub documents: <cache>/models--owner--name/{refs,snapshots}.
    return settings.cache_dir / ("models--" + repo_id.replace("/", "--"))


def _cached_ref(settings: _Settings, repo_id: str, revision: str) -> str | None:
    path = _storage_folder(settings, repo_id) / "refs" / revision
    try:
        sha = path.read_text().strip()
    except OSError:
        return None
    return sha if _SHA.match(sha) else None


def _write_cached_ref(settings: _Settings, repo_id: str, revision: str, sha: str) -> None:
    """Record ``revision -> sha`` in the cache's ``refs/`` so offline runs can resolve it."""
    path = _storage_folder(settings, repo_id) / "refs" / revision
    if _cached_ref(settings, repo_id, revision) == sha:
        return
    _atomic_write(path, sha)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- errors


def _network_errors() -> tuple[type[BaseException], ...]:
    try:
        import httpx2 as httpx
    except ImportError:  # huggingface_hub 1.x is built on httpx
        import httpx
    return (httpx.TransportError,)


@contextmanager
def _hub_errors(settings: _Settings, what: str, repo_id: str, api=None) -> Iterator[None]:
    """Turn the client's exceptions into :class:`HubError` naming the cause and the fix."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        LocalTokenNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except RevisionNotFoundError as error:
        known = _known_revisions(api, repo_id) if api is not None else ""
        raise HubError(
            f"{what}: {repo_id} on {settings.endpoint} has no such revision{known}; "
            "name an existing branch, tag or full commit sha after '@'"
        ) from error
    except GatedRepoError as error:
        raise HubError(
            f"{what}: {repo_id} is gated; accept its terms on {settings.endpoint}/{repo_id} "
            "and set HF_TOKEN to a token of that account"
        ) from error
    except RepositoryNotFoundError as error:
        raise HubError(
            f"{what}: no model repo {repo_id} on {settings.endpoint} (or it is private and the "
            "token cannot see it); check the name, or set HF_TOKEN to a token with access"
        ) from error
    except RemoteEntryNotFoundError as error:
        raise HubError(
            f"{what}: {repo_id} lacks a file zoo needs ({error}); it is not a zoo checkpoint"
        ) from error
    except IncompleteSnapshotError as error:
        raise HubError(
            f"{what}: the cached copy of {repo_id} is incomplete and the Hub cannot be used "
            "(offline); run `zoo pull` for it once with network"
        ) from error
    except LocalEntryNotFoundError as error:
        if settings.offline:
            raise HubError(
                f"{what}: {repo_id} is not in the cache ({settings.cache_dir}) and offline mode is "
                "on (HF_HUB_OFFLINE=1 or --offline); pull it once with network, or point "
                "HF_HUB_CACHE at a cache that has it"
            ) from error
        raise HubError(
            f"{what}: cannot reach {settings.endpoint} and {repo_id} is not in the cache "
            f"({settings.cache_dir}); check the network or HF_ENDPOINT"
        ) from error
    except LocalTokenNotFoundError as error:
        raise HubError(f"{what}: {_NO_TOKEN}") from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise HubError(
                f"{what}: {settings.endpoint} rejected the token (401); create a token at "
                f"{settings.endpoint}/settings/tokens and set HF_TOKEN"
            ) from error
        if status == 403:
            raise HubError(
                f"{what}: the token may not write to {repo_id} (403: {_server_message(error)}); "
                "use a token with write access to that namespace"
            ) from error
        raise HubError(f"{what}: {settings.endpoint} answered {status}: {error}") from error
    except _network_errors() as error:
        raise HubError(
            f"{what}: cannot reach {settings.endpoint} ({type(error).__name__}: {error}); check "
            "the network or HF_ENDPOINT, or work offline from the cache (HF_HUB_OFFLINE=1)"
        ) from error


_NO_TOKEN = (
    "no Hugging Face token found; create a write token at https://huggingface.co/settings/tokens "
    "(or your HF_ENDPOINT's) and set HF_TOKEN, or run `hf auth login`"
)


def _server_message(error) -> str:
    try:
        return error.response.headers.get("X-Error-Message") or error.response.json()["error"]
    except Exception:  # noqa: BLE001 - best effort: the status line is still reported
        return str(error).splitlines()[0]


def _known_revisions(api, repo_id: str) -> str:
    try:
        refs = api.list_repo_refs(repo_id)
    except Exception:  # noqa: BLE001 - the listing only decorates the message
        return ""
    names = [r.name for r in refs.branches] + [r.name for r in refs.tags]
    return f" (branches and tags: {', '.join(names)})" if names else ""


# ---------------------------------------------------------------------- pull


@dataclass
class PullResult:
    """What :func:`pull` fetched.

    ``moved_from`` is set when the requested branch or tag now points at a different commit
    than the one recorded before (in the lock file, or by the previous pull into this cache).
    """

    ref: HubRef
    sha: str | None
    path: Path
    optimizer: PretrainedOptimizer
    offline: bool = False
    moved_from: str | None = None
    remote_sha: str | None = None
    locked: bool = False

    @property
    def pinned(self) -> str:
        """The reference to paste to get exactly these bytes again."""
        return str(self.ref.at(self.sha)) if self.sha else str(self.ref)


def pull(
    ref: str | HubRef,
    *,
    revision: str | None = None,
    force: bool = False,
    local_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    lock: str | os.PathLike | None = None,
    update_lock: bool = False,
) -> PullResult:
    """Download a checkpoint from the Hub, pinned to one commit, and verify it loads strictly.

    Args:
        ref: ``hf://owner/name[@revision]``.
        revision: a branch, tag or sha; overrides none in ``ref`` (they must agree).
        force: fetch every file again even if the cache has it (repairs a damaged cache).
        local_dir: download into this folder instead of the Hugging Face cache.
        offline: use only the cache (default: ``HF_HUB_OFFLINE``); no network call is made.
        lock: a JSON lock file; a branch or tag found there is pulled at its locked commit,
            and one not yet there is recorded. The result says when the remote has moved.
        update_lock: move the lock's entry to the commit the remote points at now.

    Raises:
        HubError: the repo, revision, network or cache cannot provide the checkpoint.
        CheckpointError: the files arrived but are not a valid zoo checkpoint (the message
            says whether the cached copy is damaged or the published checkpoint is broken).
    """
    hub_ref = ref if isinstance(ref, HubRef) else HubRef.parse(ref)
    if revision is not None:
        if hub_ref.revision is not None and hub_ref.revision != revision:
            raise ConfigError(
                f"{hub_ref} already names revision {hub_ref.revision!r} but --revision is "
                f"{revision!r}; give one of them"
            )
        hub_ref = hub_ref.at(revision)
    settings = _settings(offline)
    requested = hub_ref.revision or DEFAULT_REVISION
    floating = not hub_ref.is_pinned
    lock_path = Path(lock) if lock is not None else None
    locked_sha = _read_lock(lock_path).get(_lock_key(hub_ref)) if lock_path and floating else None
    what = f"pull {hub_ref}"
    api = _api(settings)
    previous = _cached_ref(settings, hub_ref.repo_id, requested) if floating else None

    remote_sha = None
    if settings.offline:
        sha = requested if not floating else (locked_sha or previous)
    else:
        if floating:
            with _hub_errors(settings, what, hub_ref.repo_id, api):
                remote_sha = api.model_info(hub_ref.repo_id, revision=requested).sha
            if not remote_sha:
                raise HubError(f"{what}: {settings.endpoint} did not say which commit it serves")
        sha = locked_sha if locked_sha and not update_lock else (remote_sha or requested)
    logger.info("%s: revision %s -> commit %s", what, requested, sha)

    path = _download(settings, api, hub_ref, sha or requested, force, local_dir, what)
    if sha is None and local_dir is None and _SHA.match(Path(path).name):
        sha = Path(path).name  # offline, resolved by the client from the cache's refs/
    if floating and sha and not settings.offline and (locked_sha is None or update_lock):
        _write_cached_ref(settings, hub_ref.repo_id, requested, sha)

    optimizer = _verify(settings, hub_ref, sha, Path(path), local_dir)
    optimizer.source = str(hub_ref.at(sha)) if sha else str(hub_ref)

    baseline = locked_sha or previous
    moved_from = None
    if floating and remote_sha and baseline and remote_sha != baseline:
        moved_from = baseline
        logger.warning(
            "%s: %s has moved on from %s to %s", what, requested, baseline[:12], remote_sha[:12]
        )
    if lock_path is not None and sha and (locked_sha is None or update_lock):
        _write_lock(lock_path, hub_ref, sha)
    return PullResult(
        ref=hub_ref,
        sha=sha,
        path=Path(path),
        optimizer=optimizer,
        offline=settings.offline,
        moved_from=moved_from,
        remote_sha=remote_sha,
        locked=bool(locked_sha) and not update_lock,
    )


def load(ref: str | HubRef, **kwargs) -> PretrainedOptimizer:
    """``pull(ref, **kwargs).optimizer``: what ``zoo.load("hf://...")`` calls."""
    return pull(ref, **kwargs).optimizer


def _download(settings, api, hub_ref, revision, force, local_dir, what) -> str:
    from huggingface_hub import snapshot_download

    with _hub_errors(settings, what, hub_ref.repo_id, api):
        return snapshot_download(
            hub_ref.repo_id,
            revision=revision,
            cache_dir=settings.cache_dir,
            local_dir=local_dir,
            endpoint=settings.endpoint,
            force_download=force,
            local_files_only=settings.offline,
            library_name=LIBRARY_NAME,
            library_version=__version__,
        )


def _verify(settings, hub_ref, sha, path: Path, local_dir) -> PretrainedOptimizer:
    """Files must match the commit's tree, then load strictly; else say which fix applies."""
    source = str(hub_ref.at(sha)) if sha else str(hub_ref)
    checked = _check_against_tree(settings, hub_ref.repo_id, sha, path, local_dir)
    for name in (CONFIG, WEIGHTS):
        damaged = checked.get(name)
        if damaged:
            raise CheckpointError(
                f"{path / name} does not match {source} ({damaged}): the downloaded copy is "
                f"damaged; fetch it again with `zoo pull {hub_ref} --force`"
            )
    try:
        return load_checkpoint(path)
    except CheckpointError as error:
        if checked:
            fix = (
                "the files are exactly what that commit holds, so the published checkpoint "
                "itself is broken: pin an earlier revision, or ask its owner to re-publish "
                "with `zoo publish` (which validates before uploading)"
            )
        else:
            fix = (
                f"if the download was damaged, fetch it again with `zoo pull {hub_ref} --force`; "
                "otherwise the published checkpoint itself is broken"
            )
        raise CheckpointError(f"{source}: {error}; {fix}") from error


def _check_against_tree(settings, repo_id, sha, path: Path, local_dir) -> dict[str, str]:
    """Compare local files with the commit's tree; ``{}`` if the tree is unknown.

    Returns ``{filename: problem}`` for every checked file, with ``""`` when it matches. The
    tree's ``oid`` is the git blob id of the file, or for a Git-LFS file of its pointer, which
    embeds the content's sha256, so both kinds are checked from the content alone.
    """
    if sha is None:
        return {}
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        tree = get_cached_repo_tree(
            repo_id, revision=sha, cache_dir=settings.cache_dir, local_dir=local_dir
        )
    except CachedRepoTreeNotFoundError:
        logger.info("no cached tree listing for %s@%s; skipping the hash check", repo_id, sha)
        return {}
    result = {}
    for entry in tree:
        if entry.path not in (CONFIG, WEIGHTS, CARD):
            continue
        local = path / entry.path
        if not local.is_file():
            result[entry.path] = "missing"
            continue
        data = local.read_bytes()
        pointer = _LFS_POINTER.format(sha=hashlib.sha256(data).hexdigest(), size=len(data))
        if entry.blob_id in (_git_blob_id(data), _git_blob_id(pointer.encode())):
            result[entry.path] = ""
        else:
            result[entry.path] = f"{len(data)} bytes, expected {entry.size}, content hash differs"
    return result


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ---------------------------------------------------------------------- lock file


def _lock_key(hub_ref: HubRef) -> str:
    return str(hub_ref.at(hub_ref.revision or DEFAULT_REVISION))


def _read_lock(path: Path | None) -> dict[str, str]:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {key: entry["sha"] for key, entry in data["pins"].items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"lock file {path} is not a zoo lock ({error}); delete it to start a new one"
        ) from error


def _write_lock(path: Path, hub_ref: HubRef, sha: str) -> None:
    data = {"version": LOCK_VERSION, "pins": {}}
    if path.exists():
        _read_lock(path)  # validates
        data = json.loads(path.read_text(encoding="utf-8"))
    data["pins"][_lock_key(hub_ref)] = {
        "repo": hub_ref.repo_id,
        "revision": hub_ref.revision or DEFAULT_REVISION,
        "sha": sha,
        "pinned": str(hub_ref.at(sha)),
    }
    _atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    logger.info("locked %s at %s in %s", _lock_key(hub_ref), sha, path)


# ---------------------------------------------------------------------- model card


def card_metadata(config: dict) -> dict:
    """The Hub metadata a zoo checkpoint's card must carry, derived from its config."""
    source = config.get("source_network") or {}
    kinds = list(config.get("layer_kinds") or [])
    tags = [ZOO_TAG, LIBRARY_NAME, "pytorch", *(f"layer-kind-{k}" for k in kinds)]
    feature_set = (config.get("features") or {}).get("set")
    if feature_set:
        tags.append(f"features-{feature_set}")
    meta: dict = {"library_name": LIBRARY_NAME, "tags": tags}
    if source.get("dataset"):
        meta["datasets"] = [source["dataset"]]
    zoo_block = {
        "source_network": source.get("name"),
        "layer_kinds": kinds,
        "features": feature_set,
        "curvature": (config.get("curvature") or {}).get("mode"),
        "horizon": (config.get("training") or {}).get("horizon"),
        "recipe": config.get("recipe"),
        "metrics": config.get("metrics"),
    }
    meta["zoo"] = {k: v for k, v in zoo_block.items() if v is not None}
    return meta


def _final_card(directory: Path, config: dict) -> str:
    """The folder's card with the required metadata merged in; errors on contradictions."""
    from huggingface_hub import ModelCard, ModelCardData

    card_path = directory / CARD
    if not card_path.is_file():
        raise CheckpointError(
            f"{directory} has no model card ({CARD}); write one (zoo meta-train does) before "
            "publishing"
        )
    try:
        card = ModelCard(card_path.read_text(encoding="utf-8"), ignore_metadata_errors=False)
        existing = card.data.to_dict()
    except Exception as error:  # the client raises ValueError or yaml errors
        raise CheckpointError(
            f"{card_path}: the metadata block (between the leading '---' lines) is not valid "
            f"YAML ({error}); fix or remove it"
        ) from error
    required = card_metadata(config)
    library = existing.get("library_name")
    if library not in (None, LIBRARY_NAME):
        raise CheckpointError(
            f"{card_path}: library_name is {library!r}; a zoo checkpoint must say "
            f"library_name: {LIBRARY_NAME}"
        )
    kinds = set(config.get("layer_kinds") or [])
    tags = [str(t) for t in existing.get("tags") or []]
    stray = [
        t for t in tags if t.startswith("layer-kind-") and t[len("layer-kind-") :] not in kinds
    ]
    if stray:
        raise CheckpointError(
            f"{card_path}: tags {stray} name layer kinds the checkpoint does not have "
            f"(config.json: {sorted(kinds)}); fix the card's tags"
        )
    merged = dict(existing)
    merged["library_name"] = LIBRARY_NAME
    merged["tags"] = list(dict.fromkeys(required["tags"] + tags))
    if "datasets" in required:
        merged["datasets"] = list(
            dict.fromkeys(required["datasets"] + list(existing.get("datasets") or []))
        )
    merged["zoo"] = required["zoo"]  # config.json is the source of truth for the numbers
    card.data = ModelCardData(**merged)
    return str(card)


# ---------------------------------------------------------------------- publish


@dataclass
class PublishResult:
    """What :func:`publish` did (or, with ``dry_run``, would do)."""

    repo_id: str
    branch: str
    files: dict[str, int]
    card: str
    dry_run: bool = False
    sha: str | None = None
    commit_url: str | None = None
    created_repo: bool = False
    user: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def pinned(self) -> str | None:
        return str(HubRef(self.repo_id, self.sha)) if self.sha else None


def publish(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    message: str | None = None,
) -> PublishResult:
    """Validate a checkpoint folder and upload it to ``repo_id`` in one commit.

    Steps: load the folder strictly and build the card (with the Hub metadata zoo needs) →
    check the token (present, accepted, allowed to write to the namespace) → create the repo
    if it does not exist (``private`` applies then) and the branch if it does not exist →
    one commit with ``model.safetensors``, ``config.json`` and ``README.md``.

    With ``dry_run`` nothing is created or uploaded; the token is checked if one is found.
    """
    directory = Path(directory)
    if not _REPO_ID.match(repo_id):
        raise ConfigError(f"--repo {repo_id!r} is not a Hub repo id; write owner/name")
    branch = branch or DEFAULT_REVISION
    try:
        optimizer = load_checkpoint(directory)
    except CheckpointError as error:
        raise CheckpointError(f"cannot publish {directory}: {error}") from error
    card = _final_card(directory, optimizer.config)
    files = {
        WEIGHTS: (directory / WEIGHTS).stat().st_size,
        CONFIG: (directory / CONFIG).stat().st_size,
        CARD: len(card.encode()),
    }
    result = PublishResult(repo_id, branch, files, card, dry_run=dry_run)
    settings = _settings()
    what = f"publish {directory} to {repo_id}"
    if settings.offline:
        if dry_run:
            result.notes.append("offline mode is on: the token was not checked")
            return result
        raise HubError(f"{what}: offline mode is on (HF_HUB_OFFLINE=1); unset it to publish")
    api = _api(settings, token)

    from huggingface_hub import get_token

    token = token or get_token()
    if token is None:
        if dry_run:
            result.notes.append(f"no token found: a real publish would stop here ({_NO_TOKEN})")
            return result
        raise HubError(f"{what}: {_NO_TOKEN}")
    result.user = _check_token(api, settings, token, repo_id, what)
    if dry_run:
        result.notes.append("dry run: nothing was created or uploaded")
        return result

    from huggingface_hub import CommitOperationAdd

    with _hub_errors(settings, what, repo_id, api):
        result.created_repo = not api.repo_exists(repo_id, token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        if branch != DEFAULT_REVISION:
            api.create_branch(repo_id, branch=branch, exist_ok=True, token=token)
        operations = [
            CommitOperationAdd(path_in_repo=WEIGHTS, path_or_fileobj=str(directory / WEIGHTS)),
            CommitOperationAdd(path_in_repo=CONFIG, path_or_fileobj=str(directory / CONFIG)),
            CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode()),
        ]
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=message or f"Publish {optimizer.name} with zoo {__version__}",
            revision=branch,
            token=token,
        )
    if not result.created_repo and private:
        result.notes.append("the repo already existed: --private only applies to new repos")
    result.sha, result.commit_url = info.oid, info.commit_url
    logger.info("published %s to %s@%s", directory, repo_id, info.oid)
    return result


def _check_token(api, settings, token: str, repo_id: str, what: str) -> str:
    with _hub_errors(settings, what, repo_id, api):
        me = api.whoami(token=token)
    name = me.get("name")
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubError(
            f"{what}: the token of {name} is read-only; create a token with write access at "
            f"{settings.endpoint}/settings/tokens and set HF_TOKEN"
        )
    namespace = repo_id.split("/")[0]
    orgs = [o.get("name") for o in me.get("orgs") or []]
    if namespace not in [name, *orgs]:
        raise HubError(
            f"{what}: the token belongs to {name!r}, who cannot write to namespace "
            f"{namespace!r} (member of: {', '.join(orgs) or 'no organisations'}); publish under "
            f"{name}/... or use a token of that namespace"
        )
    return name


# ---------------------------------------------------------------------- listing


@dataclass(frozen=True)
class CachedCheckpoint:
    """A zoo checkpoint found in the Hugging Face cache."""

    repo_id: str
    sha: str
    refs: tuple[str, ...]
    path: Path
    name: str

    @property
    def pinned(self) -> str:
        return str(HubRef(self.repo_id, self.sha))


def cached_checkpoints() -> list[CachedCheckpoint]:
    """Every cached model snapshot that holds a zoo config (no network)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    settings = _settings()
    try:
        info = scan_cache_dir(settings.cache_dir)
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.commit_hash):
            config_path = Path(revision.snapshot_path) / CONFIG
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(config, dict) or "update_net" not in config:
                continue
            found.append(
                CachedCheckpoint(
                    repo.repo_id,
                    revision.commit_hash,
                    tuple(sorted(revision.refs)),
                    Path(revision.snapshot_path),
                    str(config.get("name", repo.repo_id)),
                )
            )
    return found


@dataclass(frozen=True)
class HubListing:
    """A model on the Hub tagged for zoo."""

    repo_id: str
    sha: str | None
    tags: tuple[str, ...]
    zoo: dict

    @property
    def ref(self) -> str:
        return str(HubRef(self.repo_id))


def list_hub(*, search: str | None = None, limit: int = 100) -> list[HubListing]:
    """Models on the Hub with ``library_name: zoo`` and the ``learned-optimizer`` tag."""
    settings = _settings()
    if settings.offline:
        raise HubError("list --hub: offline mode is on (HF_HUB_OFFLINE=1); unset it to search")
    api = _api(settings)
    with _hub_errors(settings, "list --hub", "(search)", api):
        models = list(
            api.list_models(
                filter=[LIBRARY_NAME, ZOO_TAG], search=search, limit=limit, cardData=True
            )
        )
    out = []
    for model in models:
        card = model.card_data.to_dict() if model.card_data is not None else {}
        out.append(HubListing(model.id, model.sha, tuple(model.tags or ()), card.get("zoo") or {}))
    return out
