"""One folder per optimizer: ``model.safetensors``, ``config.json``, ``README.md``.

``model.safetensors`` holds every update net's tensors under ``<kind>.<tensor>`` (for
instance ``conv.cells.0.weight_ih``); ``config.json`` (sorted keys) says what they are:
the update-net architecture, the feature set and its constants, the curvature mode, the
network and data it was meta-trained on, the horizon, the recipe and its results.
``README.md`` is the model card.

Writes are atomic (:mod:`zoo.safe_io`): the folder is assembled and fsynced under a
temporary name beside the destination and swapped into place, so a process killed at any
point of a save leaves the previous checkpoint loadable; the leftovers are repaired by the
next save or load. Loads are strict and never unpickle: ``schema_version`` must match,
every tensor the config implies must be present with the right shape and dtype, no other
tensor may be, and weights must be finite. Every failure is a ``CheckpointError``.

:func:`save_training_state` / :func:`load_training_state` do the same for a training run
in progress (model, optimizer state by parameter name, step, RNG), for bitwise resume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from . import __version__
from .errors import CheckpointError, ConfigError, NonFiniteError
from .features import FeatureSpec
from .layer_kinds import KINDS
from .optimizer import LearnedOptimizer
from .safe_io import (
    describe_os_error,
    dump_tree,
    parse_tree,
    recover,
    replace_dir,
    staging_dir,
    write_file,
)
from .update_net import UpdateNet

__all__ = [
    "SCHEMA_VERSION",
    "PretrainedOptimizer",
    "load_checkpoint",
    "load_training_state",
    "parse_checkpoint",
    "save_checkpoint",
    "save_training_state",
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
            model,
            nets,
            self.features,
            other=other,
            other_lr=other_lr,
            curvature_mode=expected,
            per_layer=self.per_layer,
        )

    @property
    def per_layer(self) -> bool:
        """Whether the nets are keyed by layer name (meta-trained on one network's layers)."""
        return self.config.get("per_layer", False) is True


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
        f"{kind}.{key}": value.detach().cpu().clone()  # clone: a shared net is under every kind
        for kind, net in sorted(nets.items())
        for key, value in net.state_dict().items()
    }
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise NonFiniteError(
            f"refusing to save {directory}: the update nets hold NaN or inf weights; "
            "the previous checkpoint there (if any) is kept"
        )
    # One metadata key only: safetensors writes a multi-key metadata map in a random order,
    # and equal nets must give equal bytes (digests, Hub pins). The version is in config.json.
    payload = save_safetensors_bytes(tensors, metadata={"format": "pt"})
    config_text = json.dumps(full, indent=2, sort_keys=True) + "\n"
    _write_folder(directory, {WEIGHTS: payload, CONFIG: config_text.encode(), CARD: card.encode()})
    logger.info("saved checkpoint %s", directory)
    return directory


def _write_folder(directory: Path, files: dict[str, bytes]) -> None:
    """Stage ``files`` beside ``directory``, fsync them and swap the folder in atomically.

    Leftovers of an earlier interrupted save are repaired first (see :func:`zoo.safe_io.recover`);
    a failure (disk full, no permission) removes the staging folder and leaves the old
    checkpoint as it was.
    """
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        recover(directory)
        staging = staging_dir(directory)
    except OSError as error:
        raise CheckpointError(f"cannot write {directory}: {describe_os_error(error)}") from error
    try:
        for name, data in files.items():
            write_file(staging / name, data)
        replace_dir(staging, directory)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"cannot write {directory}: {describe_os_error(error)}") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
    """Load and validate a checkpoint strictly: a folder, a shipped name or an ``hf://`` ref.

    Only safetensors and JSON are read, never pickle. Anything malformed (truncated bytes,
    a foreign header, a config that disagrees with the tensors, NaN weights) is a
    :class:`~zoo.errors.CheckpointError` that names the file and what is wrong.
    """
    if isinstance(ref, str) and ref.startswith("hf://"):
        from .hub import load as load_from_hub

        return load_from_hub(ref)  # pulls (or reuses the cache), verifies, loads strictly
    try:
        recover(Path(ref))  # a save killed mid-swap leaves the last good folder aside
    except OSError as error:
        logger.warning("could not repair leftovers of %s: %s", ref, error)
    directory = resolve(ref)
    config_path, weights_path = directory / CONFIG, directory / WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{directory} is not a zoo checkpoint: {path.name} is missing")
    try:
        config_bytes, payload = config_path.read_bytes(), weights_path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read {directory}: {describe_os_error(error)}") from error
    return parse_checkpoint(config_bytes, payload, directory)


def parse_checkpoint(
    config_bytes: bytes, payload: bytes, directory: Path | None = None
) -> PretrainedOptimizer:
    """Validate a checkpoint's ``config.json`` and ``model.safetensors`` bytes and build it."""
    where = Path(directory) if directory is not None else Path("<checkpoint>")
    config_path, weights_path = where / CONFIG, where / WEIGHTS
    try:
        config = json.loads(config_bytes.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    version = config.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise CheckpointError(
            f"{config_path}: schema_version {version!r} is not supported "
            f"(this zoo reads version {SCHEMA_VERSION}); upgrade zoo or re-export the checkpoint"
        )
    if payload.startswith(b"version https://git-lfs"):
        raise CheckpointError(
            f"{weights_path} is a Git-LFS pointer, not the weights; fetch the real file "
            "(git lfs pull, or `zoo pull` the checkpoint)"
        )
    try:
        tensors = load_safetensors_bytes(payload)
    except (SafetensorError, OSError, ValueError, OverflowError, MemoryError) as error:
        raise CheckpointError(
            f"{weights_path} is not a readable safetensors file ({error}); re-download it"
        ) from error
    features, hyper, kinds = _read_architecture(config, config_path)
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


# Update nets beyond this size are not what a zoo checkpoint describes; the bound stops a
# hostile config from making the loader allocate gigabytes before the shape check.
MAX_HIDDEN_SIZE = 4096
MAX_LAYERS = 16


def _read_architecture(config: dict, config_path: Path):
    try:
        features_config = config["features"]
        arch = config["update_net"]
        kinds = config["layer_kinds"]
        if not isinstance(features_config, dict) or not isinstance(arch, dict):
            raise TypeError("features and update_net must be JSON objects")
        features = FeatureSpec.from_config(features_config)
        hyper = {}
        for key in ("num_features", "hidden_size", "num_layers"):
            if type(arch[key]) is not int:
                raise TypeError(f"update_net.{key} must be an integer, got {arch[key]!r}")
            hyper[key] = arch[key]
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as error:
        raise CheckpointError(f"{config_path} is incomplete or invalid: {error}") from error
    if not (
        1 <= hyper["hidden_size"] <= MAX_HIDDEN_SIZE and 1 <= hyper["num_layers"] <= MAX_LAYERS
    ):
        raise CheckpointError(
            f"{config_path}: update_net hidden_size={hyper['hidden_size']}, "
            f"num_layers={hyper['num_layers']} are outside 1..{MAX_HIDDEN_SIZE}, 1..{MAX_LAYERS}"
        )
    if hyper["num_features"] != features.num_features:
        raise CheckpointError(
            f"{config_path}: update_net.num_features={hyper['num_features']} but feature set "
            f"{features.name!r} has {features.num_features} features"
        )
    # Per-layer checkpoints (config "per_layer": true) key their nets by layer name instead.
    per_layer = config.get("per_layer", False) is True
    if (
        not isinstance(kinds, list)
        or not kinds
        or not all(isinstance(k, str) and k and (per_layer or k in KINDS) for k in kinds)
        or len(set(kinds)) != len(kinds)
    ):
        allowed = "layer names" if per_layer else f"names from {list(KINDS)}"
        raise CheckpointError(
            f"{config_path}: layer_kinds {kinds!r} must be a non-empty list of distinct {allowed}"
        )
    return features, hyper, kinds


# ---------------------------------------------------------------------- training state

TRAINING_STATE = "training_state"
TRAINING_FORMAT = "zoo.training-state/1"


def save_training_state(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    extra: dict | None = None,
) -> Path:
    """Save what resuming a training run needs, atomically, as safetensors + JSON.

    The folder holds the model's ``state_dict`` (parameters and buffers, by name), the
    optimizer's (a :class:`~zoo.optimizer.LearnedOptimizer` keys its state by parameter
    name), the step count, torch's global RNG state and ``extra`` (JSON values and tensors).
    :func:`load_training_state` restores it, so 2N steps equal N + save + load + N bitwise.
    """
    directory = Path(directory)
    if type(step) is not int or step < 0:
        raise ConfigError(f"step must be an integer >= 0, got {step!r}")
    tree = {
        "format": TRAINING_FORMAT,
        "step": step,
        "model": dict(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "extra": extra or {},
    }
    try:
        payload, text = dump_tree(tree)
    except ValueError as error:
        raise CheckpointError(f"cannot save the training state: {error}") from error
    _write_folder(
        directory,
        {f"{TRAINING_STATE}.safetensors": payload, f"{TRAINING_STATE}.json": text},
    )
    logger.info("saved training state at step %d to %s", step, directory)
    return directory


def load_training_state(
    directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    """Restore :func:`save_training_state` into ``model`` and ``optimizer``.

    Returns ``{"step": int, "extra": dict}``. Parameters and buffers are matched by name,
    shape and dtype; any mismatch is a :class:`~zoo.errors.CheckpointError` naming them and
    leaves ``model`` and ``optimizer`` untouched.
    """
    directory = Path(directory)
    try:
        recover(directory)
    except OSError as error:
        logger.warning("could not repair leftovers of %s: %s", directory, error)
    weights = directory / f"{TRAINING_STATE}.safetensors"
    text = directory / f"{TRAINING_STATE}.json"
    if not weights.is_file() or not text.is_file():
        raise CheckpointError(f"{directory} holds no training state ({weights.name} missing)")
    try:
        tree = parse_tree(weights.read_bytes(), text.read_bytes(), str(text))
    except OSError as error:
        raise CheckpointError(f"cannot read {directory}: {describe_os_error(error)}") from error
    return restore_training_tree(tree, model, optimizer, str(directory))


def restore_training_tree(tree, model: nn.Module, optimizer, where: str) -> dict:
    """Validate a parsed training-state tree and load it into ``model`` and ``optimizer``."""
    if not isinstance(tree, dict) or tree.get("format") != TRAINING_FORMAT:
        raise CheckpointError(f"{where}: not a zoo training state ({TRAINING_FORMAT!r})")
    step, saved, rng = tree.get("step"), tree.get("model"), tree.get("rng")
    if type(step) is not int or step < 0 or not isinstance(saved, dict):
        raise CheckpointError(f"{where}: training state lacks a valid step or model state")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: model state does not match this model: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}"
        )
    wrong = [
        name
        for name, value in own.items()
        if not isinstance(saved[name], torch.Tensor)
        or saved[name].shape != value.shape
        or saved[name].dtype != value.dtype
    ]
    if wrong:
        raise CheckpointError(f"{where}: model state has the wrong shape or dtype for: {wrong}")
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.dim() != 1:
        raise CheckpointError(f"{where}: the RNG state is missing or malformed")
    backup = {k: v.clone() for k, v in own.items()}
    model.load_state_dict(saved)
    try:
        optimizer.load_state_dict(tree.get("optimizer"))
    except (CheckpointError, ConfigError):
        model.load_state_dict(backup)
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
        model.load_state_dict(backup)
        raise CheckpointError(f"{where}: the optimizer state does not fit: {error}") from error
    try:
        torch.set_rng_state(rng)
    except RuntimeError as error:
        raise CheckpointError(f"{where}: the RNG state is malformed: {error}") from error
    extra = tree.get("extra")
    return {"step": step, "extra": extra if isinstance(extra, dict) else {}}
