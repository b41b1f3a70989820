"""The training loop that ``zoo transfer`` (and the benchmarks) share.

Fair comparison is built in: for a given seed every method starts from the same
initialisation (the network is built once under ``torch.manual_seed(seed)`` and copied)
and sees the same minibatches (:func:`zoo.data.batch_sampler`). The training loss is
measured on a fixed subset of the training split (the objective the optimizers minimise,
without minibatch noise); test accuracy on the test split at the end.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import curvature
from .data import Dataset, batch_sampler
from .errors import ConfigError, NonFiniteError
from .networks import build_network

__all__ = ["Method", "RunRecord", "compare", "eval_points", "summarise", "train_run", "tune_lr"]

logger = logging.getLogger(__name__)

EVAL_SUBSET = 2048  # training examples the reported training loss is measured on


@dataclass(frozen=True)
class Method:
    """An optimizer to compare: a name, a factory and whether it needs the curvature pass."""

    name: str
    make: Callable[[nn.Module], torch.optim.Optimizer]
    needs_curvature: bool = False


@dataclass
class RunRecord:
    method: str
    seed: int
    steps: list[int]
    train_loss: list[float]
    test_accuracy: float
    seconds: float
    skipped_steps: int = 0
    extra: dict = field(default_factory=dict)


REPORT_STEPS = (10, 25, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def eval_points(steps: int, count: int = 20) -> list[int]:
    """Steps at which the training loss is measured.

    0, ``count`` evenly spaced steps, the round numbers of ``REPORT_STEPS`` (the table's
    columns) up to ``steps``, and ``steps`` itself.
    """
    every = max(1, steps // count)
    rounds = (s for s in REPORT_STEPS if s <= steps)
    return sorted({0, steps, *range(every, steps + 1, every), *rounds})


@torch.no_grad()
def _loss_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> float:
    total = 0.0
    for i in range(0, len(y), chunk):
        total += F.cross_entropy(model(x[i : i + chunk]), y[i : i + chunk], reduction="sum").item()
    return total / len(y)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> float:
    correct = 0
    for i in range(0, len(y), chunk):
        correct += (model(x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum().item()
    return correct / len(y)


def initial_network(network: str, data: Dataset, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_network(network, data.input_shape, data.num_classes)


def train_run(
    model: nn.Module,
    data: Dataset,
    method: Method,
    *,
    steps: int,
    seed: int,
    batch_size: int = 128,
    eval_examples: int = EVAL_SUBSET,
    test_examples: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> RunRecord:
    """Train ``model`` (modified in place) with ``method`` for ``steps`` minibatches.

    The training loss is measured on the first ``eval_examples`` training examples at
    :func:`eval_points`; test accuracy on the first ``test_examples`` (default: all).
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    optimizer = method.make(model)
    batches = batch_sampler(data, batch_size, seed)
    eval_x, eval_y = data.train_x[:eval_examples], data.train_y[:eval_examples]
    test_x, test_y = data.test_x[:test_examples], data.test_y[:test_examples]
    points = set(eval_points(steps))
    record_steps, losses = [0], [_loss_on(model, eval_x, eval_y)]
    started = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        x, y = batches(step)
        optimizer.zero_grad(set_to_none=True)
        if method.needs_curvature:
            loss = curvature.backward(model, x, y)
        else:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        if not math.isfinite(loss.item()):
            raise NonFiniteError(
                f"{method.name}: the training loss became {loss.item()} at step {step} (seed "
                f"{seed}); lower the learning rate"
            )
        optimizer.step()
        if step in points:
            record_steps.append(step)
            losses.append(_loss_on(model, eval_x, eval_y))
        if progress is not None:
            progress(1)
    seconds = time.perf_counter() - started
    return RunRecord(
        method=method.name,
        seed=seed,
        steps=record_steps,
        train_loss=losses,
        test_accuracy=accuracy(model, test_x, test_y),
        seconds=seconds,
        skipped_steps=getattr(optimizer, "skipped_steps", 0),
    )


def adam(lr: float) -> Method:
    return Method(f"Adam lr={lr:g}", lambda model: torch.optim.Adam(model.parameters(), lr=lr))


def tune_lr(
    network: str,
    data: Dataset,
    make: Callable[[float], Method],
    grid: Sequence[float],
    *,
    steps: int,
    seed: int,
    progress: Callable[[int], None] | None = None,
    **run_options,
) -> tuple[float, dict[float, float]]:
    """Pick the learning rate with the lowest final training loss on a *tuning* seed.

    The tuning seed should differ from the seeds that are reported, so the reported
    comparison is not tuned on its own noise. A diverged run scores ``inf``.
    """
    scores = {}
    for lr in grid:
        model = initial_network(network, data, seed)
        try:
            record = train_run(
                model,
                data,
                make(lr),
                steps=steps,
                seed=seed,
                progress=progress,
                **run_options,
            )
            scores[lr] = record.train_loss[-1]
        except NonFiniteError:
            scores[lr] = math.inf
    best = min(scores, key=lambda lr: (scores[lr], lr))
    return best, scores


def compare(
    network: str,
    data: Dataset,
    methods: Sequence[Method],
    *,
    steps: int,
    seeds: Sequence[int],
    progress: Callable[[int], None] | None = None,
    **run_options,
) -> dict[str, list[RunRecord]]:
    """Every method on every seed, from the same initialisation and batches per seed."""
    results: dict[str, list[RunRecord]] = {m.name: [] for m in methods}
    for seed in seeds:
        start = initial_network(network, data, seed)
        for method in methods:
            model = copy.deepcopy(start)
            results[method.name].append(
                train_run(
                    model,
                    data,
                    method,
                    steps=steps,
                    seed=seed,
                    progress=progress,
                    **run_options,
                )
            )
    return results


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def steps_to_reach(record_steps: list[int], curve: list[float], target: float) -> int | None:
    for step, value in zip(record_steps, curve, strict=True):
        if value <= target:
            return step
    return None


def summarise(
    results: dict[str, list[RunRecord]], report_steps: Sequence[int]
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: mean ± sd training loss at ``report_steps`` and test accuracy."""
    header = ["method", *[f"loss@{s}" for s in report_steps], "test acc %", "s/run"]
    rows = []
    for name, records in results.items():
        row = [name]
        for s in report_steps:
            values = [r.train_loss[r.steps.index(s)] for r in records if s in r.steps]
            if values:
                mean, sd = _mean_sd(values)
                row.append(f"{mean:.4f} ± {sd:.4f}")
            else:
                row.append("-")
        mean, sd = _mean_sd([100 * r.test_accuracy for r in records])
        row.append(f"{mean:.2f} ± {sd:.2f}")
        row.append(f"{statistics.fmean(r.seconds for r in records):.1f}")
        rows.append(row)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(results: dict[str, list[RunRecord]], path, title: str) -> None:
    """PNG of mean training loss (log scale) against steps, with the seed range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, records in results.items():
        steps = records[0].steps
        curves = torch.tensor([r.train_loss for r in records])
        mean = curves.mean(0)
        ax.plot(steps, mean, label=name, linewidth=2 if "zoo" in name else 1.2)
        if len(records) > 1:
            ax.fill_between(steps, curves.min(0).values, curves.max(0).values, alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (fixed subset of the training split)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
