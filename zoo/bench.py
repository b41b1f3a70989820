"""The paper's comparison: every optimizer on every dataset and network, side by side.

For each ``(dataset, network)`` cell, every method trains the network from the same
initialisation and on the same minibatches per seed (:func:`zoo.train.compare`):

=============  ==========================================================================
``sgd``        ``torch.optim.SGD``, learning rate tuned on a grid
``rmsprop``    ``torch.optim.RMSprop``, tuned
``adam``       ``torch.optim.Adam``, tuned
``sou``        :class:`zoo.baselines.SOU`, the diagonal-Newton step, step size tuned
``lstm-g``     the gradient-only LSTM (feature set ``g``), a checkpoint meta-trained on
               ``small``; on ``big`` it is *transferred* (one net per layer kind)
``lstm-gh``    the second-order LSTM (feature set ``gh``), likewise
``lstm-layer`` optional: per-layer second-order nets meta-trained on the cell's network
               itself (``per_layer = true`` recipes); skipped when no checkpoint exists
``joint``      joint mode (:class:`zoo.meta.JointTrainer`): fresh ``gh`` nets meta-trained
               on the very network they train, one meta-update per unroll, no resets
=============  ==========================================================================

Hand-designed learning rates are tuned on a separate seed (``tuning_seed``, never a
reported one): the grid's lowest final training loss wins and every grid point's score is
recorded. Metrics per method: training loss and test accuracy against steps, steps to
reach a target loss, wall-clock per step, and test accuracy within a fixed wall-clock
budget (the paper's budgeted-time comparison: every method gets the time the fastest one
needed for all its steps). Two studies follow the comparison: *sensitivity* (the final
loss across a decade of each method's main hyper-parameter — the learning rate, or a
multiplier on the update nets' learned output scale ``exp(log_lr)``) and *longer than
trained* (the learned optimizers run for ``long_factor`` × their meta-training horizon).

:func:`plan_bench` resolves data, checkpoints and methods (and counts the steps, for a
progress bar); :func:`run_bench` runs the plan; :func:`write_report` writes the markdown
report, PNG plots and a JSON of every run.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .baselines import HAND_DESIGNED, SOU
from .checkpoint import PretrainedOptimizer, load_checkpoint
from .data import Dataset, load_dataset
from .errors import CheckpointError, ConfigError, NonFiniteError
from .features import FeatureSpec
from .meta import JointTrainer
from .networks import get_network
from .train import (
    REPORT_SEED_BASE,
    Method,
    RunRecord,
    compare,
    initial_network,
    markdown_table,
    plot_curves,
    report_seeds,
    steps_to_reach,
    train_run,
)
from .update_net import UpdateNet

__all__ = [
    "DEFAULT_GRIDS",
    "METHODS",
    "BenchConfig",
    "BenchPlan",
    "CellResult",
    "plan_bench",
    "run_bench",
    "write_report",
]

logger = logging.getLogger(__name__)

METHODS = ("sgd", "rmsprop", "adam", "sou", "lstm-g", "lstm-gh", "lstm-layer", "joint")
TUNED = ("sgd", "rmsprop", "adam", "sou")
LEARNED = ("lstm-g", "lstm-gh", "lstm-layer")
LABELS = {
    "sgd": "SGD",
    "rmsprop": "RMSprop",
    "adam": "Adam",
    "sou": "SOU",
    "lstm-g": "LSTM (gradient only)",
    "lstm-gh": "LSTM (second order)",
    "lstm-layer": "LSTM (second order, per layer)",
    "joint": "joint mode",
}
# Grids of half-decades around each method's usual range (widened where the first MNIST run
# picked a grid edge: RMSprop 3e-3, Adam 1e-2); Adam, the baseline the learned optimizers
# must beat, gets {1, 2, 3, 5} x 10^k (a coarser grid once let 2e-3 beat the "tuned"
# 3e-3); SOU's is its step size α, tried
# with every damping of ``BenchConfig.sou_dampings`` (its best region on MNIST `small` was
# α/μ ≈ 0.1-0.3: α 0.01, μ 0.03 reached loss 0.23 in 60 steps, α 0.1, μ 1 0.28).
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {
    "sgd": (0.01, 0.03, 0.1, 0.3),
    "rmsprop": (3e-4, 1e-3, 3e-3, 1e-2),
    "adam": (5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2),
    "sou": (0.003, 0.01, 0.03, 0.1),
}
# Checkpoint names per method; ``{dataset}`` and ``{network}`` are filled in per cell.
DEFAULT_CHECKPOINTS: dict[str, str] = {
    "lstm-g": "lstm2-g-{dataset}-small",
    "lstm-gh": "lstm2-gh-{dataset}-small",
    "lstm-layer": "lstm2-gh-{dataset}-{network}-per-layer",
}
# A decade centred on the tuned value, in quarter-decade steps.
SENSITIVITY_MULTIPLIERS = (10**-0.5, 10**-0.25, 1.0, 10**0.25, 10**0.5)
# 97.5 % quantiles of Student's t by degrees of freedom (95 % two-sided intervals).
_T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
FIRST_SEED = REPORT_SEED_BASE  # sensitivity and longer-than-trained runs use this seed
_T975_LARGE = 2.0  # df >= 10 (2.23 at 10, 2.04 at 30): a slightly narrow interval


@dataclass(frozen=True)
class BenchConfig:
    """What to run. Every field shrinks for a quick run (see ``zoo bench --help``)."""

    datasets: tuple[str, ...] = ("mnist", "cifar10")
    networks: tuple[str, ...] = ("small", "big")
    methods: tuple[str, ...] = METHODS
    seeds: int = 5
    steps: int = 500
    tune_steps: int | None = None  # steps per grid point (default: ``steps``)
    batch_size: int = 128
    grids: Mapping[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_GRIDS))
    # SOU's damping μ is tuned jointly with α: measured on MNIST, μ <= 1e-2 diverged at
    # every α in 60 steps (many coordinates have h far below their g).
    sou_dampings: tuple[float, ...] = (0.03, 0.3)
    checkpoints: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_CHECKPOINTS))
    joint_unroll: int = 20
    joint_meta_lr: float = 1e-3
    joint_init_lr: float = 2e-3
    target_loss: float | None = None  # default: tuned Adam's final mean loss
    budget_seconds: float | None = None  # default: the fastest method's time for all steps
    eval_examples: int = 2048
    test_examples: int | None = 2000
    train_examples: int | None = None  # train on the first N training examples only
    sensitivity: bool = True
    sensitivity_steps: int | None = None  # default: ``steps``
    long_factor: int = 10
    long_max_steps: int | None = None  # cap on the longer-than-trained runs
    tuning_seed: int = 10_000
    data_root: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ConfigError(f"unknown method(s) {unknown}; known methods: {', '.join(METHODS)}")
        for name in self.networks:
            get_network(name)
        for name, value in (("seeds", self.seeds), ("steps", self.steps)):
            if value < 1:
                raise ConfigError(f"bench {name} must be >= 1, got {value}")
        for method in TUNED:
            if method in self.methods and not self.grids.get(method):
                raise ConfigError(f"bench: no learning-rate grid for {method!r}")
        if not self.sou_dampings or any(not mu >= 0 for mu in self.sou_dampings):
            raise ConfigError(f"bench sou_dampings must be >= 0, got {self.sou_dampings}")


@dataclass
class CellResult:
    """One ``(dataset, network)`` cell: runs, tuning, studies."""

    dataset: str
    network: str
    data_source: str
    results: dict[str, list[RunRecord]]  # label → one record per seed
    labels: dict[str, str]  # method key → label in ``results``
    tuning: dict[str, dict[str, float]]  # method → {grid point: final loss, tuning seed}
    best: dict[str, float]  # method → chosen lr (or 1.0 for learned multipliers)
    sou_damping: float = 0.0  # the μ tuned with SOU's α
    sensitivity: dict[str, dict[float, float]] = field(default_factory=dict)
    long: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class BenchPlan:
    config: BenchConfig
    data: dict[str, Dataset]
    checkpoints: dict[tuple[str, str, str], PretrainedOptimizer]  # (method, dataset, net)
    notes: list[str]
    total_steps: int


# ---------------------------------------------------------------------- methods


def _hand_designed(key: str, lr: float, damping: float) -> Method:
    if key == "sou":
        return Method(
            f"SOU α={lr:g} μ={damping:g}",
            lambda model: SOU(model.parameters(), lr=lr, damping=damping),
            needs_curvature=True,
        )
    return Method(
        f"{LABELS[key]} lr={lr:g}", lambda model: HAND_DESIGNED[key](model.parameters(), lr)
    )


def _scaled(optimizer, multiplier: float):
    """Multiply the update nets' learned output scale ``exp(log_lr)`` by ``multiplier``."""
    if multiplier != 1.0:
        with torch.no_grad():
            for net in optimizer.nets.values():
                net.log_lr.add_(math.log(multiplier))
    return optimizer


def _learned(key: str, pretrained: PretrainedOptimizer, multiplier: float = 1.0) -> Method:
    def make(model):
        return _scaled(pretrained.attach(model), multiplier)

    suffix = "" if multiplier == 1.0 else f" ×{multiplier:.3g}"
    return Method(
        f"{LABELS[key]}{suffix}", make, needs_curvature=pretrained.features.uses_curvature
    )


def _provenance(pretrained: PretrainedOptimizer) -> str:
    """Which checkpoint a learned method is, and how it was made, for the report."""
    c = pretrained.config
    source, training = c.get("source_network") or {}, c.get("training") or {}
    return (
        f"checkpoint {pretrained.name!r} (features {pretrained.features.name}, meta-trained "
        f"on {source.get('name')}/{source.get('dataset')} for {training.get('iterations')} "
        f"iterations, weights of iteration {training.get('best_iteration')}, horizon "
        f"{training.get('horizon')})"
    )


def _joint(config: BenchConfig, multiplier: float = 1.0) -> Method:
    spec = FeatureSpec("gh")

    def make(model):
        torch.manual_seed(0)  # the same fresh nets for every seed and method copy
        nets = {
            kind: UpdateNet(spec.num_features, init_lr=config.joint_init_lr * multiplier)
            for kind in ("conv", "fc")
        }
        return JointTrainer(
            model, nets, spec, unroll=config.joint_unroll, meta_lr=config.joint_meta_lr
        )

    suffix = "" if multiplier == 1.0 else f" ×{multiplier:.3g}"
    return Method(f"{LABELS['joint']}{suffix}", make, needs_curvature=True)


# ---------------------------------------------------------------------- plan and run


def _subset(data: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(data.train_y):
        return data
    return Dataset(
        data.name,
        data.train_x[:n],
        data.train_y[:n],
        data.test_x,
        data.test_y,
        f"{data.source} (first {n:,} training examples)",
        data.num_classes,
    )


def plan_bench(
    config: BenchConfig, load: Callable[[str, str | None], Dataset] = load_dataset
) -> BenchPlan:
    """Load the data and the checkpoints each cell needs; note what will be skipped."""
    data = {
        name: _subset(load(name, config.data_root), config.train_examples)
        for name in config.datasets
    }
    checkpoints, notes = {}, []
    for dataset in config.datasets:
        for network in config.networks:
            for key in LEARNED:
                if key not in config.methods:
                    continue
                ref = config.checkpoints[key].format(dataset=dataset, network=network)
                try:
                    checkpoints[(key, dataset, network)] = load_checkpoint(ref)
                except CheckpointError as error:
                    notes.append(f"{dataset}/{network}: {LABELS[key]} skipped ({error})")
    tune = config.tune_steps or config.steps
    sens = config.sensitivity_steps or config.steps
    total = 0
    for dataset in config.datasets:
        for network in config.networks:
            present = [
                k
                for k in config.methods
                if k not in LEARNED or (k, dataset, network) in checkpoints
            ]
            total += sum(len(config.grids[k]) * tune for k in present if k in TUNED)
            total += len(present) * config.seeds * config.steps
            if config.sensitivity:
                reused = 1 if sens == config.steps else 0  # ×1 reuses the seed-0 run
                total += len(present) * (len(SENSITIVITY_MULTIPLIERS) - reused) * sens
            for k in present:
                if k in LEARNED:
                    total += 2 * _long_steps(config, checkpoints[(k, dataset, network)])
    return BenchPlan(config, data, checkpoints, notes, total)


def _long_steps(config: BenchConfig, pretrained: PretrainedOptimizer) -> int:
    horizon = int(pretrained.config.get("training", {}).get("horizon") or 0)
    steps = config.long_factor * horizon
    if config.long_max_steps is not None:
        steps = min(steps, config.long_max_steps)
    return steps


def run_bench(plan: BenchPlan, progress: Callable[[int], None] | None = None) -> list[CellResult]:
    """Run every cell of ``plan``; returns one :class:`CellResult` per (dataset, network)."""
    config = plan.config
    cells = []
    for dataset in config.datasets:
        for network in config.networks:
            logger.info("bench cell %s / %s", dataset, network)
            cells.append(_run_cell(plan, dataset, network, progress))
    return cells


def _run_cell(plan: BenchPlan, dataset: str, network: str, progress) -> CellResult:
    config, data = plan.config, plan.data[dataset]
    options = dict(
        batch_size=config.batch_size,
        eval_examples=config.eval_examples,
        test_examples=config.test_examples,
        progress=progress,
    )
    tuning, best, methods, keys, notes = {}, {}, [], {}, []
    damping = 0.0
    for key in config.methods:
        if key in TUNED:
            point, tuning[key] = _tune(network, data, key, config, options)
            if point is None:
                notes.append(f"{dataset}/{network}: {LABELS[key]} diverged at every grid point")
                continue
            best[key] = point[0]
            if key == "sou":
                damping = point[1]
            method = _hand_designed(key, *point)
        elif key in LEARNED:
            pretrained = plan.checkpoints.get((key, dataset, network))
            if pretrained is None:
                continue
            method, best[key] = _learned(key, pretrained), 1.0
            notes.append(f"{dataset}/{network}: {LABELS[key]} is {_provenance(pretrained)}")
        else:
            method, best[key] = _joint(config), config.joint_init_lr
        methods.append(method)
        keys[key] = method.name
    results = _compare_tolerant(network, data, methods, report_seeds(config.seeds), config, options)
    cell = CellResult(dataset, network, data.source, results, keys, tuning, best, damping)
    cell.notes = [n for n in plan.notes if n.startswith(f"{dataset}/{network}:")] + notes
    if config.sensitivity:
        cell.sensitivity = _sensitivity(plan, cell, data, options)
    for key in LEARNED:
        if key in keys and config.long_factor > 0:
            cell.long[key] = _longer_than_trained(plan, cell, key, data, options)
    return cell


def _tune(network, data, key, config, options):
    """The grid point with the lowest final loss on the tuning seed (None if all diverged),
    and every point's score. Points are ``(lr, damping)``; damping is SOU's μ, else 0."""
    dampings = config.sou_dampings if key == "sou" else (0.0,)
    points = [(lr, mu) for mu in dampings for lr in config.grids[key]]
    scores = {}
    for point in points:
        method = _hand_designed(key, *point)
        steps = config.tune_steps or config.steps
        scores[point] = _final_loss(network, data, method, steps, config.tuning_seed, options)
    finite = [p for p in points if math.isfinite(scores[p])]
    best = min(finite, key=lambda p: (scores[p], p)) if finite else None
    named = {grid_point_name(key, lr, mu): v for (lr, mu), v in scores.items()}
    return best, named


def grid_point_name(key: str, lr: float, damping: float) -> str:
    """How a tuning grid point is named in reports and bench.json (SOU: α and μ)."""
    return f"α={lr:g}, μ={damping:g}" if key == "sou" else f"{lr:g}"


def _final_loss(network, data, method, steps, seed, options) -> float:
    model = initial_network(network, data, seed)
    try:
        record = train_run(model, data, method, steps=steps, seed=seed, **options)
    except NonFiniteError:
        return math.inf
    value = record.train_loss[-1]
    return value if math.isfinite(value) else math.inf


def _compare_tolerant(network, data, methods, seeds, config, options):
    """:func:`compare` with test curves; a diverged method is reported, not fatal."""
    results: dict[str, list[RunRecord]] = {}
    for method in methods:
        try:
            results.update(
                compare(
                    network,
                    data,
                    [method],
                    steps=config.steps,
                    seeds=seeds,
                    track_test=True,
                    **options,
                )
            )
        except NonFiniteError as error:
            logger.warning("%s", error)
            results[method.name] = []
    return results


def _sensitivity(plan, cell: CellResult, data, options) -> dict[str, dict[float, float]]:
    """Final training loss (the first reported seed) across a decade of each method's main
    hyper-parameter."""
    config = plan.config
    steps = config.sensitivity_steps or config.steps
    sweep = {}
    for key, label in cell.labels.items():
        values = {}
        for mult in SENSITIVITY_MULTIPLIERS:
            if mult == 1.0 and steps == config.steps and cell.results.get(label):
                values[mult] = cell.results[label][0].train_loss[-1]
                continue
            if key in TUNED:
                method = _hand_designed(key, cell.best[key] * mult, cell.sou_damping)
            elif key in LEARNED:
                method = _learned(key, plan.checkpoints[(key, cell.dataset, cell.network)], mult)
            else:
                method = _joint(config, mult)
            values[mult] = _final_loss(cell.network, data, method, steps, FIRST_SEED, options)
        sweep[key] = values
    return sweep


def _longer_than_trained(plan, cell: CellResult, key: str, data, options) -> dict:
    """Run a learned optimizer for ``long_factor`` × its horizon (the first reported seed),
    beside Adam."""
    pretrained = plan.checkpoints[(key, cell.dataset, cell.network)]
    horizon = int(pretrained.config.get("training", {}).get("horizon") or 0)
    steps = _long_steps(plan.config, pretrained)
    if steps < 1 or horizon < 1:
        return {"verdict": "not run (no training.horizon in the checkpoint's config)"}
    runs = {}
    reference = [("Adam", _hand_designed("adam", cell.best.get("adam", 1e-3), 0.0))]
    for name, method in [(cell.labels[key], _learned(key, pretrained)), *reference]:
        model = initial_network(cell.network, data, FIRST_SEED)
        try:
            runs[name] = train_run(model, data, method, steps=steps, seed=FIRST_SEED, **options)
        except NonFiniteError:
            runs[name] = None
    record = runs[cell.labels[key]]
    return {
        "horizon": horizon,
        "steps": steps,
        "verdict": _verdict(record, horizon),
        "runs": {n: r for n, r in runs.items() if r is not None},
    }


def _verdict(record: RunRecord | None, horizon: int) -> str:
    """keeps improving / stalls / diverges, judged after the horizon."""
    if record is None or not all(math.isfinite(v) for v in record.train_loss):
        return "diverges"
    at_horizon = _value_at(record, horizon)
    final, lowest = record.train_loss[-1], min(record.train_loss)
    if final > 1.5 * lowest or final > record.train_loss[0]:
        return "diverges"
    return "keeps improving" if final < 0.9 * at_horizon else "stalls"


def _value_at(record: RunRecord, step: int) -> float:
    eligible = [v for s, v in zip(record.steps, record.train_loss, strict=True) if s <= step]
    return eligible[-1]


# ---------------------------------------------------------------------- metrics and report


def _interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (0 for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    t = _T975.get(len(values) - 1, _T975_LARGE)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def _seed_range(count: int) -> str:
    seeds = report_seeds(count)
    return f"seed {seeds[0]}" if count == 1 else f"seeds {seeds[0]}-{seeds[-1]}"


def _fmt(values: Sequence[float], digits: int = 4) -> str:
    if not values:
        return "-"
    mean, half = _interval(values)
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _accuracy_at_budget(record: RunRecord, budget: float) -> float:
    """Test accuracy at the last evaluation reached within ``budget`` training seconds.

    Resolved to the evaluation points (about 20 per run): a method that finishes just after
    a point is credited with that point's accuracy, which favours no method in particular.
    """
    times, accs = record.extra["train_seconds"], record.extra["test_accuracy"]
    return [a for t, a in zip(times, accs, strict=True) if t <= budget][-1]


def cell_metrics(cell: CellResult, config: BenchConfig) -> dict:
    """Target loss, budget and one row of numbers per method."""
    finished = {n: r for n, r in cell.results.items() if r}
    adam = cell.labels.get("adam")
    if config.target_loss is not None:
        target = config.target_loss
    elif adam in finished:
        target = statistics.fmean(r.train_loss[-1] for r in finished[adam])
    else:
        target = statistics.median(r.train_loss[-1] for rs in finished.values() for r in rs)
    times = {
        n: statistics.fmean(r.extra["train_seconds"][-1] for r in rs) for n, rs in finished.items()
    }
    budget = config.budget_seconds or min(times.values())
    rows = {}
    for name, records in cell.results.items():
        if not records:
            rows[name] = {"diverged": True}
            continue
        reached = [steps_to_reach(r.steps, r.train_loss, target) for r in records]
        hits = [s for s in reached if s is not None]
        rows[name] = {
            "final_loss": [r.train_loss[-1] for r in records],
            "test_accuracy": [100 * r.test_accuracy for r in records],
            "steps_to_target": hits,
            "reached": f"{len(hits)}/{len(records)}",
            "ms_per_step": [1000 * r.extra["train_seconds"][-1] / r.steps[-1] for r in records],
            "accuracy_at_budget": [100 * _accuracy_at_budget(r, budget) for r in records],
        }
    return {"target_loss": target, "budget_seconds": budget, "rows": rows}


def cell_table(cell: CellResult, config: BenchConfig) -> str:
    metrics = cell_metrics(cell, config)
    adam = cell.labels.get("adam")
    adam_target = config.target_loss is None and bool(cell.results.get(adam))
    header = [
        "method",
        "tuned",
        f"loss@{config.steps}",
        "test acc %",
        f"steps to loss {metrics['target_loss']:.4f}",
        "ms/step",
        f"acc % @ {metrics['budget_seconds']:.1f} s",
    ]
    rows = []
    for key, name in cell.labels.items():
        m = metrics["rows"][name]
        if key == "sou":
            tuned = f"α {cell.best[key]:g}, μ {cell.sou_damping:g}"
        elif key in TUNED:
            tuned = f"lr {cell.best[key]:g}"
        else:
            tuned = f"init lr {cell.best[key]:g}" if key == "joint" else "-"
        if m.get("diverged"):
            rows.append([name, tuned, "diverged", "-", "-", "-", "-"])
            continue
        steps = (
            f"{_fmt(m['steps_to_target'], 0)} ({m['reached']})"
            if m["steps_to_target"]
            else f"- (0/{len(m['final_loss'])})"
        )
        if m["steps_to_target"] and adam_target and key != "adam":
            # The target is Adam's loss after all its steps: the fraction of them needed.
            steps += f", {statistics.fmean(m['steps_to_target']) / config.steps:.2f}× Adam's"
        rows.append(
            [
                name,
                tuned,
                _fmt(m["final_loss"]),
                _fmt(m["test_accuracy"], 2),
                steps,
                _fmt(m["ms_per_step"], 1),
                _fmt(m["accuracy_at_budget"], 2),
            ]
        )
    return markdown_table(header, rows)


def sensitivity_table(cell: CellResult) -> str:
    header = ["method", *[f"×{m:.3g}" for m in SENSITIVITY_MULTIPLIERS], "worst/best"]
    rows = []
    for key, values in cell.sensitivity.items():
        finite = [v for v in values.values() if math.isfinite(v)]
        spread = (
            f"{max(values.values()) / min(finite):.2f}"
            if finite and len(finite) == len(values)
            else "diverged"
        )
        rows.append(
            [cell.labels[key], *[f"{values[m]:.4f}" for m in SENSITIVITY_MULTIPLIERS], spread]
        )
    return markdown_table(header, rows)


def long_table(cell: CellResult) -> str:
    header = [
        "method",
        "horizon",
        "steps run",
        "loss@horizon",
        "final loss",
        "Adam final",
        "verdict",
    ]
    rows = []
    for key, info in cell.long.items():
        runs = info.get("runs", {})
        record = runs.get(cell.labels[key])
        adam = runs.get("Adam")
        rows.append(
            [
                cell.labels[key],
                str(info.get("horizon", "-")),
                str(info.get("steps", "-")),
                f"{_value_at(record, info['horizon']):.4f}" if record else "-",
                f"{record.train_loss[-1]:.4f}" if record else "-",
                f"{adam.train_loss[-1]:.4f}" if adam else "-",
                info["verdict"],
            ]
        )
    return markdown_table(header, rows)


def _plot(path: Path, title: str, xlabel: str, ylabel: str, series, log_x=False, log_y=True):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, xs, ys in series:
        ax.plot(xs, ys, marker="o" if log_x else None, label=name)
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(
    cells: list[CellResult],
    config: BenchConfig,
    out: Path,
    command: str = "",
    sources: Sequence[str] = (),
) -> str:
    """Write ``report.md``, the PNGs and ``bench.json`` under ``out``; returns the markdown.

    ``sources`` are the commands of the runs a merged report (:mod:`zoo.bench_merge`) was
    made from.
    """
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# zoo bench", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    if sources:
        lines += ["Merged from these runs:", "", *[f"- `{c}`" for c in sources], ""]
    lines += [
        f"{config.seeds} seed(s) ({_seed_range(config.seeds)}; disjoint from the meta-training, "
        f"checkpoint-selection and tuning seeds) × {config.steps} steps, batch "
        f"{config.batch_size}; "
        f"hand-designed learning rates tuned on seed {config.tuning_seed} over "
        + "; ".join(f"{LABELS[k]} {list(config.grids[k])}" for k in TUNED if k in config.methods)
        + f" (SOU: α × damping μ in {list(config.sou_dampings)}). Intervals are 95 % "
        "t-intervals of the "
        "mean over seeds. Training loss on a fixed subset of the training split "
        f"({config.eval_examples} examples); test accuracy on {config.test_examples or 'all'} "
        "test examples.",
        "",
    ]
    payload = []
    for cell in cells:
        stem = f"{cell.dataset}-{cell.network}"
        finished = {n: r for n, r in cell.results.items() if r}
        lines += [f"## {cell.dataset} / {cell.network}", "", f"Data: {cell.data_source}", ""]
        lines += [cell_table(cell, config), ""]
        if finished:
            plot_curves(finished, out / f"{stem}-loss.png", f"{cell.network} on {cell.dataset}")
            _plot(
                out / f"{stem}-accuracy.png",
                f"test accuracy, {cell.network} on {cell.dataset}",
                "step",
                "test accuracy (mean over seeds)",
                [
                    (
                        n,
                        rs[0].steps,
                        [
                            statistics.fmean(v)
                            for v in zip(*(r.extra["test_accuracy"] for r in rs), strict=True)
                        ],
                    )
                    for n, rs in finished.items()
                ],
                log_y=False,
            )
            lines += [f"![loss]({stem}-loss.png) ![accuracy]({stem}-accuracy.png)", ""]
        for key, scores in cell.tuning.items():
            grid = ", ".join(f"{point}: {s:.4f}" for point, s in scores.items())
            lines.append(f"- {LABELS[key]} grid (final loss on the tuning seed): {grid}")
        lines += [f"- note: {n}" for n in cell.notes]
        lines.append("")
        if cell.sensitivity:
            lines += [
                f"Sensitivity (final training loss, seed {FIRST_SEED}; "
                "× the tuned learning rate, or "
                "× the update nets' output scale):",
                "",
                sensitivity_table(cell),
                "",
            ]
            _plot(
                out / f"{stem}-sensitivity.png",
                f"sensitivity, {cell.network} on {cell.dataset}",
                "multiplier on the main hyper-parameter",
                "final training loss",
                [
                    (cell.labels[k], list(v), [min(x, 1e3) for x in v.values()])
                    for k, v in cell.sensitivity.items()
                ],
                log_x=True,
            )
            lines += [f"![sensitivity]({stem}-sensitivity.png)", ""]
        if cell.long:
            lines += [f"Longer than trained (seed {FIRST_SEED}):", "", long_table(cell), ""]
            series = [
                (f"{cell.labels[k]} / {n}" if n != cell.labels[k] else n, r.steps, r.train_loss)
                for k, info in cell.long.items()
                for n, r in info.get("runs", {}).items()
            ]
            if series:
                _plot(
                    out / f"{stem}-long.png",
                    f"longer than trained, {cell.network} on {cell.dataset}",
                    "step",
                    "training loss",
                    series,
                )
                lines += [f"![long]({stem}-long.png)", ""]
        payload.append(_cell_json(cell, config))
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n", encoding="utf-8")
    saved = {"command": command, "config": config_json(config), "cells": payload}
    if sources:
        saved["sources"] = list(sources)
    (out / "bench.json").write_text(json.dumps(saved, indent=1, default=str), encoding="utf-8")
    return text


def _cell_json(cell: CellResult, config: BenchConfig) -> dict:
    return {
        "dataset": cell.dataset,
        "network": cell.network,
        "data": cell.data_source,
        "metrics": cell_metrics(cell, config),
        "labels": cell.labels,
        "best": cell.best,
        "sou_damping": cell.sou_damping,
        "tuning": cell.tuning,
        "sensitivity": {
            k: {f"{m:.4g}": s for m, s in v.items()} for k, v in cell.sensitivity.items()
        },
        "long": {
            k: {
                **{a: b for a, b in v.items() if a != "runs"},
                "curves": {n: [r.steps, r.train_loss] for n, r in v.get("runs", {}).items()},
            }
            for k, v in cell.long.items()
        },
        "runs": {n: [r.__dict__ for r in rs] for n, rs in cell.results.items()},
        "notes": cell.notes,
    }


def config_json(config: BenchConfig) -> dict:
    """``config`` as JSON values (tuples as lists), for ``bench.json``."""
    return json.loads(json.dumps(config.__dict__))


def config_from_json(values: Mapping) -> BenchConfig:
    """The inverse of :func:`config_json`; unknown keys are an error naming them."""
    known = set(BenchConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"bench config: unknown key(s) {unknown}; known keys: {sorted(known)}")
    fixed = dict(values)
    for name in ("datasets", "networks", "methods", "sou_dampings"):
        if name in fixed:
            fixed[name] = tuple(fixed[name])
    if "grids" in fixed:
        fixed["grids"] = {k: tuple(v) for k, v in fixed["grids"].items()}
    return BenchConfig(**fixed)


def copy_config(config: BenchConfig, **changes) -> BenchConfig:
    """``config`` with ``changes`` applied (validated again)."""
    fields_ = {**config.__dict__, **changes}
    return BenchConfig(**copy.deepcopy(fields_))
