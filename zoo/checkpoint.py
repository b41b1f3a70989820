"""One folder per optimizer: ``model.safetensors``, ``config.json``, ``README.md``.

``model.safetensors`` holds every update net's tensors under ``<kind>.<tensor>`` (for
instance ``conv.cells.0.weight_ih``); ``config.json`` (sorted keys) says what they are:
the update-net architecture, the feature set and its constants, the curvature mode, the
network and data it was meta-trained on, the horizon, the recipe and its results.
``README.md`` is the model card.

Writes are atomic: the folder is assembled under a temporary name beside the destination
and renamed into place, so an interrupted save leaves any previous checkpoint intact.
Loads are strict: every tensor the config implies must be present with the right shape
and dtype, and no other tensor may be.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import CheckpointError, ConfigError
from .features import FeatureSpec
from .layer_kinds import KINDS
from .optimizer import LearnedOptimizer
from .update_net import UpdateNet

__all__ = [
    "SCHEMA_VERSION",
    "PretrainedOptimizer",
    "load_checkpoint",
    "save_checkpoint",
    "shipped_checkpoints",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"


@dataclass
class PretrainedOptimizer:
    """A loaded checkpoint: update nets per layer kind plus their config.

    ``attach(model)`` returns a :class:`~zoo.optimizer.LearnedOptimizer` for ``model``.
    """

    nets: dict[str, UpdateNet]
    features: FeatureSpec
    config: dict = field(default_factory=dict)
    path: Path | None = None
    source: str | None = None  # where it came from, e.g. "hf://owner/name@<sha>"

    @property
    def name(self) -> str:
        return self.config.get("name", "unnamed")

    @property
    def curvature_mode(self) -> str | None:
        return (
            self.config.get("curvature", {}).get("mode") if self.features.uses_curvature else None
        )

    def attach(
        self,
        model: nn.Module,
        *,
        other: str = "adam",
        other_lr: float = 1e-3,
        curvature_mode: str | None = None,
    ) -> LearnedOptimizer:
        """A fresh optimizer for ``model`` using copies of these update nets.

        ``curvature_mode``: the mode you will train with, if you want it checked now; a
        mode other than :attr:`curvature_mode` warns here, and the optimizer warns at the
        first step whose second derivatives came from another mode either way.
        """
        expected = self.curvature_mode
        if curvature_mode is not None and expected is not None and curvature_mode != expected:
            warnings.warn(
                f"checkpoint {self.name!r} was meta-trained with curvature mode {expected!r}, "
                f"not {curvature_mode!r}; its update nets will see second derivatives of "
                "another distribution",
                UserWarning,
                stacklevel=2,
            )
        nets = {kind: _copy_net(net) for kind, net in self.nets.items()}
        return LearnedOptimizer(
            model, nets, self.features, other=other, other_lr=other_lr, curvature_mode=expected
        )


def _copy_net(net: UpdateNet) -> UpdateNet:
    clone = UpdateNet(**net.hyperparameters())
    clone.load_state_dict(net.state_dict())
    return clone


# ---------------------------------------------------------------------- saving


def save_checkpoint(
    directory: str | os.PathLike,
    nets: dict[str, UpdateNet],
    features: FeatureSpec,
    config: dict,
    card: str,
    *,
    overwrite: bool = True,
) -> Path:
    """Write a checkpoint folder atomically; returns its path.

    ``config`` carries the provenance (recipe, data, metrics); the architecture, features
    and schema entries are filled in here from the nets themselves.
    """
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise CheckpointError(f"{directory} exists; pass overwrite=True or choose another folder")
    parent = directory.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot create {parent}: {error}") from error
    full = dict(config)
    first = next(iter(nets.values()))
    full.update(
        schema_version=SCHEMA_VERSION,
        zoo_version=__version__,
        layer_kinds=sorted(nets),
        update_net={"architecture": "coordinate-lstm", **first.hyperparameters()},
        features=features.to_config(),
    )
    tensors = {
        f"{kind}.{key}": value.detach().cpu().contiguous()
        for kind, net in sorted(nets.items())
        for key, value in net.state_dict().items()
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=parent))
    try:
        save_file(tensors, staging / WEIGHTS, metadata={"format": "pt", "zoo": __version__})
        _write_text(staging / CONFIG, json.dumps(full, indent=2, sort_keys=True) + "\n")
        _write_text(staging / CARD, card)
        _fsync_dir(staging)
        _replace_dir(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s", directory)
    return directory


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(staging: Path, directory: Path) -> None:
    """Move ``staging`` to ``directory``, keeping the old folder until the new one is in."""
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(directory, old)
        try:
            os.rename(staging, directory)
        except BaseException:
            os.rename(old, directory)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, directory)
    _fsync_dir(directory.parent)


# ---------------------------------------------------------------------- loading


def shipped_checkpoints() -> dict[str, Path]:
    """Checkpoints bundled in the repository's ``checkpoints/`` folder, by name."""
    if not SHIPPED_DIR.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(SHIPPED_DIR.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (p / CONFIG).is_file()
    }


def resolve(ref: str | os.PathLike) -> Path:
    """A checkpoint reference → its folder: a shipped name, a local folder, or
    ``hf://owner/name[@revision]`` (downloaded, pinned to a commit; see :mod:`zoo.hub`)."""
    if isinstance(ref, str) and ref.startswith("hf://"):
        from .hub import pull

        return pull(ref).path
    path = Path(ref)
    if path.is_dir():
        return path
    shipped = shipped_checkpoints()
    if str(ref) in shipped:
        return shipped[str(ref)]
    if str(ref) == "small" and shipped:
        # `zoo transfer --src small`: the default optimizer meta-trained on `small`.
        return shipped[DEFAULT_SMALL] if DEFAULT_SMALL in shipped else next(iter(shipped.values()))
    known = ", ".join(sorted(shipped)) or "none shipped"
    raise CheckpointError(
        f"no checkpoint {str(ref)!r}: not a folder, not a shipped name (shipped: {known}) "
        "and not a Hub reference (hf://owner/name[@revision])"
    )


DEFAULT_SMALL = "lstm2-gh-mnist-small"


def load_checkpoint(ref: str | os.PathLike) -> PretrainedOptimizer:
    """Load and validate a checkpoint strictly: a folder, a shipped name or an ``hf://`` ref."""
    if isinstance(ref, str) and ref.startswith("hf://"):
        from .hub import load as load_from_hub

        return load_from_hub(ref)  # pulls (or reuses the cache), verifies, loads strictly
    directory = resolve(ref)
    config_path, weights_path = directory / CONFIG, directory / WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{directory} is not a zoo checkpoint: {path.name} is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    if config.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{config_path}: schema_version {config.get('schema_version')!r} is not supported "
            f"(this zoo reads version {SCHEMA_VERSION}); upgrade zoo or re-export the checkpoint"
        )
    head = weights_path.read_bytes()[:200]
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(
            f"{weights_path} is a Git-LFS pointer, not the weights; fetch the real file "
            "(git lfs pull, or `zoo pull` the checkpoint)"
        )
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{weights_path} is not a readable safetensors file ({error}); re-download it"
        ) from error
    try:
        features = FeatureSpec.from_config(config["features"])
        arch = config["update_net"]
        kinds = config["layer_kinds"]
        hyper = {k: int(arch[k]) for k in ("num_features", "hidden_size", "num_layers")}
    except (KeyError, TypeError, ValueError, ConfigError) as error:
        raise CheckpointError(f"{config_path} is incomplete or invalid: {error}") from error
    if hyper["num_features"] != features.num_features:
        raise CheckpointError(
            f"{config_path}: update_net.num_features={hyper['num_features']} but feature set "
            f"{features.name!r} has {features.num_features} features"
        )
    unknown_kinds = [k for k in kinds if k not in KINDS]
    if unknown_kinds or not kinds:
        raise CheckpointError(f"{config_path}: layer_kinds {kinds} must be a subset of {KINDS}")
    nets, expected = {}, set()
    for kind in kinds:
        net = UpdateNet(**hyper)
        own = net.state_dict()
        for key, value in own.items():
            name = f"{kind}.{key}"
            expected.add(name)
            if name not in tensors:
                raise CheckpointError(
                    f"{weights_path} lacks tensor {name!r} that the config implies"
                )
            if tensors[name].shape != value.shape or tensors[name].dtype != value.dtype:
                raise CheckpointError(
                    f"{weights_path}: tensor {name!r} is {tuple(tensors[name].shape)} "
                    f"{tensors[name].dtype}, the config implies {tuple(value.shape)} {value.dtype}"
                )
            own[key] = tensors[name]
        if not all(bool(torch.isfinite(t).all()) for t in own.values()):
            raise CheckpointError(f"{weights_path}: the {kind} net holds NaN or inf weights")
        net.load_state_dict(own)
        nets[kind] = net
    extra = sorted(set(tensors) - expected)
    if extra:
        raise CheckpointError(
            f"{weights_path} holds tensors the config does not describe: {', '.join(extra[:5])}"
        )
    return PretrainedOptimizer(nets, features, config, directory)
