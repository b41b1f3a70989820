"""Meta-training: learn the update nets by truncated back-propagation through time.

One *task* is a freshly initialised trainee network (``small`` by default, at a sampled
width and initialisation scale) trained on random minibatches. The update nets train it
for ``horizon`` steps; every ``unroll`` steps the meta-loss of those steps is
back-propagated into the update nets' weights (truncated BPTT), then parameters and LSTM
state are detached and the next truncation starts. After the horizon a new task is drawn.

Per step ``t`` of an unroll (Andrychowicz et al., 2016, with Roy & Todorovic's curvature):

    θ_t      = θ_{t-1} + update(g_{t-1}, h_{t-1}; LSTM state)     # graph to the nets
    L_t, g_t, h_t = curvature_pass(θ_t)                           # g, h detached
    meta-loss += log L_t  (or L_t)

The gradient and curvature *inputs* are detached (no second derivatives through the
trainee), so the meta-gradient flows through the parameter trajectory and the LSTM state.
The default meta-loss is the mean of ``log L_t``: with the plain sum the first few steps
(loss ≈ 2.3) dominate and late-horizon behaviour goes untrained.

Validation: every ``validate_every`` meta-iterations the current nets train each
validation task (fixed seeds, fixed batches; including ``big`` so that *transfer* is what
is selected for) and the mean log training loss over the run is recorded; the nets with
the best validation score are returned, never those with the best training meta-loss.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .curvature import curvature_pass
from .data import Dataset, batch_sampler
from .errors import ConfigError, NonFiniteError, UnknownNameError
from .features import FeatureSpec, init_state
from .layer_kinds import KINDS, assign
from .networks import build_network, get_network, scale_init
from .optimizer import KindLayout, learned_step
from .update_net import UpdateNet

__all__ = [
    "MetaConfig",
    "MetaResult",
    "Recipe",
    "TaskConfig",
    "UpdateNetConfig",
    "ValidationTask",
    "load_recipe",
    "parse_recipe",
    "meta_train",
    "evaluate_nets",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class TaskConfig:
    """The distribution of training tasks meta-training draws from."""

    network: str = "small"
    dataset: str = "mnist"
    batch_size: int = 128
    widths: tuple[float, ...] = (1.0,)  # channel multipliers, one drawn per task
    init_scale: tuple[float, float] = (1.0, 1.0)  # log-uniform range of weight-init scale
    subset: int = 0  # train each task on a random subset of this many examples (0: all)


@dataclass(frozen=True)
class UpdateNetConfig:
    features: str = "gh"
    hidden_size: int = 20
    num_layers: int = 2
    init_lr: float = 2e-3
    kinds: tuple[str, ...] = KINDS


@dataclass(frozen=True)
class MetaConfig:
    iterations: int = 300  # meta-optimizer steps (one per unroll)
    horizon: int = 200  # steps per task before a fresh one is drawn
    unroll: int = 20  # truncation length
    meta_lr: float = 1e-3
    clip: float = 1.0  # meta-gradient norm clip
    meta_loss: str = "log"  # "log": mean log L_t; "sum": mean L_t
    seed: int = 0
    validate_every: int = 50


@dataclass(frozen=True)
class ValidationTask:
    network: str = "small"
    steps: int = 200
    seeds: tuple[int, ...] = (1000, 1001)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    task: TaskConfig = field(default_factory=TaskConfig)
    update_net: UpdateNetConfig = field(default_factory=UpdateNetConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    validation: tuple[ValidationTask, ...] = (ValidationTask(),)

    def to_dict(self) -> dict:
        return asdict(self)


def _coerce(section: str, cls, raw: dict):
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe section [{section}] must be a table, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(
            f"recipe section [{section}]: unknown key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(known)}"
        )
    defaults = cls()
    values = {}
    for key, value in raw.items():
        default = getattr(defaults, key)
        where = f"[{section}] {key}"
        if isinstance(default, bool | str):
            if not isinstance(value, type(default)):
                raise ConfigError(
                    f"recipe {where} must be a {type(default).__name__}, got {value!r}"
                )
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"recipe {where} must be an integer, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"recipe {where} must be a number, got {value!r}")
            value = float(value)
        elif isinstance(default, tuple):
            if not isinstance(value, list) or not value:
                raise ConfigError(f"recipe {where} must be a non-empty list, got {value!r}")
            kind = type(default[0])
            if kind is float and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value
            ):
                value = [float(v) for v in value]
            elif not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
                raise ConfigError(
                    f"recipe {where} must be a list of {kind.__name__}, got {value!r}"
                )
            value = tuple(value)
        values[key] = value
    return cls(**values)


def parse_recipe(raw: dict) -> Recipe:
    """Build a validated :class:`Recipe` from a parsed TOML document."""
    allowed = {"name", "description", "task", "update_net", "meta", "validation"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(
            f"recipe: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("recipe: `name` (a non-empty string) is required")
    validation = raw.get("validation", [{}])
    if not isinstance(validation, list) or not validation:
        raise ConfigError("recipe: [[validation]] must be a non-empty array of tables")
    recipe = Recipe(
        name=name,
        description=str(raw.get("description", "")),
        task=_coerce("task", TaskConfig, raw.get("task", {})),
        update_net=_coerce("update_net", UpdateNetConfig, raw.get("update_net", {})),
        meta=_coerce("meta", MetaConfig, raw.get("meta", {})),
        validation=tuple(_coerce("validation", ValidationTask, v) for v in validation),
    )
    _validate(recipe)
    return recipe


def _validate(recipe: Recipe) -> None:
    t, u, m = recipe.task, recipe.update_net, recipe.meta
    try:
        get_network(t.network)
        for v in recipe.validation:
            get_network(v.network)
    except UnknownNameError as error:
        raise ConfigError(f"recipe: {error}") from error
    for v in recipe.validation:
        if v.steps < 1:
            raise ConfigError(f"recipe [[validation]] steps must be >= 1, got {v.steps}")
    FeatureSpec(u.features)
    checks = [
        ("task.batch_size", t.batch_size, t.batch_size >= 1, ">= 1"),
        ("task.subset", t.subset, t.subset >= 0, ">= 0"),
        ("task.widths", t.widths, all(w > 0 for w in t.widths), "all > 0"),
        (
            "task.init_scale",
            t.init_scale,
            len(t.init_scale) == 2 and 0 < t.init_scale[0] <= t.init_scale[1],
            "[low, high] with 0 < low <= high",
        ),
        ("update_net.hidden_size", u.hidden_size, u.hidden_size >= 1, ">= 1"),
        ("update_net.num_layers", u.num_layers, u.num_layers >= 1, ">= 1"),
        ("update_net.init_lr", u.init_lr, u.init_lr > 0, "> 0"),
        (
            "update_net.kinds",
            u.kinds,
            set(u.kinds) <= set(KINDS) and len(set(u.kinds)) == len(u.kinds),
            f"distinct values from {KINDS}",
        ),
        ("meta.iterations", m.iterations, m.iterations >= 1, ">= 1"),
        ("meta.unroll", m.unroll, m.unroll >= 1, ">= 1"),
        ("meta.horizon", m.horizon, m.horizon >= m.unroll, ">= meta.unroll"),
        ("meta.meta_lr", m.meta_lr, m.meta_lr > 0, "> 0"),
        ("meta.clip", m.clip, m.clip > 0, "> 0"),
        ("meta.meta_loss", m.meta_loss, m.meta_loss in ("log", "sum"), "'log' or 'sum'"),
        ("meta.validate_every", m.validate_every, m.validate_every >= 1, ">= 1"),
    ]
    for where, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"recipe {where} = {value!r} is invalid; allowed: {allowed}")
    if t.dataset not in ("mnist", "cifar10"):
        raise ConfigError(f"recipe task.dataset = {t.dataset!r}; allowed: mnist, cifar10")


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a TOML recipe; errors name the file and the bad key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"recipe {path} is not valid TOML: {error}") from error
    except OSError as error:
        raise ConfigError(f"cannot read recipe {path}: {error}") from error
    try:
        return parse_recipe(raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


# ---------------------------------------------------------------------- functional training


class _Trainee:
    """A trainee network held as a module plus a name → tensor parameter dict."""

    def __init__(self, network: str, data: Dataset, width: float, init_scale: float, seed: int):
        torch.manual_seed(seed)
        self.module = build_network(network, data.input_shape, data.num_classes, width)
        scale_init(self.module, init_scale)
        self.assignments = assign(self.module, KINDS, other="error")
        self.params = {a.name: a.param.detach().clone() for a in self.assignments}
        self.layouts = {}
        for kind in KINDS:
            members = [a for a in self.assignments if a.route == kind]
            if members:
                self.layouts[kind] = KindLayout.build(
                    [a.name for a in members], [a.param.numel() for a in members]
                )


class _Run:
    """One task in progress: parameters, per-kind states, last gradient/curvature."""

    def __init__(self, trainee: _Trainee, nets: dict[str, UpdateNet], batches: Callable):
        self.trainee = trainee
        self.batches = batches
        self.step = 0
        self.features = {k: init_state(lay.total) for k, lay in trainee.layouts.items()}
        self.lstm = {k: nets[k].init_state(lay.total) for k, lay in trainee.layouts.items()}
        self.last = None  # (loss, grads, hessian) at the current parameters

    def evaluate(self, keep_graph: bool):
        x, y = self.batches(self.step)
        params = {n: p if keep_graph else p.detach() for n, p in self.trainee.params.items()}
        if not keep_graph:
            params = {n: p.requires_grad_(True) for n, p in params.items()}
        result = curvature_pass(self.trainee.module, x, y, params=params, keep_graph=keep_graph)
        self.last = result
        return result

    def advance(self, nets: dict[str, UpdateNet], spec: FeatureSpec) -> None:
        """θ ← θ + update(g, h), keeping the graph to the nets' weights."""
        result = self.last
        new_params = dict(self.trainee.params)
        for kind, layout in self.trainee.layouts.items():
            g = torch.cat([result.grads[n].reshape(-1) for n in layout.names])
            h = (
                torch.cat([result.hessian_diag[n].reshape(-1) for n in layout.names])
                if spec.uses_curvature
                else None
            )
            update, self.features[kind], self.lstm[kind] = learned_step(
                nets[kind], spec, self.features[kind], self.lstm[kind], g, h, layout
            )
            for name, piece in zip(layout.names, layout.split(update), strict=True):
                new_params[name] = new_params[name] + piece.view_as(new_params[name])
        self.trainee.params = new_params
        self.step += 1

    def detach(self) -> None:
        self.trainee.params = {n: p.detach() for n, p in self.trainee.params.items()}
        self.last.loss = self.last.loss.detach()  # release the unroll's graph
        self.lstm = {k: s.detach() for k, s in self.lstm.items()}


def evaluate_nets(
    nets: dict[str, UpdateNet],
    spec: FeatureSpec,
    data: Dataset,
    task: ValidationTask,
    batch_size: int,
) -> list[list[float]]:
    """Train ``task.network`` with the nets for ``task.steps`` on each seed (no meta-grad).

    Returns the minibatch training losses, one list per seed.
    """
    curves = []
    for seed in task.seeds:
        trainee = _Trainee(task.network, data, 1.0, 1.0, seed)
        run = _Run(trainee, nets, batch_sampler(data, batch_size, seed))
        losses = []
        for _ in range(task.steps):
            result = run.evaluate(keep_graph=False)
            losses.append(float(result.loss))
            with torch.no_grad():
                run.advance(nets, spec)
        curves.append(losses)
    return curves


def _score(curves: list[list[float]]) -> float:
    """Mean log training loss over the run: rewards speed and a low final loss alike."""
    values = [math.log(max(v, 1e-12)) for curve in curves for v in curve]
    return sum(values) / len(values) if all(math.isfinite(v) for v in values) else math.inf


# ---------------------------------------------------------------------- the loop


@dataclass
class MetaResult:
    nets: dict[str, UpdateNet]
    recipe: Recipe
    history: list[tuple[int, float]]  # (iteration, meta-loss)
    validation: list[tuple[int, float]]  # (iteration, score; lower is better)
    best_iteration: int
    best_score: float
    seconds: float
    skipped: int = 0


def meta_train(
    recipe: Recipe,
    data: Dataset,
    *,
    progress: Callable[[int, int, float], None] | None = None,
) -> MetaResult:
    """Meta-train update nets as ``recipe`` says; returns the best-validated nets."""
    u, t, m = recipe.update_net, recipe.task, recipe.meta
    spec = FeatureSpec(u.features)
    torch.manual_seed(m.seed)
    nets = {
        kind: UpdateNet(spec.num_features, u.hidden_size, u.num_layers, u.init_lr)
        for kind in u.kinds
    }
    missing = set(KINDS) - set(u.kinds)
    if missing:
        raise ConfigError(
            f"recipe update_net.kinds lacks {sorted(missing)}; zoo nets cover {KINDS}"
        )
    weights = [p for net in nets.values() for p in net.parameters()]
    meta_opt = torch.optim.Adam(weights, lr=m.meta_lr)
    rng = torch.Generator().manual_seed(m.seed)
    started = time.perf_counter()

    def new_run(index: int) -> _Run:
        width = t.widths[int(torch.randint(len(t.widths), (1,), generator=rng))]
        lo, hi = t.init_scale
        scale = math.exp(
            math.log(lo) + (math.log(hi) - math.log(lo)) * float(torch.rand(1, generator=rng))
        )
        seed = m.seed * 100_000 + index
        trainee = _Trainee(t.network, data, width, scale, seed)
        run = _Run(trainee, nets, batch_sampler(data, t.batch_size, seed, t.subset))
        run.evaluate(keep_graph=False)
        return run

    def validate() -> float:
        scores = [
            _score(evaluate_nets(nets, spec, data, v, t.batch_size)) for v in recipe.validation
        ]
        per_task = zip(recipe.validation, scores, strict=True)
        logger.info("validation: %s", ", ".join(f"{v.network} {s:.4f}" for v, s in per_task))
        return sum(scores) / len(scores)

    history, validation = [], []
    best_score = validate()
    best = copy.deepcopy(nets)
    best_iteration = 0
    validation.append((0, best_score))
    logger.info("validation score of the untrained nets (Adam at init_lr): %.4f", best_score)
    runs = 0
    run = new_run(runs)
    skipped = consecutive_bad = 0
    for iteration in range(1, m.iterations + 1):
        if run.step >= m.horizon:
            runs += 1
            run = new_run(runs)
        losses = []
        for _ in range(m.unroll):
            run.advance(nets, spec)
            losses.append(run.evaluate(keep_graph=True).loss)
        stacked = torch.stack(losses)
        meta_loss = torch.log(stacked).mean() if m.meta_loss == "log" else stacked.mean()
        if not torch.isfinite(meta_loss):
            skipped += 1
            consecutive_bad += 1
            logger.warning("non-finite meta-loss at iteration %d; task discarded", iteration)
            if consecutive_bad >= 5:
                raise NonFiniteError(
                    f"meta-training went non-finite {consecutive_bad} times in a row at "
                    f"iteration {iteration}; lower meta.meta_lr or update_net.init_lr"
                )
            runs += 1
            run = new_run(runs)
            continue
        consecutive_bad = 0
        meta_opt.zero_grad()
        meta_loss.backward()
        torch.nn.utils.clip_grad_norm_(weights, m.clip)
        meta_opt.step()
        run.detach()
        history.append((iteration, meta_loss.item()))
        if progress is not None:
            progress(iteration, m.iterations, history[-1][1])
        if iteration % m.validate_every == 0 or iteration == m.iterations:
            score = validate()
            validation.append((iteration, score))
            logger.info(
                "iteration %d: meta-loss %.4f, validation %.4f", iteration, history[-1][1], score
            )
            if score < best_score:
                best_score, best, best_iteration = score, copy.deepcopy(nets), iteration
    return MetaResult(
        nets=best,
        recipe=recipe,
        history=history,
        validation=validation,
        best_iteration=best_iteration,
        best_score=best_score,
        seconds=time.perf_counter() - started,
        skipped=skipped,
    )
