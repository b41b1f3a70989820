"""Merge several ``zoo bench`` runs into one report.

The full comparison grid is expensive, so it is often run in parts: one command for the
hand-designed baselines, another for a new checkpoint, a third weeks later for a method
that was added. :func:`merge_reports` combines the parts into the cells of one report,
which :func:`zoo.bench.write_report` then writes like any other.

Runs can only be merged when they are comparable: the same reported seeds, steps, batch
size and evaluation sets (anything else is a :class:`~zoo.errors.ConfigError` naming the
differing setting). Within a cell a method that appears in more than one part is taken
from the first part, and the report notes how far the copies' final losses differ
(runs are deterministic on one machine, so a difference means the parts are not
comparable).

Wall-clock figures are the one thing that does not carry over between runs made under
different machine load. When two parts share a method (typically the tuned Adam run, cheap
to repeat), every later part's times are scaled so that the shared method's mean
time per step matches the first part's, and the report says by which factor. Without a
shared method the times are left as measured, and the report says that too.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .bench import (
    FIRST_SEED,
    LABELS,
    LEARNED,
    METHODS,
    SENSITIVITY_MULTIPLIERS,
    BenchConfig,
    CellResult,
    config_from_json,
    copy_config,
)
from .errors import ConfigError
from .train import RunRecord

__all__ = ["BenchRun", "load_report", "merge_reports"]

logger = logging.getLogger(__name__)

# Settings that must agree for runs to share a table: they decide the seeds, the batches,
# the length of every run and what the loss and accuracy are measured on.
COMPARABLE = (
    "seeds",
    "steps",
    "batch_size",
    "eval_examples",
    "test_examples",
    "train_examples",
    "tuning_seed",
)


@dataclass
class BenchRun:
    """One saved ``zoo bench`` run: its configuration, command and cells."""

    path: Path
    command: str
    config: BenchConfig
    cells: list[CellResult]


def method_key(label: str) -> str:
    """The method key (``"adam"``, ``"lstm-gh"``, …) of a result label such as
    ``"Adam lr=0.003"``; the longest matching name wins (per-layer before second order)."""
    for key in sorted(LABELS, key=lambda k: -len(LABELS[k])):
        name = LABELS[key]
        if label == name or label.startswith(name + " "):
            return key
    raise ConfigError(f"bench.json: result {label!r} is not a label zoo bench writes")


def _best_from_label(key: str, label: str, config: BenchConfig) -> tuple[float, float]:
    """(tuned value, SOU damping) read back from a label written by an older zoo."""
    if key == "sou":
        match = re.search(r"α=(\S+) μ=(\S+)", label)
        if match:
            return float(match[1]), float(match[2])
    elif key in LEARNED:
        return 1.0, 0.0
    elif key == "joint":
        return config.joint_init_lr, 0.0
    else:
        match = re.search(r"lr=(\S+)", label)
        if match:
            return float(match[1]), 0.0
    raise ConfigError(f"bench.json: cannot read the tuned value from {label!r}")


def _multiplier(text: str) -> float:
    for m in SENSITIVITY_MULTIPLIERS:
        if f"{m:.4g}" == text:
            return m
    return float(text)


def _cell_from_json(values: dict, config: BenchConfig, where: Path) -> CellResult:
    try:
        results = {label: [RunRecord(**r) for r in runs] for label, runs in values["runs"].items()}
        labels = values.get("labels") or {method_key(label): label for label in results}
        if "best" in values:
            best, damping = dict(values["best"]), float(values.get("sou_damping", 0.0))
        else:  # written before labels and tuned values were saved
            best, damping = {}, 0.0
            for key, label in labels.items():
                best[key], mu = _best_from_label(key, label, config)
                damping = mu if key == "sou" else damping
        long = {}
        for key, info in values.get("long", {}).items():
            runs = {
                name: RunRecord(name, FIRST_SEED, list(steps), list(losses), math.nan, math.nan)
                for name, (steps, losses) in info.get("curves", {}).items()
            }
            long[key] = {**{k: v for k, v in info.items() if k != "curves"}, "runs": runs}
        return CellResult(
            dataset=values["dataset"],
            network=values["network"],
            data_source=values["data"],
            results=results,
            labels=labels,
            tuning=values.get("tuning", {}),
            best=best,
            sou_damping=damping,
            sensitivity={
                key: {_multiplier(m): s for m, s in sweep.items()}
                for key, sweep in values.get("sensitivity", {}).items()
            },
            long=long,
            notes=list(values.get("notes", [])),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(
            f"{where}: not a bench.json zoo bench wrote ({type(error).__name__}: {error}); "
            "merge the folders `zoo bench --out` produced"
        ) from error


def load_report(path: Path, config_from_command=None) -> BenchRun:
    """Read a ``zoo bench`` output folder (or its ``bench.json``).

    ``config_from_command`` rebuilds the configuration from the recorded command line for
    reports written before ``bench.json`` recorded it (the CLI passes its own parser).
    """
    path = Path(path)
    file = path / "bench.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{path}: no bench.json; give a folder written by `zoo bench --out`")
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{file}: cannot read it as JSON ({error})") from error
    if not isinstance(saved, dict) or not isinstance(saved.get("cells"), list):
        raise ConfigError(f"{file}: not a bench.json zoo bench wrote (no list of cells)")
    command = str(saved.get("command", ""))
    if "config" in saved:
        config = config_from_json(saved["config"])
    elif config_from_command is not None and command:
        config = config_from_command(command)
    else:
        raise ConfigError(
            f"{file}: records no configuration (written by an older zoo without its command); "
            "rerun that benchmark"
        )
    cells = [_cell_from_json(c, config, file) for c in saved["cells"]]
    return BenchRun(file.parent, command, config, cells)


def _check_comparable(runs: Sequence[BenchRun]) -> None:
    first = runs[0]
    problems = []
    for run in runs[1:]:
        for name in COMPARABLE:
            a, b = getattr(first.config, name), getattr(run.config, name)
            if a != b:
                problems.append(f"{name}: {a!r} in {first.path} but {b!r} in {run.path}")
    if problems:
        raise ConfigError(
            "these bench runs are not comparable (different seeds, batches or lengths): "
            + "; ".join(problems)
            + ". Rerun the odd one with the same settings."
        )


def _mean_ms_per_step(records: list[RunRecord]) -> float:
    return statistics.fmean(r.extra["train_seconds"][-1] / r.steps[-1] for r in records)


def _rescale(records: list[RunRecord], factor: float) -> list[RunRecord]:
    scaled = []
    for record in records:
        record = copy.deepcopy(record)
        record.seconds *= factor
        record.extra["train_seconds"] = [t * factor for t in record.extra["train_seconds"]]
        scaled.append(record)
    return scaled


def _merge_cell(parts: list[tuple[BenchRun, CellResult]]) -> CellResult:
    (first_run, first), later = parts[0], parts[1:]
    merged = copy.deepcopy(first)
    where = f"{first.dataset}/{first.network}"
    notes = [f"{where}: from {first_run.path}: {', '.join(first.results)}"]
    for run, cell in later:
        if cell.data_source != first.data_source:
            notes.append(f"{where}: {run.path} used data {cell.data_source!r}")
        shared = [
            label for label in cell.results if merged.results.get(label) and cell.results[label]
        ]
        factor = 1.0
        if shared:
            label = next((s for s in shared if method_key(s) == "adam"), shared[0])
            factor = _mean_ms_per_step(merged.results[label]) / _mean_ms_per_step(
                cell.results[label]
            )
            notes.append(
                f"{where}: wall-clock of {run.path} scaled by {factor:.3f} so that its "
                f"{label} matches the first run's ms/step (machine load differed)"
            )
        else:
            notes.append(
                f"{where}: {run.path} shares no method with the first run; its wall-clock "
                "figures are as measured, under whatever load that run had"
            )
        added = []
        for label, records in cell.results.items():
            if label in merged.results:
                mine = merged.results[label]
                if mine and records:
                    gap = max(
                        abs(a.train_loss[-1] - b.train_loss[-1])
                        for a, b in zip(mine, records, strict=False)
                    )
                    notes.append(
                        f"{where}: {label} ran in both {first_run.path} and {run.path}; kept "
                        f"the first (final losses differ by at most {gap:.2g})"
                    )
                continue
            merged.results[label] = _rescale(records, factor)
            added.append(label)
        if added:
            notes.append(f"{where}: from {run.path}: {', '.join(added)}")
        for key, label in cell.labels.items():
            if key not in merged.labels:
                merged.labels[key] = label
                merged.best[key] = cell.best[key]
                if key == "sou":
                    merged.sou_damping = cell.sou_damping
        for key, scores in cell.tuning.items():
            merged.tuning[key] = {**scores, **merged.tuning.get(key, {})}
        for key, sweep in cell.sensitivity.items():
            merged.sensitivity.setdefault(key, sweep)
        for key, info in cell.long.items():
            merged.long.setdefault(key, info)
        merged.notes += [n for n in cell.notes if n not in merged.notes]
    order = {key: i for i, key in enumerate(METHODS)}
    merged.labels = dict(sorted(merged.labels.items(), key=lambda kv: order[kv[0]]))
    merged.results = {
        label: merged.results[label] for label in merged.labels.values() if label in merged.results
    }
    merged.notes += notes
    return merged


def merge_reports(runs: Sequence[BenchRun]) -> tuple[BenchConfig, list[CellResult]]:
    """One configuration and one list of cells from several comparable bench runs."""
    if not runs:
        raise ConfigError("nothing to merge: give at least one bench output folder")
    _check_comparable(runs)
    cells: dict[tuple[str, str], list[tuple[BenchRun, CellResult]]] = {}
    for run in runs:
        for cell in run.cells:
            cells.setdefault((cell.dataset, cell.network), []).append((run, cell))
    merged = [_merge_cell(parts) for parts in cells.values()]
    configs = [r.config for r in runs]
    methods = [m for m in METHODS if any(m in c.methods for c in configs)]
    grids: dict[str, tuple[float, ...]] = {}
    for c in configs:
        for key in c.methods:
            if key in c.grids:
                grids[key] = tuple(sorted({*grids.get(key, ()), *c.grids[key]}))
    grids = {**configs[0].grids, **grids}
    dampings = tuple(sorted({mu for c in configs if "sou" in c.methods for mu in c.sou_dampings}))
    targets = {c.target_loss for c in configs}
    budgets = {c.budget_seconds for c in configs}
    config = copy_config(
        configs[0],
        datasets=tuple(dict.fromkeys(d for c in configs for d in c.datasets)),
        networks=tuple(dict.fromkeys(n for c in configs for n in c.networks)),
        methods=tuple(methods),
        grids=grids,
        sou_dampings=dampings or configs[0].sou_dampings,
        target_loss=targets.pop() if len(targets) == 1 else None,
        budget_seconds=budgets.pop() if len(budgets) == 1 else None,
    )
    logger.info("merged %d bench runs into %d cells", len(runs), len(merged))
    return config, merged
