"""Resumable meta-training: the whole loop state, saved atomically, without pickle.

:func:`zoo.meta.meta_train` with ``state_dir`` and ``save_every=K`` calls :func:`save`
after every K-th meta-iteration; ``resume=True`` calls :func:`load` instead of starting
afresh. The state is everything the next iteration reads:

* the update nets and the best-validated copy, the meta-optimizer (Adam) state,
* the task generator's and torch's global RNG states,
* the task in progress: how it was drawn (width, init scale, seed), its step, its
  parameters, per-coordinate feature and LSTM states, and the gradient and second
  derivative at its current parameters,
* counters and the meta-loss / validation history.

It is stored as ``meta_state.safetensors`` + ``meta_state.json`` in one folder that is
replaced atomically (:mod:`zoo.safe_io`), so a run killed at any moment resumes from the
last completed save, and a run of 2N iterations equals N + save + resume + N bitwise
(same recipe and seed, CPU).

:func:`locate_non_finite` says where a meta-training run that went NaN/inf started: the
layer kind (net), the input feature and the parameter.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import _write_folder
from .errors import CheckpointError, ConfigError, NonFiniteError
from .features import FEATURE_SETS, FeatureState
from .safe_io import describe_os_error, dump_tree, parse_tree, recover

__all__ = [
    "META_STATE_FORMAT",
    "NonFiniteWatch",
    "exists",
    "finite_gradients",
    "load",
    "locate_non_finite",
    "save",
]

logger = logging.getLogger(__name__)

META_STATE_FORMAT = "zoo.meta-state/1"
NAME = "meta_state"
SESSIONS = "sessions.json"  # time and command of each session (not part of the state)
# Recipe entries a resumed run may change: how long to run, and how often to validate.
RESUMABLE_CHANGES = {("meta", "iterations")}


def exists(directory: str | os.PathLike | None) -> bool:
    return directory is not None and (Path(directory) / f"{NAME}.json").is_file()


def _copied(net) -> dict:
    return {name: value.detach().clone() for name, value in net.state_dict().items()}


def save(directory: str | os.PathLike, *, iteration: int, recipe, loop: dict) -> Path:
    """Write the loop state after ``iteration`` to ``directory`` (atomically).

    ``loop`` holds the loop's variables by name: ``nets``, ``best``, ``meta_opt``, ``rng``,
    ``run``, ``runs``, ``skipped``, ``consecutive_bad``, ``history``, ``validation``,
    ``best_score``, ``best_iteration``, ``started``, ``elapsed_before``, ``commands``.
    Refuses (``NonFiniteError``) to save NaN weights, so the folder always holds the last
    good state.
    """
    directory = Path(directory)
    nets, run = loop["nets"], loop["run"]
    for key, net in nets.items():
        if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
            raise NonFiniteError(
                f"refusing to save meta-training state: the {key} net holds NaN/inf; "
                f"the last good state in {directory} is kept"
            )
    last = run.last
    tree = {
        "format": META_STATE_FORMAT,
        "iteration": iteration,
        "recipe": recipe.to_dict(),
        # Copies: a shared net (recipe update_net.shared) sits under every kind, and
        # safetensors refuses tensors that share memory.
        "nets": {k: _copied(net) for k, net in nets.items()},
        "best": {k: _copied(net) for k, net in loop["best"].items()},
        "meta_opt": loop["meta_opt"].state_dict(),
        "rng": loop["rng"].get_state(),
        "torch_rng": torch.get_rng_state(),
        "runs": loop["runs"],
        "skipped": loop["skipped"],
        "consecutive_bad": loop["consecutive_bad"],
        "history": [list(h) for h in loop["history"]],
        "validation": [list(v) for v in loop["validation"]],
        "best_score": float(loop["best_score"]),
        "best_iteration": loop["best_iteration"],
        "run": {
            "origin": list(run.origin),
            "step": run.step,
            "params": {n: p.detach() for n, p in run.trainee.params.items()},
            "features": {k: list(state) for k, state in run.features.items()},
            "lstm": {k: s.detach() for k, s in run.lstm.items()},
            "loss": last.loss.detach(),
            "grads": dict(last.grads),
            "hessian_diag": dict(last.hessian_diag),
            "mode": last.mode,
            "estimated": list(last.estimated),
        },
    }
    payload, text = dump_tree(tree)
    # Time and commands of every session so far (for the card of a resumed run), kept
    # apart from the state so that the state stays byte-identical, resumed or not.
    sessions = {
        "elapsed_seconds": float(loop["elapsed_before"] + time.perf_counter() - loop["started"]),
        "commands": list(loop["commands"]),
    }
    _write_folder(
        directory,
        {
            f"{NAME}.safetensors": payload,
            f"{NAME}.json": text,
            SESSIONS: (json.dumps(sessions, indent=2) + "\n").encode(),
        },
    )
    logger.info("saved meta-training state at iteration %d to %s", iteration, directory)
    return directory


def load(
    directory: str | os.PathLike,
    recipe,
    nets: dict,
    meta_opt: torch.optim.Optimizer,
    rng: torch.Generator,
    rebuild_run: Callable[[float, float, int], object],
) -> dict:
    """Restore :func:`save` into ``nets``, ``meta_opt``, ``rng`` and torch's RNG.

    ``rebuild_run(width, init_scale, seed)`` makes a fresh task like the loop's own; its
    parameters and states are then overwritten with the saved ones. Returns the loop's
    other variables by name, plus ``start`` (the first iteration still to run). A state
    from another recipe (beyond ``meta.iterations``) is a ``ConfigError`` naming the
    entries; a malformed one a ``CheckpointError``.
    """
    directory = Path(directory)
    try:
        recover(directory)
    except OSError as error:
        logger.warning("could not repair leftovers of %s: %s", directory, error)
    if not exists(directory):
        raise CheckpointError(
            f"no meta-training state to resume in {directory} ({NAME}.json is missing); "
            "run without --resume to start afresh"
        )
    try:
        payload = (directory / f"{NAME}.safetensors").read_bytes()
        text = (directory / f"{NAME}.json").read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read {directory}: {describe_os_error(error)}") from error
    tree = parse_tree(payload, text, str(directory / f"{NAME}.json"))
    loop = restore(tree, recipe, nets, meta_opt, rng, rebuild_run, str(directory))
    return {**loop, **read_sessions(directory)}


def read_sessions(directory: str | os.PathLike) -> dict:
    """``{"elapsed": seconds, "commands": [...]}`` of the sessions saved in ``directory``.

    Provenance only: a missing (older state) or malformed file gives zero and no commands,
    with a warning, and never stops a resume.
    """
    path = Path(directory) / SESSIONS
    try:
        sessions = json.loads(path.read_text(encoding="utf-8"))
        elapsed, commands = sessions["elapsed_seconds"], sessions["commands"]
        if not (
            isinstance(elapsed, int | float)
            and math.isfinite(elapsed)
            and elapsed >= 0
            and isinstance(commands, list)
            and all(isinstance(c, str) for c in commands)
        ):
            raise ValueError("unexpected values")
    except FileNotFoundError:
        return {"elapsed": 0.0, "commands": []}
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring %s (%s): earlier sessions' time and commands unknown", path, error)
        return {"elapsed": 0.0, "commands": []}
    return {"elapsed": float(elapsed), "commands": commands}


def _require(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise CheckpointError(f"{where}: meta-training state is malformed: {what}")


def _recipe_changes(saved: dict, current: dict, prefix=()) -> list[str]:
    changes = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        path = (*prefix, key)
        if key not in saved and _plain(b) in (False, [], ()):
            continue  # an option added by a later zoo, left off (e.g. update_net.shared)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _recipe_changes(a, b, path)
        elif _plain(a) != _plain(b) and path not in RESUMABLE_CHANGES:
            changes.append(".".join(path))
    return changes


def _plain(value):
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _load_net_states(target: dict, saved, where: str, what: str) -> None:
    _require(isinstance(saved, dict) and set(saved) == set(target), where, f"{what} keys")
    for key, net in target.items():
        own = net.state_dict()
        entry = saved[key]
        _require(isinstance(entry, dict) and set(entry) == set(own), where, f"{what}.{key}")
        for name, value in own.items():
            t = entry[name]
            _require(
                isinstance(t, Tensor) and t.shape == value.shape and t.dtype == value.dtype,
                where,
                f"{what}.{key}.{name} shape/dtype",
            )
    for key, net in target.items():
        net.load_state_dict(saved[key])


def restore(tree, recipe, nets, meta_opt, rng, rebuild_run, where: str) -> dict:
    """Validate a parsed state tree and load it (see :func:`load`)."""
    _require(isinstance(tree, dict) and tree.get("format") == META_STATE_FORMAT, where, "format")
    saved_recipe = tree.get("recipe")
    _require(isinstance(saved_recipe, dict), where, "recipe")
    changes = _recipe_changes(saved_recipe, recipe.to_dict())
    if changes:
        raise ConfigError(
            f"{where} was saved by another recipe (differs in {', '.join(changes)}); only "
            "meta.iterations may change on resume"
        )
    iteration = tree.get("iteration")
    _require(type(iteration) is int and iteration >= 0, where, "iteration")
    if iteration > recipe.meta.iterations:
        raise ConfigError(
            f"{where} is at iteration {iteration}, past meta.iterations = "
            f"{recipe.meta.iterations}; raise --iterations to continue"
        )
    counters = {k: tree.get(k) for k in ("runs", "skipped", "consecutive_bad", "best_iteration")}
    _require(all(type(v) is int and v >= 0 for v in counters.values()), where, "counters")
    best_score = tree.get("best_score")
    _require(isinstance(best_score, int | float), where, "best_score")
    history, validation = tree.get("history"), tree.get("validation")
    for name, rows in (("history", history), ("validation", validation)):
        _require(
            isinstance(rows, list)
            and all(
                isinstance(r, list)
                and len(r) == 2
                and type(r[0]) is int
                and isinstance(r[1], int | float)
                for r in rows
            ),
            where,
            name,
        )
    run_tree = tree.get("run")
    _require(isinstance(run_tree, dict), where, "run")
    origin = run_tree.get("origin")
    _require(
        isinstance(origin, list)
        and len(origin) == 3
        and all(isinstance(v, int | float) for v in origin)
        and type(origin[2]) is int
        and origin[0] > 0
        and origin[1] > 0,
        where,
        "run.origin",
    )
    for key in ("rng", "torch_rng"):
        t = tree.get(key)
        _require(isinstance(t, Tensor) and t.dtype == torch.uint8 and t.dim() == 1, where, key)
    import copy

    best = copy.deepcopy(nets)
    backup_nets = {
        k: {n: v.clone() for n, v in net.state_dict().items()} for k, net in nets.items()
    }
    backup_opt = meta_opt.state_dict()
    try:
        _load_net_states(nets, tree.get("nets"), where, "nets")
        _load_net_states(best, tree.get("best"), where, "best")
        try:
            meta_opt.load_state_dict(tree.get("meta_opt"))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise CheckpointError(
                f"{where}: the meta-optimizer state does not fit: {error}"
            ) from error
        run = rebuild_run(float(origin[0]), float(origin[1]), int(origin[2]))
        _restore_run(run, run_tree, where)
        try:
            rng.set_state(tree["rng"])
            torch.set_rng_state(tree["torch_rng"])
        except RuntimeError as error:
            raise CheckpointError(f"{where}: an RNG state is malformed: {error}") from error
    except BaseException:
        for key, net in nets.items():
            net.load_state_dict(backup_nets[key])
        meta_opt.load_state_dict(backup_opt)
        raise
    logger.info("resumed meta-training from %s after iteration %d", where, iteration)
    return {
        **counters,
        "start": iteration + 1,
        "best": best,
        "best_score": float(best_score),
        "history": [(r[0], float(r[1])) for r in history],
        "validation": [(r[0], float(r[1])) for r in validation],
        "run": run,
    }


def _restore_run(run, saved: dict, where: str) -> None:
    from .curvature import CurvatureResult

    trainee = run.trainee
    step = saved.get("step")
    _require(type(step) is int and step >= 0, where, "run.step")
    params, grads, hess = saved.get("params"), saved.get("grads"), saved.get("hessian_diag")
    for name, table in (("params", params), ("grads", grads), ("hessian_diag", hess)):
        _require(
            isinstance(table, dict) and set(table) == set(trainee.params), where, f"run.{name}"
        )
        for key, own in trainee.params.items():
            t = table[key]
            _require(
                isinstance(t, Tensor) and t.shape == own.shape and t.dtype == own.dtype,
                where,
                f"run.{name}.{key}",
            )
    features, lstm = saved.get("features"), saved.get("lstm")
    _require(isinstance(features, dict) and set(features) == set(run.features), where, "features")
    _require(isinstance(lstm, dict) and set(lstm) == set(run.lstm), where, "run.lstm")
    for key, state in run.features.items():
        entry = features[key]
        _require(
            isinstance(entry, list)
            and len(entry) == len(FeatureState._fields)
            and all(
                isinstance(t, Tensor) and t.shape == s.shape and t.dtype == s.dtype
                for t, s in zip(entry, state, strict=False)
            ),
            where,
            f"run.features.{key}",
        )
        own = run.lstm[key]
        t = lstm[key]
        _require(
            isinstance(t, Tensor) and t.shape == own.shape and t.dtype == own.dtype,
            where,
            f"run.lstm.{key}",
        )
    loss = saved.get("loss")
    _require(isinstance(loss, Tensor) and loss.dim() == 0, where, "run.loss")
    mode, estimated = saved.get("mode"), saved.get("estimated")
    _require(isinstance(mode, str) and isinstance(estimated, list), where, "run.mode")
    trainee.params = {n: params[n] for n in trainee.params}
    run.features = {k: FeatureState(*features[k]) for k in run.features}
    run.lstm = {k: lstm[k] for k in run.lstm}
    run.step = step
    run.last = CurvatureResult(
        loss=loss,
        output=torch.empty(0),
        grads={n: grads[n] for n in trainee.params},
        hessian_diag={n: hess[n] for n in trainee.params},
        mode=mode,
        estimated=tuple(str(e) for e in estimated),
    )


# ---------------------------------------------------------------------- non-finite guards


def finite_gradients(weights: list[Tensor]) -> bool:
    """Whether every meta-gradient is finite (checked before clipping: clipping a NaN
    gradient norm spreads NaN to every weight)."""
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in weights)


# Which recorded input each feature is computed from, in the order a fault propagates.
_FEATURE_SOURCES = {
    "g_rms": ("grad", "v"),
    "m_fast": ("m_fast",),
    "m_slow": ("m_slow",),
    "h_rel": ("hess", "h_avg"),
    "h_trend": ("hess", "h_avg"),
}


class NonFiniteWatch:
    """Checks every unroll step and remembers where the first NaN/inf appeared.

    ``check(run, nets)`` after each step costs one ``isfinite`` per tensor; the first time
    the loss, the gradient or the second derivative is non-finite it records
    :func:`locate_non_finite`, so the message names the start, not the aftermath.
    """

    def __init__(self, feature_set: str):
        self.feature_set = feature_set
        self.where: str | None = None

    def check(self, run, nets: dict) -> None:
        if self.where is not None:
            return
        last = run.last
        tables = (last.grads, last.hessian_diag)
        if bool(torch.isfinite(last.loss.detach()).all()) and all(
            bool(torch.isfinite(t).all()) for table in tables for t in table.values()
        ):
            return
        self.where = locate_non_finite(run, nets, self.feature_set)

    def describe(self, run, nets: dict) -> str:
        return self.where or locate_non_finite(run, nets, self.feature_set)


def locate_non_finite(run, nets: dict, feature_set: str) -> str:
    """Where a non-finite meta-training run started, as a sentence for the error message.

    With finite task parameters the fault came in with the inputs: the first gradient or
    second derivative holding NaN/inf names the layer kind, the feature it feeds and the
    parameter. With non-finite parameters it came from an update: the running feature
    statistics, the nets' weights and meta-gradients, then the LSTM state are searched.
    """
    names = FEATURE_SETS.get(feature_set, ())
    last = run.last
    layouts = run.trainee.layouts
    params_finite = all(bool(torch.isfinite(p).all()) for p in run.trainee.params.values())
    for source in ("grad", "hess") if params_finite else ():
        table = last.grads if source == "grad" else last.hessian_diag
        for key, layout in layouts.items():
            for name in layout.names:
                value = table.get(name)
                if value is not None and not bool(torch.isfinite(value).all()):
                    feature = next(
                        (f for f in names if source in _FEATURE_SOURCES[f]),
                        "g_rms" if source == "grad" else "h_rel",
                    )
                    what = "gradient" if source == "grad" else "second derivative"
                    return (
                        f"it started in the {key} net's input feature {feature}: the {what} "
                        f"of {name} holds NaN/inf at task step {run.step}"
                    )
    for key, state in run.features.items():
        for field, value in zip(FeatureState._fields, state, strict=True):
            if not bool(torch.isfinite(value).all()):
                coordinate = int((~torch.isfinite(value)).nonzero()[0])
                name = _parameter_of(layouts[key], coordinate)
                feature = next((f for f in names if field in _FEATURE_SOURCES[f]), field)
                return (
                    f"it started in the {key} net's input feature {feature} (running "
                    f"statistic {field} of {name} is NaN/inf at task step {run.step})"
                )
    for key, net in nets.items():
        for pname, p in net.named_parameters():
            if not bool(torch.isfinite(p).all()):
                return f"it started in the {key} net itself: its weight {pname} is NaN/inf"
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return f"it started in the {key} net's meta-gradient (of {pname})"
    for key, state in run.lstm.items():
        if not bool(torch.isfinite(state).all()):
            return f"it started in the {key} net's LSTM state at task step {run.step}"
    for key, layout in layouts.items():
        for name in layout.names:
            if not bool(torch.isfinite(run.trainee.params[name]).all()):
                return f"it started in the {key} net's updates of {name} at task step {run.step}"
    loss = float(last.loss.detach()) if last is not None else math.nan
    return f"no single input is non-finite; the training loss itself is {loss} (overflow)"


def _parameter_of(layout, coordinate: int) -> str:
    start = 0
    for name, size in zip(layout.names, layout.sizes, strict=True):
        if coordinate < start + size:
            return name
        start += size
    return layout.names[-1] if layout.names else "?"
