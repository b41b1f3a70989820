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
from .optimizer import KindLayout, layer_name, learned_step
from .update_net import UpdateNet

__all__ = [
    "JointTrainer",
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
    # One net per *layer* of task.network (keyed by module name, e.g. conv1, fc2) instead
    # of one per layer kind: the paper's per-layer LSTMs, meta-trained on the network they
    # will train (validation tasks must then use the same network).
    per_layer: bool = False
    # One net shared by every layer kind (the ablation of "one LSTM per layer kind"); the
    # checkpoint stores it once per kind, with equal weights.
    shared: bool = False


@dataclass(frozen=True)
class MetaConfig:
    iterations: int = 300  # meta-optimizer steps (one per unroll)
    horizon: int = 200  # steps per task before a fresh one is drawn
    # Truncation schedule: task i runs for horizon_schedule[i % len] steps (e.g. [200, 1000,
    # 2000] reaches well past the horizon people train for); empty: every task `horizon`.
    horizon_schedule: tuple[int, ...] = ()
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
            if not isinstance(value, list) or (default and not value):
                raise ConfigError(f"recipe {where} must be a non-empty list, got {value!r}")
            kind = type(default[0]) if default else int  # empty defaults: integer lists
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
    from .checkpoint import MAX_HIDDEN_SIZE, MAX_LAYERS

    for v in recipe.validation:
        if v.steps < 1:
            raise ConfigError(f"recipe [[validation]] steps must be >= 1, got {v.steps}")
        if not all(0 <= s < 2**63 for s in v.seeds):
            raise ConfigError(
                f"recipe [[validation]] seeds = {list(v.seeds)!r} is invalid; "
                "allowed: integers with 0 <= seed < 2**63"
            )
    FeatureSpec(u.features)

    def positive(x: float) -> bool:
        return math.isfinite(x) and x > 0

    checks = [
        ("task.batch_size", t.batch_size, t.batch_size >= 1, ">= 1"),
        ("task.subset", t.subset, t.subset >= 0, ">= 0"),
        ("task.widths", t.widths, all(positive(w) for w in t.widths), "all finite and > 0"),
        (
            "task.init_scale",
            t.init_scale,
            len(t.init_scale) == 2
            and all(positive(s) for s in t.init_scale)
            and t.init_scale[0] <= t.init_scale[1],
            "[low, high] with 0 < low <= high, finite",
        ),
        (
            "update_net.hidden_size",
            u.hidden_size,
            1 <= u.hidden_size <= MAX_HIDDEN_SIZE,
            f"1..{MAX_HIDDEN_SIZE} (what a checkpoint may hold)",
        ),
        (
            "update_net.num_layers",
            u.num_layers,
            1 <= u.num_layers <= MAX_LAYERS,
            f"1..{MAX_LAYERS} (what a checkpoint may hold)",
        ),
        ("update_net.init_lr", u.init_lr, positive(u.init_lr), "finite and > 0"),
        (
            "update_net.kinds",
            u.kinds,
            set(u.kinds) <= set(KINDS) and len(set(u.kinds)) == len(u.kinds),
            f"distinct values from {KINDS}",
        ),
        ("meta.iterations", m.iterations, m.iterations >= 1, ">= 1"),
        ("meta.unroll", m.unroll, m.unroll >= 1, ">= 1"),
        ("meta.horizon", m.horizon, m.horizon >= m.unroll, ">= meta.unroll"),
        (
            "meta.horizon_schedule",
            list(m.horizon_schedule),
            all(h >= m.unroll and h % m.unroll == 0 for h in m.horizon_schedule),
            "every entry a multiple of meta.unroll (tasks end at unroll boundaries)",
        ),
        ("meta.meta_lr", m.meta_lr, positive(m.meta_lr), "finite and > 0"),
        ("meta.clip", m.clip, positive(m.clip), "finite and > 0"),
        ("meta.seed", m.seed, 0 <= m.seed <= 2**40, "0..2**40"),
        ("meta.meta_loss", m.meta_loss, m.meta_loss in ("log", "sum"), "'log' or 'sum'"),
        ("meta.validate_every", m.validate_every, m.validate_every >= 1, ">= 1"),
    ]
    for where, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"recipe {where} = {value!r} is invalid; allowed: {allowed}")
    if u.per_layer and any(v.network != t.network for v in recipe.validation):
        raise ConfigError(
            "recipe update_net.per_layer = true keys nets by the layers of task.network "
            f"({t.network!r}); every [[validation]] network must be {t.network!r}"
        )
    if u.per_layer and u.shared:
        raise ConfigError(
            "recipe update_net.per_layer and update_net.shared are exclusive: one net per "
            "layer, or one net for every layer; set one of them to false"
        )
    if t.dataset not in ("mnist", "cifar10"):
        raise ConfigError(f"recipe task.dataset = {t.dataset!r}; allowed: mnist, cifar10")


def task_horizon(meta: MetaConfig, index: int) -> int:
    """Steps of meta-training task number ``index`` (its truncation schedule, or ``horizon``)."""
    if meta.horizon_schedule:
        return meta.horizon_schedule[index % len(meta.horizon_schedule)]
    return meta.horizon


def longest_horizon(meta: MetaConfig) -> int:
    """The longest task meta-training ran: the checkpoint's recorded horizon."""
    return max(meta.horizon_schedule, default=meta.horizon)


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

    def __init__(
        self,
        network: str,
        data: Dataset,
        width: float,
        init_scale: float,
        seed: int,
        per_layer: bool = False,
    ):
        torch.manual_seed(seed)
        module = build_network(network, data.input_shape, data.num_classes, width)
        scale_init(module, init_scale)
        self._attach(module, per_layer)

    @classmethod
    def from_module(cls, module: torch.nn.Module, per_layer: bool = False) -> _Trainee:
        """Wrap an existing network (joint mode trains the caller's own model)."""
        trainee = cls.__new__(cls)
        trainee._attach(module, per_layer)
        return trainee

    def _attach(self, module: torch.nn.Module, per_layer: bool) -> None:
        self.module = module
        self.assignments = assign(module, KINDS, other="error")
        self.params = {a.name: a.param.detach().clone() for a in self.assignments}
        # Net keys: layer kinds, or (per_layer) the owning modules' names, in model order.
        keys = [layer_name(a) if per_layer else a.route for a in self.assignments]
        self.layouts = {}
        for key in dict.fromkeys(keys):
            members = [a for a, k in zip(self.assignments, keys, strict=True) if k == key]
            self.layouts[key] = KindLayout.build(
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
    per_layer: bool = False,
) -> list[list[float]]:
    """Train ``task.network`` with the nets for ``task.steps`` on each seed (no meta-grad).

    Returns the minibatch training losses, one list per seed.
    """
    curves = []
    for seed in task.seeds:
        trainee = _Trainee(task.network, data, 1.0, 1.0, seed, per_layer)
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
    seconds: float  # this session's
    skipped: int = 0
    total_seconds: float = 0.0  # over all sessions of a resumed run (= seconds without resume)
    commands: tuple[str, ...] = ()  # the command of each session, first to last


def meta_train(
    recipe: Recipe,
    data: Dataset,
    *,
    progress: Callable[[int, int, float], None] | None = None,
    state_dir: str | Path | None = None,
    save_every: int = 0,
    resume: bool = False,
    command: str | None = None,
) -> MetaResult:
    """Meta-train update nets as ``recipe`` says; returns the best-validated nets.

    With ``state_dir`` and ``save_every=K`` the whole loop state is saved there atomically
    after every K-th iteration (:mod:`zoo.meta_state`); ``resume=True`` continues from it,
    and the result equals an uninterrupted run bitwise (CPU). A run that goes non-finite
    stops with a ``NonFiniteError`` naming the layer kind and input feature where it
    started; the last saved state is kept. ``command`` (how this session was started) is
    kept in the state, so a resumed run's result lists every session's command and
    ``total_seconds`` sums their time. A run whose every meta-iteration was non-finite
    raises ``NonFiniteError`` instead of returning the untrained nets.
    """
    from . import meta_state

    if type(save_every) is not int or save_every < 0:
        raise ConfigError(f"save_every must be an integer >= 0, got {save_every!r}")
    if (save_every or resume) and state_dir is None:
        raise ConfigError("save_every and resume need state_dir, the folder of the state")
    u, t, m = recipe.update_net, recipe.task, recipe.meta
    spec = FeatureSpec(u.features)
    if t.subset > len(data.train_y):
        logger.warning(
            "recipe task.subset = %d exceeds the %d training examples of %s; training on all "
            "of them (a warning, not an error)",
            t.subset,
            len(data.train_y),
            data.source,
        )
    torch.manual_seed(m.seed)
    keys = u.kinds
    if u.per_layer:
        keys = tuple(_Trainee(t.network, data, 1.0, 1.0, m.seed, per_layer=True).layouts)
        if len(set(t.widths)) > 1 or t.widths[0] != 1.0:
            logger.warning("per-layer nets: task.widths %s vary the layers' sizes", t.widths)
    if u.shared:
        one = UpdateNet(spec.num_features, u.hidden_size, u.num_layers, u.init_lr)
        nets = dict.fromkeys(keys, one)
    else:
        nets = {
            key: UpdateNet(spec.num_features, u.hidden_size, u.num_layers, u.init_lr)
            for key in keys
        }
    missing = set(KINDS) - set(u.kinds)
    if missing and not u.per_layer:
        raise ConfigError(
            f"recipe update_net.kinds lacks {sorted(missing)}; zoo nets cover {KINDS}"
        )
    # Unique parameters (a shared net appears under every kind).
    weights = list({id(p): p for net in nets.values() for p in net.parameters()}.values())
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
        trainee = _Trainee(t.network, data, width, scale, seed, u.per_layer)
        run = _Run(trainee, nets, batch_sampler(data, t.batch_size, seed, t.subset))
        run.origin = (width, scale, seed)  # how to rebuild it on resume (zoo.meta_state)
        run.evaluate(keep_graph=False)
        return run

    def rebuild_run(width: float, scale: float, seed: int) -> _Run:
        trainee = _Trainee(t.network, data, width, scale, seed, u.per_layer)
        run = _Run(trainee, nets, batch_sampler(data, t.batch_size, seed, t.subset))
        run.origin = (width, scale, seed)
        return run

    def validate() -> float:
        scores = [
            _score(evaluate_nets(nets, spec, data, v, t.batch_size, u.per_layer))
            for v in recipe.validation
        ]
        per_task = zip(recipe.validation, scores, strict=True)
        logger.info("validation: %s", ", ".join(f"{v.network} {s:.4f}" for v, s in per_task))
        return sum(scores) / len(scores)

    start, saved_at = 1, None
    if resume:
        loop = meta_state.load(state_dir, recipe, nets, meta_opt, rng, rebuild_run)
        start = saved_at = loop["start"]
        history, validation = loop["history"], loop["validation"]
        run, runs = loop["run"], loop["runs"]
        best, best_score, best_iteration = loop["best"], loop["best_score"], loop["best_iteration"]
        skipped, consecutive_bad = loop["skipped"], loop["consecutive_bad"]
        elapsed_before, commands = loop["elapsed"], loop["commands"]
    else:
        elapsed_before, commands = 0.0, []
        history, validation = [], []
        best_score = validate()
        best = copy.deepcopy(nets)
        best_iteration = 0
        validation.append((0, best_score))
        logger.info("validation score of the untrained nets (Adam at init_lr): %.4f", best_score)
        runs = 0
        run = new_run(runs)
        skipped = consecutive_bad = 0
    if command:
        commands = [*commands, command]
    first_fault = None
    for iteration in range(start, m.iterations + 1):
        if run.step >= task_horizon(m, runs):
            runs += 1
            run = new_run(runs)
        losses = []
        watch = meta_state.NonFiniteWatch(spec.name)
        for _ in range(m.unroll):
            run.advance(nets, spec)
            losses.append(run.evaluate(keep_graph=True).loss)
            watch.check(run, nets)
        stacked = torch.stack(losses)
        meta_loss = torch.log(stacked).mean() if m.meta_loss == "log" else stacked.mean()
        finite = bool(torch.isfinite(meta_loss))
        if finite:
            meta_opt.zero_grad()
            meta_loss.backward()
            finite = meta_state.finite_gradients(weights)  # before clipping spreads a NaN
        if not finite:
            skipped += 1
            consecutive_bad += 1
            where = watch.describe(run, nets)
            first_fault = first_fault or f"iteration {iteration}: {where}"
            logger.warning(
                "non-finite meta-training at iteration %d (%s); task discarded", iteration, where
            )
            if consecutive_bad >= 5:
                kept = (
                    f"; the last good state (iteration {saved_at - 1}) is kept in {state_dir}"
                    if saved_at
                    else ""
                )
                raise NonFiniteError(
                    f"meta-training went non-finite {consecutive_bad} times in a row; the first "
                    f"at {first_fault}. Lower meta.meta_lr or update_net.init_lr{kept}"
                )
            runs += 1
            run = new_run(runs)
            continue
        consecutive_bad, first_fault = 0, None
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
        if save_every and iteration % save_every == 0:
            names = (
                "nets", "best", "meta_opt", "rng", "run", "runs", "skipped", "consecutive_bad",
                "history", "validation", "best_score", "best_iteration", "started",
                "elapsed_before", "commands",
            )  # fmt: skip
            scope = locals()
            loop = {name: scope[name] for name in names}  # exactly what zoo.meta_state needs
            meta_state.save(state_dir, iteration=iteration, recipe=recipe, loop=loop)
            saved_at = iteration + 1
    if not history:
        raise NonFiniteError(
            f"no meta-iteration succeeded: all {skipped} were non-finite (the first at "
            f"{first_fault}); the nets are untrained. Lower meta.meta_lr or update_net.init_lr"
        )
    seconds = time.perf_counter() - started
    return MetaResult(
        nets=best,
        recipe=recipe,
        history=history,
        validation=validation,
        best_iteration=best_iteration,
        best_score=best_score,
        seconds=seconds,
        skipped=skipped,
        total_seconds=elapsed_before + seconds,
        commands=tuple(commands),
    )


# ---------------------------------------------------------------------- joint mode


class JointTrainer:
    """Train a network and keep meta-training its update nets on it, in one run.

    The paper's reading of learning the CNN and the LSTM together: the update nets train
    ``model`` step by step, and every ``unroll`` steps the meta-loss of those steps (the
    training losses at the parameters the nets produced) is back-propagated into the nets'
    weights, exactly as in :func:`meta_train`'s truncated BPTT. Nothing is ever reset:
    the parameters and the per-coordinate LSTM state are only detached at a truncation,
    so the run is one long task and the nets adapt to the network they are training.

    Args:
        model: the network to train; its parameters are overwritten after every step.
        nets: update nets keyed like :class:`~zoo.optimizer.LearnedOptimizer`'s (layer
            kinds, or layer names with ``per_layer``); they are trained in place, so pass
            copies to keep the originals.
        features: the nets' feature set.
        unroll: steps per truncation (one meta-update each).
        meta_lr: learning rate of the Adam meta-optimizer.
        clip: meta-gradient norm clip.
        meta_loss: ``"log"`` (mean log loss) or ``"sum"`` (mean loss), as in recipes.

    Use :meth:`train_step` in place of ``zero_grad`` / backward / ``step``; it returns the
    minibatch loss at the parameters before the step. ``zoo.train.train_run`` recognises
    the method, so a :class:`~zoo.train.Method` whose factory returns a ``JointTrainer``
    runs in ``compare`` beside the ordinary optimizers.

    Example:
        >>> trainer = JointTrainer(model, zoo.load("lstm2-gh-mnist-small").nets, spec)
        >>> for step in range(1, 1001):
        ...     loss = trainer.train_step(*batches(step))
    """

    def __init__(
        self,
        model: torch.nn.Module,
        nets: dict[str, UpdateNet],
        features: FeatureSpec,
        *,
        unroll: int = 20,
        meta_lr: float = 1e-3,
        clip: float = 1.0,
        meta_loss: str = "log",
        per_layer: bool = False,
    ):
        if unroll < 1:
            raise ConfigError(f"JointTrainer: unroll must be >= 1, got {unroll}")
        if not meta_lr > 0:
            raise ConfigError(f"JointTrainer: meta_lr must be > 0, got {meta_lr}")
        if not clip > 0:
            raise ConfigError(f"JointTrainer: clip must be > 0, got {clip}")
        if meta_loss not in ("log", "sum"):
            raise ConfigError(f"JointTrainer: meta_loss must be 'log' or 'sum', got {meta_loss!r}")
        self.model = model
        self.nets = nets
        self.spec = features
        self.unroll, self.clip, self.meta_loss = unroll, clip, meta_loss
        self.trainee = _Trainee.from_module(model, per_layer)
        missing = sorted(set(self.trainee.layouts) - set(nets))
        if missing:
            raise ConfigError(f"JointTrainer: no update net for {missing}; nets: {sorted(nets)}")
        for net in nets.values():
            net.requires_grad_(True)
        self._weights = [p for net in nets.values() for p in net.parameters()]
        self.meta_optimizer = torch.optim.Adam(self._weights, lr=meta_lr)
        self._batch = None
        self._run = _Run(self.trainee, nets, lambda step: self._batch)
        self._losses: list[torch.Tensor] = []  # this truncation's losses, graph to the nets
        self.meta_updates = 0
        self.skipped_meta_updates = 0
        self.skipped_steps = 0  # read by train_run like LearnedOptimizer's
        self.history: list[float] = []  # meta-loss of every meta-update

    def train_step(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One training step of the model; a meta-update of the nets every ``unroll``."""
        self._batch = (inputs, target)
        in_unroll = bool(self._run.step) and len(self._losses) < self.unroll
        result = self._run.evaluate(keep_graph=in_unroll)
        if in_unroll:
            self._losses.append(result.loss)
        if len(self._losses) == self.unroll:
            self._meta_update()
        self._run.advance(self.nets, self.spec)
        with torch.no_grad():
            for a in self.trainee.assignments:
                a.param.copy_(self.trainee.params[a.name])
        return result.loss.detach()

    def _meta_update(self) -> None:
        stacked = torch.stack(self._losses)
        meta_loss = torch.log(stacked).mean() if self.meta_loss == "log" else stacked.mean()
        if torch.isfinite(meta_loss):
            self.meta_optimizer.zero_grad()
            meta_loss.backward()
            torch.nn.utils.clip_grad_norm_(self._weights, self.clip)
            self.meta_optimizer.step()
            self.meta_updates += 1
            self.history.append(meta_loss.item())
        else:
            self.skipped_meta_updates += 1
            logger.warning("joint mode: non-finite meta-loss; meta-update skipped")
        self._run.detach()
        self._losses = []
