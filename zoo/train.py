"""The training loop that ``zoo transfer`` (and the benchmarks) share.

Fair comparison is built in: for a given seed every method starts from the same
initialisation (the network is built once under ``torch.manual_seed(seed)`` and copied)
and sees the same minibatches (:func:`zoo.data.batch_sampler`). The training loss is
measured on a fixed subset of the training split (the objective the optimizers minimise,
without minibatch noise); test accuracy on the test split at the end.

At scale the same loop runs on a streaming :class:`zoo.data.ImageFolderData` (ImageNet):
batches come from its multi-worker DataLoader in an order fixed by the seed, and the loss
and accuracy are measured on the first examples of its evaluation split (deterministic
transforms; augmented training images would make the curve noisy). ``device`` (default:
CUDA when available) and ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``) choose where
and how forward and backward run: autocast in the half type, and for fp16 a dynamic loss
scale (:class:`LossScaler`) under which both the gradient and the second derivative are
unscaled before any optimizer reads them and a step with inf/NaN is skipped. Optimizers
always run in fp32. Under ``torch.distributed`` each rank draws its own batches.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import curvature, distributed
from .data import Dataset, ImageFolderData, batch_sampler
from .errors import ConfigError, NonFiniteError
from .networks import build_network

__all__ = [
    "PRECISIONS",
    "REPORT_SEED_BASE",
    "report_seeds",
    "LossScaler",
    "Method",
    "RunRecord",
    "compare",
    "eval_points",
    "resolve_device",
    "summarise",
    "train_run",
    "tune_lr",
]

logger = logging.getLogger(__name__)

EVAL_SUBSET = 2048  # training examples the reported training loss is measured on
# Seeds of reported runs (initialisation and batch order). Meta-training draws its tasks
# from seeds meta.seed * 100_000 + 0, 1, 2, ..., the shipped recipes select checkpoints on
# seed 1000 and learning rates are tuned on 10_000: reported runs use 20_000, 20_001, ...
# so that no reported initialisation or batch order was seen while meta-training,
# selecting a checkpoint or tuning.
REPORT_SEED_BASE = 20_000


def report_seeds(count: int) -> range:
    """The seeds of ``count`` reported runs (see ``REPORT_SEED_BASE``)."""
    return range(REPORT_SEED_BASE, REPORT_SEED_BASE + count)


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


def initial_network(network: str, data: Dataset | ImageFolderData, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_network(network, data.input_shape, data.num_classes)


# ---------------------------------------------------------------------- devices, precision

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"unknown device {device!r}: {error}") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here")
    return resolved


class LossScaler:
    """Dynamic loss scaling for fp16, as ``torch.amp.GradScaler`` does it, for both
    the gradient and the second derivative.

    The loss is multiplied by :attr:`scale` before differentiating; gradients and second
    derivatives come back multiplied by it too and are divided before use. A step whose
    unscaled values hold inf/NaN is skipped and halves the scale; ``growth_interval``
    clean steps in a row double it. Constants are GradScaler's defaults.
    """

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 2000, enabled: bool = True):
        self.enabled = enabled
        self.scale = float(scale) if enabled else 1.0
        self.growth_interval = growth_interval
        self._clean = 0
        self.skipped = 0

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            self.scale *= 0.5
            self._clean = 0
            self.skipped += 1
            return
        self._clean += 1
        if self._clean == self.growth_interval:
            self.scale *= 2.0
            self._clean = 0


def _backward(model, optimizer, method, x, y, autocast, scaler: LossScaler):
    """Forward, loss and (curvature) backward under ``autocast``; returns the loss."""
    wants = getattr(optimizer, "wants_curvature", None)
    with autocast():
        if method.needs_curvature and (wants is None or wants()):
            options = {"loss_scale": scaler.scale} if scaler.scale != 1.0 else {}
            return curvature.backward(model, x, y, **options)
        loss = F.cross_entropy(model(x), y)
    (loss * scaler.scale if scaler.scale != 1.0 else loss).backward()
    return loss


def _optimizer_step(optimizer, scaler: LossScaler) -> None:
    """``optimizer.step()`` on unscaled, rank-averaged gradients; skips (and backs off) on inf."""
    if hasattr(optimizer, "loss_scale"):  # LearnedOptimizer: unscales and averages g and h
        optimizer.loss_scale = scaler.scale
        before = optimizer.skipped_steps
        optimizer.step()
        scaler.update(optimizer.skipped_steps > before)
        return
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if scaler.enabled:
        torch._foreach_div_(grads, scaler.scale)
    distributed.average_(grads)
    finite = not scaler.enabled or all(bool(torch.isfinite(g).all()) for g in grads)
    if finite:
        optimizer.step()
    scaler.update(not finite)


def _training_batches(data, batch_size: int, seed: int, steps: int, device: torch.device):
    """``step -> (inputs, labels)`` on ``device``; each distributed rank gets its own."""
    rank = distributed.rank()
    if isinstance(data, ImageFolderData):
        loader = iter(data.loader("train", batch_size, seed, samples=batch_size * steps, rank=rank))

        def streamed(step: int):
            x, y = next(loader)
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

        return streamed
    # Rank 0 keeps the single-process batches; other ranks shift the seed.
    sample = batch_sampler(data, batch_size, seed + 1_000_033 * rank)
    if device.type == "cpu":
        return sample
    return lambda step: tuple(t.to(device, non_blocking=True) for t in sample(step))


class _Evaluator:
    """Training loss on a fixed subset, and test accuracy, on either kind of dataset."""

    def __init__(self, data, eval_examples: int, test_examples: int | None, device, autocast):
        self.device, self.autocast = device, autocast
        if isinstance(data, ImageFolderData):
            # Streaming data: both on the evaluation split, deterministic transforms.
            self.loss_batches = data.loader("eval", 64, 0, samples=eval_examples)
            self.test_batches = data.loader("eval", 64, 0, samples=test_examples)
        else:
            x, y = data.train_x[:eval_examples], data.train_y[:eval_examples]
            tx, ty = data.test_x[:test_examples], data.test_y[:test_examples]
            self.loss_batches = [(x[i : i + 1024], y[i : i + 1024]) for i in range(0, len(y), 1024)]
            self.test_batches = [
                (tx[i : i + 1024], ty[i : i + 1024]) for i in range(0, len(ty), 1024)
            ]

    @torch.no_grad()
    def _sum(self, model, batches, score) -> float:
        total, count = 0.0, 0
        for x, y in batches:
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast():
                out = model(x)
            total += score(out.float(), y)
            count += len(y)
        return total / max(count, 1)

    def loss(self, model) -> float:
        return self._sum(
            model,
            self.loss_batches,
            lambda out, y: F.cross_entropy(out, y, reduction="sum").item(),
        )

    def accuracy(self, model) -> float:
        return self._sum(model, self.test_batches, lambda out, y: (out.argmax(1) == y).sum().item())


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
    track_test: bool = False,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> RunRecord:
    """Train ``model`` (modified in place) with ``method`` for ``steps`` minibatches.

    The training loss is measured on the first ``eval_examples`` training examples at
    :func:`eval_points`; test accuracy on the first ``test_examples`` (default: all).
    ``track_test``: also record, at every eval point, the test accuracy
    (``extra["test_accuracy"]``) and the training seconds so far, evaluation excluded
    (``extra["train_seconds"]``) — what ``zoo bench``'s accuracy-vs-steps and
    fixed-wall-clock-budget metrics read.

    An optimizer with a ``train_step(inputs, labels) -> loss`` method (joint mode,
    :class:`zoo.meta.JointTrainer`) runs the whole step itself.

    ``device`` (default: CUDA if available) receives the model before the optimizer is
    made; ``precision`` is ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see the module docstring).
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = resolve_device(device)
    model.to(device)
    half = PRECISIONS[precision]
    autocast = functools.partial(torch.autocast, device.type, half, enabled=half is not None)
    scaler = LossScaler(enabled=precision == "fp16")
    optimizer = method.make(model)
    batches = _training_batches(data, batch_size, seed, steps, device)
    evaluate = _Evaluator(data, eval_examples, test_examples, device, autocast)
    points = set(eval_points(steps))
    record_steps, losses = [0], [evaluate.loss(model)]
    test_curve, train_seconds = [evaluate.accuracy(model)] if track_test else [], [0.0]
    started = time.perf_counter()
    training = 0.0  # seconds spent in steps, evaluation excluded
    joint = hasattr(optimizer, "train_step")
    model.train()
    for step in range(1, steps + 1):
        tick = time.perf_counter()
        x, y = batches(step)
        if joint:
            loss = optimizer.train_step(x, y)
        else:
            optimizer.zero_grad(set_to_none=True)
            loss = _backward(model, optimizer, method, x, y, autocast, scaler)
        if not math.isfinite(loss.item()):
            raise NonFiniteError(
                f"{method.name}: the training loss became {loss.item()} at step {step} (seed "
                f"{seed}); lower the learning rate"
            )
        if not joint:
            _optimizer_step(optimizer, scaler)
        training += time.perf_counter() - tick
        if step in points:
            record_steps.append(step)
            losses.append(evaluate.loss(model))
            if track_test:
                test_curve.append(evaluate.accuracy(model))
                train_seconds.append(training)
        if progress is not None:
            progress(1)
    seconds = time.perf_counter() - started
    extra = {"test_accuracy": test_curve, "train_seconds": train_seconds} if track_test else {}
    return RunRecord(
        method=method.name,
        seed=seed,
        steps=record_steps,
        train_loss=losses,
        test_accuracy=evaluate.accuracy(model),
        seconds=seconds,
        skipped_steps=max(getattr(optimizer, "skipped_steps", 0), scaler.skipped),
        extra=extra,
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
