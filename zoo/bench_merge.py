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
    grid_point_name,
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
    "target_loss",
    "budget_seconds",
)


@dataclass
class BenchRun:
    """One saved ``zoo bench`` run: its configuration, command and cells."""

    path: Path
    command: str
    config: BenchConfig
    cells: list[CellResult]
    sources: list[str]  # the bench commands behind it (several for a merged report)


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


def _check_record(record: RunRecord, where: str) -> None:
    """A run as zoo bench saves it: matching, finite curves and increasing clocks."""
    n = len(record.steps)
    times = record.extra["train_seconds"]
    accuracy = record.extra["test_accuracy"]
    problems = []
    if n == 0 or any(not isinstance(s, int) for s in record.steps):
        problems.append("no steps")
    elif record.steps != sorted(record.steps) or record.steps[-1] < 1:
        problems.append("steps not increasing")
    if len(record.train_loss) != n or len(times) != n or len(accuracy) != n:
        problems.append("curves of different lengths")
    elif not all(math.isfinite(v) for v in [*record.train_loss, *times, *accuracy]):
        problems.append("non-finite values")
    elif times[-1] <= 0 or any(b < a for a, b in zip(times, times[1:], strict=False)):
        problems.append("training clock not increasing")
    if problems:
        raise ConfigError(
            f"{where}: run {record.method!r} seed {record.seed}: {', '.join(problems)}"
        )


def _cell_from_json(values: dict, config: BenchConfig, where: Path) -> CellResult:
    try:
        results = {
            str(label): [RunRecord(**r) for r in runs] for label, runs in values["runs"].items()
        }
        for records in results.values():
            for record in records:
                _check_record(record, str(where))
        labels = values.get("labels") or {method_key(label): label for label in results}
        labels = {str(k): str(v) for k, v in labels.items()}
        for key, label in labels.items():
            if key not in METHODS or label not in results:
                raise ValueError(f"label {key!r}: {label!r} names no method or no runs")
        if "best" in values:
            best = {k: float(values["best"][k]) for k in labels}
            damping = float(values.get("sou_damping", 0.0))
        else:  # written before labels and tuned values were saved
            best, damping = {}, 0.0
            for key, label in labels.items():
                best[key], mu = _best_from_label(key, label, config)
                damping = mu if key == "sou" else damping
        tuning = {
            str(key): {str(point): float(score) for point, score in scores.items()}
            for key, scores in values.get("tuning", {}).items()
        }
        long = {}
        for key, info in values.get("long", {}).items():
            runs = {
                name: RunRecord(name, FIRST_SEED, list(steps), list(losses), math.nan, math.nan)
                for name, (steps, losses) in info.get("curves", {}).items()
            }
            long[key] = {**{k: v for k, v in info.items() if k != "curves"}, "runs": runs}
            if key not in labels or "verdict" not in info:
                raise ValueError(f"long-run entry {key!r} has no method or verdict")
            if runs and "horizon" not in info:
                raise ValueError(f"long-run entry {key!r} has no horizon")
        sensitivity = {
            key: {_multiplier(m): float(s) for m, s in sweep.items()}
            for key, sweep in values.get("sensitivity", {}).items()
        }
        for key, sweep in sensitivity.items():
            if key not in labels or set(sweep) != set(SENSITIVITY_MULTIPLIERS):
                raise ValueError(f"sensitivity entry {key!r} is not a full sweep of a method")
        return CellResult(
            dataset=str(values["dataset"]),
            network=str(values["network"]),
            data_source=str(values["data"]),
            results=results,
            labels=labels,
            tuning=tuning,
            best=best,
            sou_damping=damping,
            sensitivity=sensitivity,
            long=long,
            notes=[str(n) for n in values.get("notes", [])],
        )
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
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
    if file.name != "bench.json":
        raise ConfigError(f"{path}: give the folder `zoo bench --out` wrote (it holds bench.json)")
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{file}: cannot read it as JSON ({error})") from error
    if not isinstance(saved, dict) or not isinstance(saved.get("cells"), list):
        raise ConfigError(f"{file}: not a bench.json zoo bench wrote (no list of cells)")
    command = str(saved.get("command", ""))
    if isinstance(saved.get("config"), dict):
        try:
            config = config_from_json(saved["config"])
        except (TypeError, ValueError, AttributeError) as error:
            raise ConfigError(f"{file}: its config does not parse ({error})") from error
    elif "config" in saved:
        raise ConfigError(f"{file}: its config is not an object; rerun that benchmark")
    elif config_from_command is not None and command:
        config = config_from_command(command)
    else:
        raise ConfigError(
            f"{file}: records no configuration (written by an older zoo without its command); "
            "rerun that benchmark"
        )
    if not saved["cells"]:
        raise ConfigError(f"{file}: holds no cells (the bench ran nothing); nothing to merge")
    cells = [_cell_from_json(c, config, file) for c in saved["cells"]]
    keys = [(c.dataset, c.network) for c in cells]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{file}: holds the same dataset/network cell twice")
    sources = saved.get("sources")
    if not (isinstance(sources, list) and sources):
        sources = [command]
    return BenchRun(file.parent, command, config, cells, [str(s) for s in sources])


def _check_comparable(runs: Sequence[BenchRun]) -> None:
    places = [run.path.resolve() for run in runs]
    if len(set(places)) != len(places):
        raise ConfigError("the same bench folder is given twice; give each run once")
    first = runs[0]
    problems = []
    for run in runs[1:]:
        for name in COMPARABLE:
            a, b = getattr(first.config, name), getattr(run.config, name)
            if a != b:
                problems.append(f"{name}: {a!r} in {first.path} but {b!r} in {run.path}")
    if problems:
        raise ConfigError(
            "these bench runs are not comparable (different seeds, batches, lengths or "
            "targets): " + "; ".join(problems) + ". Rerun the odd one with the same settings."
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


def _time_factor(first: BenchRun, run: BenchRun) -> tuple[float, str | None]:
    """One wall-clock factor per run: a method both runs finished, Adam preferred."""
    mine = {(c.dataset, c.network): c for c in first.cells}
    shared = []
    for cell in run.cells:
        other = mine.get((cell.dataset, cell.network))
        for label, records in cell.results.items():
            if other is not None and records and other.results.get(label):
                shared.append((method_key(label) != "adam", other.results[label], records, label))
    if not shared:
        return 1.0, None
    _, reference, records, label = min(shared, key=lambda s: s[0])
    return _mean_ms_per_step(reference) / _mean_ms_per_step(records), label


def _time_factors(runs: Sequence[BenchRun]) -> list[tuple[float, str | None, Path | None]]:
    """Per run: its wall-clock factor, the method it was matched on and the run matched.

    Chained: each run is matched to the earliest run it shares a finished method with,
    whose own factor carries over, so every run that overlaps another lands on one clock.
    """
    factors: list[tuple[float, str | None, Path | None]] = [(1.0, None, None)]
    for i, run in enumerate(runs[1:], start=1):
        found = (1.0, None, None)
        for j in range(i):
            factor, label = _time_factor(runs[j], run)
            if label is not None:
                found = (factors[j][0] * factor, label, runs[j].path)
                break
        factors.append(found)
    return factors


def _provenance_note(cell: CellResult, label: str) -> str | None:
    prefix = f"{cell.dataset}/{cell.network}: {label} is "
    return next((n[len(prefix) :] for n in cell.notes if n.startswith(prefix)), None)


def _merge_cell(parts: list[tuple], reference: BenchRun) -> CellResult:
    """One cell from its parts ``(run, cell, time factor, matched method, matched run)``,
    in run order; ``reference`` is the first run, whose clock the others follow."""
    (first_run, first, first_factor, _, _), later = parts[0], parts[1:]
    merged = copy.deepcopy(first)
    merged.results = {label: _rescale(rs, first_factor) for label, rs in first.results.items()}
    where = f"{first.dataset}/{first.network}"
    notes = [f"{where}: from {first_run.path}: {', '.join(first.results)}"]
    for run, _, factor, timed_by, matched in parts:
        if run is reference:
            continue
        if timed_by is None:
            notes.append(
                f"{where}: {run.path} shares no finished method with an earlier run; its "
                "wall-clock figures are as measured, under whatever load that run had"
            )
        else:
            notes.append(
                f"{where}: wall-clock of {run.path} scaled by {factor:.3f} so that its "
                f"{timed_by} matches the ms/step in {matched}"
                + ("" if abs(factor - 1) < 0.02 else " (the machine's load differed)")
            )
    for run, cell, factor, _, _ in later:
        if cell.data_source != first.data_source:
            raise ConfigError(
                f"{where}: {first_run.path} used data {first.data_source!r} but {run.path} "
                f"used {cell.data_source!r}; merge runs on the same data"
            )
        added, kept = [], set()
        for key, label in cell.labels.items():
            if key not in merged.labels:
                merged.labels[key] = label
                merged.best[key] = cell.best[key]
                if key == "sou":
                    merged.sou_damping = cell.sou_damping
                merged.results[label] = _rescale(cell.results[label], factor)
                added.append(label)
                continue
            if merged.labels[key] != label:
                raise ConfigError(
                    f"{where}: {LABELS[key]} is {merged.labels[key]!r} in {first_run.path} but "
                    f"{label!r} in {run.path} (tuned on different grids or settings); a table "
                    "holds one per method: rerun one of them with the other's grid"
                )
            mine, theirs = _provenance_note(merged, label), _provenance_note(cell, label)
            if mine != theirs:
                raise ConfigError(
                    f"{where}: {label} is {mine} in {first_run.path} but {theirs} in "
                    f"{run.path}; merge runs of the same checkpoint"
                )
            kept.add(label)
            a, b = merged.results[label], cell.results[label]
            if bool(a) != bool(b):
                raise ConfigError(
                    f"{where}: {label} diverged in only one of {first_run.path} and {run.path}, "
                    "so the runs are not comparable (different machines or versions?)"
                )
            if a:
                gap = max(
                    abs(x.train_loss[-1] - y.train_loss[-1]) for x, y in zip(a, b, strict=False)
                )
                notes.append(
                    f"{where}: {label} ran in both {first_run.path} and {run.path}; kept the "
                    f"first (final losses differ by at most {gap:.2g})"
                )
        if added:
            notes.append(f"{where}: from {run.path}: {', '.join(added)}")
        for key, scores in cell.tuning.items():
            mine = merged.tuning.setdefault(key, {})
            for point, score in scores.items():
                mine.setdefault(point, score)
        for key, sweep in cell.sensitivity.items():
            merged.sensitivity.setdefault(key, sweep)
        for key, info in cell.long.items():
            merged.long.setdefault(key, info)
        merged.notes += [
            n
            for n in cell.notes
            if n not in merged.notes and not any(n.startswith(f"{where}: {k} ") for k in kept)
        ]
    for key, scores in merged.tuning.items():
        finite = {p: v for p, v in scores.items() if math.isfinite(v)}
        if key in merged.best and finite:
            chosen = grid_point_name(key, merged.best[key], merged.sou_damping)
            winner = min(finite, key=finite.get)
            if chosen in finite and finite[winner] < finite[chosen]:
                raise ConfigError(
                    f"{where}: {LABELS[key]} was tuned to {chosen}, but grid point {winner} of "
                    "another run scores lower on the tuning seed; rerun with the whole grid"
                )
    order = {key: i for i, key in enumerate(METHODS)}
    merged.labels = dict(sorted(merged.labels.items(), key=lambda kv: order[kv[0]]))
    merged.results = {label: merged.results[label] for label in merged.labels.values()}
    merged.notes += notes
    return merged


def merge_reports(runs: Sequence[BenchRun]) -> tuple[BenchConfig, list[CellResult]]:
    """One configuration and one list of cells from several comparable bench runs."""
    if not runs:
        raise ConfigError("nothing to merge: give at least one bench output folder")
    _check_comparable(runs)
    cells: dict[tuple[str, str], list] = {}
    for run, timing in zip(runs, _time_factors(runs), strict=True):
        for cell in run.cells:
            cells.setdefault((cell.dataset, cell.network), []).append((run, cell, *timing))
    merged = [_merge_cell(parts, runs[0]) for parts in cells.values()]
    configs = [r.config for r in runs]
    methods = [m for m in METHODS if any(m in c.methods for c in configs)]
    grids: dict[str, tuple[float, ...]] = {}
    for c in configs:
        for key in c.methods:
            if key in c.grids:
                grids[key] = tuple(sorted({*grids.get(key, ()), *c.grids[key]}))
    grids = {**configs[0].grids, **grids}
    dampings = tuple(sorted({mu for c in configs if "sou" in c.methods for mu in c.sou_dampings}))
    config = copy_config(
        configs[0],
        datasets=tuple(dict.fromkeys(d for c in configs for d in c.datasets)),
        networks=tuple(dict.fromkeys(n for c in configs for n in c.networks)),
        methods=tuple(methods),
        grids=grids,
        sou_dampings=dampings or configs[0].sou_dampings,
    )
    logger.info("merged %d bench runs into %d cells", len(runs), len(merged))
    return config, merged
