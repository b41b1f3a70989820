"""``LearnedOptimizer``: a ``torch.optim.Optimizer`` driven by per-layer-kind update nets.

The class is thin: it routes each parameter to the update net of its layer kind
(:mod:`zoo.layer_kinds`), owns the per-coordinate state in one flat buffer per kind, and
calls :func:`learned_step`, the pure function that meta-training unrolls too.

Use it with the curvature pass, which stores each parameter's second derivative:

    >>> opt = zoo.load("lstm2-mnist-small").attach(model)
    >>> opt.zero_grad()
    >>> loss = zoo.curvature.backward(model, inputs, target)
    >>> opt.step()
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import distributed
from .curvature import curvature_mode_of, hessian_diag_of
from .errors import CheckpointError, ConfigError
from .fast_update import FusedUpdateNet, UpdateOptions, fast_learned_step
from .features import FeatureSpec, FeatureState, compute_features, init_state
from .layer_kinds import KINDS, Assignment, assign
from .update_net import UpdateNet

__all__ = ["KindLayout", "LearnedOptimizer", "layer_name", "learned_step", "route_per_layer"]

logger = logging.getLogger(__name__)

STATE_FORMAT = "zoo.LearnedOptimizer/2"
_OLD_STATE_FORMAT = "zoo.LearnedOptimizer/1"  # one Adam "fallback"; still loads
# Momentum of the ``sgd`` baseline (the usual choice for SGD on vision networks).
SGD_MOMENTUM = 0.9


def layer_name(assignment: Assignment) -> str:
    """The owning module's name (``"conv1"`` for ``conv1.weight``): the key of per-layer nets."""
    return assignment.name.rpartition(".")[0] or assignment.name


def route_per_layer(
    assignments: list[Assignment], layers: set[str], other: str
) -> list[Assignment]:
    """Re-route conv/fc parameters to the net of their own layer (``per_layer`` nets).

    A conv/fc layer without a net, and every ``other``-kind parameter, go to Adam under
    ``other="adam"``; under ``other="error"`` either is refused.
    """
    routed = []
    for a in assignments:
        key = layer_name(a)
        if a.kind in KINDS and key in layers:
            routed.append(dataclasses.replace(a, route=key))
        elif other == "error":
            raise ConfigError(
                f"no per-layer update net for {a.name} (layer {key!r}); the nets cover "
                f"{sorted(layers)}; pass other='adam'"
            )
        else:
            routed.append(dataclasses.replace(a, route="adam"))
    unnetted = sorted({layer_name(a) for a in routed if a.kind in KINDS and a.route == "adam"})
    if unnetted:
        logger.warning("per-layer nets: no net for layer(s) %s; Adam takes them", unnetted)
    return routed


def learned_step(
    net: UpdateNet,
    spec: FeatureSpec,
    features_state: FeatureState,
    lstm_state: Tensor,
    grad: Tensor,
    hess: Tensor | None,
    layout: KindLayout,
) -> tuple[Tensor, FeatureState, Tensor]:
    """One update for ``N`` flat coordinates of one layer kind.

    Returns ``(update, new_features_state, new_lstm_state)``; the update carries a graph
    to ``net``'s weights when called with grad enabled (meta-training), none otherwise.
    """
    with torch.no_grad():
        feats, adam_dir, features_state = compute_features(
            spec, features_state, grad, hess, layout.segments, layout.counts
        )
    outputs, lstm_state = net(feats, lstm_state)
    return net.update(outputs, adam_dir, feats[:, 0]), features_state, lstm_state


@dataclass
class KindLayout:
    """Where each parameter of one layer kind lives in the flat coordinate vector."""

    names: list[str]
    sizes: list[int]
    segments: Tensor  # (N,) long: index of the parameter each coordinate belongs to
    counts: Tensor  # (P,) float: number of coordinates of each parameter

    @classmethod
    def build(cls, names: list[str], sizes: list[int], device=None) -> KindLayout:
        segments = torch.repeat_interleave(
            torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device)
        )
        counts = torch.tensor([max(s, 1) for s in sizes], dtype=torch.float32, device=device)
        return cls(list(names), list(sizes), segments, counts)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def split(self, flat: Tensor) -> list[Tensor]:
        return list(torch.split(flat, self.sizes))


@dataclass
class _KindState:
    layout: KindLayout
    params: list[nn.Parameter]
    features: FeatureState
    lstm: Tensor


class LearnedOptimizer(torch.optim.Optimizer):
    """Optimizer whose update is computed by meta-trained update nets, one per layer kind.

    Args:
        model: the network to train; parameters are named and routed from its modules.
        nets: ``{"conv": UpdateNet, "fc": UpdateNet}`` (a checkpoint's nets).
        features: the feature set the nets were trained with.
        other: policy for parameters of other layer kinds (see :mod:`zoo.layer_kinds`): a
            route (``"adam"``, ``"sgd"``, ``"conv"``, ``"fc"``, ``"error"``) or a mapping
            from layer family (``"embedding"``, ``"norm"``, ...) to route.
        other_lr: learning rate of the baseline (``torch.optim.Adam``, or ``SGD`` with
            momentum 0.9) that takes the parameters routed to ``"adam"`` / ``"sgd"``.
        curvature_mode: the curvature mode the nets were meta-trained with (a checkpoint's
            ``curvature.mode``); the first step whose second derivatives come from another
            mode warns (``UserWarning``), since the nets then see inputs of another
            distribution. A warning, not an error: checking with ``mode="exact"`` is
            legitimate.
        per_layer: ``nets`` are keyed by layer (module) name, one net per layer of one
            network (meta-trained directly on it), instead of by layer kind.
        options: how the nets are evaluated at scale (:class:`zoo.fast_update.UpdateOptions`:
            chunked fused LSTM, bf16 LSTM state, second derivative every k steps); the
            default is the one-shot path meta-training uses. :meth:`configure` changes it.

    Mixed precision: a loop that scales the loss sets :attr:`loss_scale`; the gradient and
    the second derivative (which scales with the loss too) are divided by it before use.
    Under ``torch.distributed`` (world size > 1) both are averaged across ranks, so every
    rank takes the same step and holds the same LSTM state (see :mod:`zoo.distributed`).

    ``state_dict()`` is keyed by parameter name; ``load_state_dict`` checks names and
    shapes and names any mismatch. Steps whose gradient or second derivative holds NaN or
    inf are skipped (state unchanged) and counted in ``skipped_steps``.

    Awkward parameters: frozen ones (``grad is None``) are skipped and their state does not
    advance; zero-element ones are no-ops; bf16/fp16 ones get fp32 features and state and
    their update cast back to their dtype; a sparse gradient is refused (``ConfigError``);
    the parameters of one update net must share a device (the baselines need not).
    """

    def __init__(
        self,
        model: nn.Module,
        nets: Mapping[str, UpdateNet],
        features: FeatureSpec,
        *,
        other: str = "adam",
        other_lr: float = 1e-3,
        curvature_mode: str | None = None,
        per_layer: bool = False,
        options: UpdateOptions | None = None,
    ):
        if not (isinstance(other_lr, int | float) and math.isfinite(other_lr) and other_lr > 0):
            raise ConfigError(f"other_lr must be a finite number > 0, got {other_lr!r}")
        self.nets = dict(nets)
        self.features = features
        self.per_layer = per_layer
        if per_layer:
            if other not in ("adam", "error"):
                raise ConfigError(f"per-layer nets take other='adam' or 'error', got {other!r}")
            self.assignments: list[Assignment] = route_per_layer(
                assign(model, KINDS, "adam"), set(self.nets), other
            )
        else:
            self.assignments = assign(model, tuple(self.nets), other)
        if not self.assignments:
            raise ConfigError("the model has no trainable parameters to optimise")
        groups = []
        for route in sorted({a.route for a in self.assignments}):
            members = [a for a in self.assignments if a.route == route]
            groups.append({"params": [a.param for a in members], "route": route})
        super().__init__(groups, defaults={})
        for net in self.nets.values():
            net.requires_grad_(False)
        self._kinds: dict[str, _KindState] = {}
        self._baselines: dict[str, torch.optim.Optimizer] = {}
        for group in self.param_groups:
            members = [a for a in self.assignments if a.route == group["route"]]
            if group["route"] == "adam":
                self._baselines["adam"] = torch.optim.Adam(group["params"], lr=other_lr)
                continue
            if group["route"] == "sgd":
                self._baselines["sgd"] = torch.optim.SGD(
                    group["params"], lr=other_lr, momentum=SGD_MOMENTUM
                )
                continue
            devices = sorted({str(a.param.device) for a in members})
            if len(devices) > 1:
                where = ", ".join(
                    f"{a.name} on {a.param.device}"
                    for a in members
                    if str(a.param.device) != str(members[0].param.device)
                )
                raise ConfigError(
                    f"the {group['route']} update net's parameters are on several devices "
                    f"({', '.join(devices)}: {where}, the rest on {members[0].param.device}); "
                    "move the model to one device first, or route the others to a baseline "
                    "with other={family: 'adam'}"
                )
            device = members[0].param.device
            layout = KindLayout.build(
                [a.name for a in members], [a.param.numel() for a in members], device
            )
            self._kinds[group["route"]] = _KindState(
                layout,
                [a.param for a in members],
                init_state(layout.total, device),
                self.nets[group["route"]].to(device).init_state(layout.total, device),
            )
        self.skipped_steps = 0
        self.loss_scale = 1.0  # set by a mixed-precision loop: g and h arrive multiplied by it
        self._hessians: dict[tuple, Tensor] = {}  # last second derivative (hessian_every > 1)
        self._updates = 0  # steps taken (not skipped), for hessian_every
        self.configure(options or UpdateOptions())
        self.curvature_mode = curvature_mode
        self._mode_warned = False

    # ------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer's contract
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._refuse_sparse()
        plans = []
        finite = True
        for route, ks in self._kinds.items():
            active = [i for i, p in enumerate(ks.params) if p.grad is not None and p.numel()]
            if not active:
                continue
            grads, hessians = [], []
            for i in active:
                p, name = ks.params[i], ks.layout.names[i]
                grads.append(p.grad.reshape(-1).float())
                if self.features.uses_curvature and self.wants_curvature():
                    hessians.append(hessian_diag_of(p, name).reshape(-1).float())
                    self._check_mode(p, name)
            g = torch.cat(grads)
            h = torch.cat(hessians) if hessians else None
            g, h = self._prepare(route, active, g, h)
            finite &= bool(torch.isfinite(g).all()) and (h is None or bool(torch.isfinite(h).all()))
            plans.append((route, ks, active, g, h))
        finite &= self._prepare_baselines()
        if not finite:
            self.skipped_steps += 1
            logger.warning(
                "skipped a step: the gradient or second derivative holds NaN/inf "
                "(%d skipped so far); optimizer state is unchanged",
                self.skipped_steps,
            )
            return loss
        for route, ks, active, g, h in plans:
            self._step_kind(self.nets[route], ks, active, g, h)
        for baseline in self._baselines.values():
            baseline.step()
        self._updates += 1
        return loss

    # ------------------------------------------------------------------ scale

    def configure(self, options: UpdateOptions) -> None:
        """Switch how the update nets are evaluated (state is kept, cast if needed)."""
        self.options = options
        for ks in self._kinds.values():
            ks.lstm = ks.lstm.to(options.state_dtype)
        self._fused = (
            {
                id(n): FusedUpdateNet(n, options.chunk_size, options.compile)
                for n in self.nets.values()
            }
            if options.fast
            else {}
        )

    def wants_curvature(self) -> bool:
        """Whether the next step reads a fresh second derivative (``hessian_every``)."""
        return self.features.uses_curvature and self._updates % self.options.hessian_every == 0

    def _prepare(self, route: str, active: list[int], g: Tensor, h: Tensor | None):
        """Unscale, average across ranks, and reuse the last ``h`` between refreshes."""
        if self.loss_scale != 1.0:
            g = g / self.loss_scale
            h = None if h is None else h / self.loss_scale
        g, h = distributed.average_gradients(g, h)
        if self.features.uses_curvature:
            key = (route, tuple(active))
            if h is None:
                h = self._hessians.get(key)
                if h is None:
                    raise ConfigError(
                        f"hessian_every={self.options.hessian_every}: no second derivative "
                        "cached yet for these parameters; compute one with zoo.curvature"
                    )
            elif self.options.hessian_every > 1:
                self._hessians[key] = h
        return g, h

    def _prepare_baselines(self) -> bool:
        """Unscale and average the baselines' gradients in place; are they finite?"""
        grads = [
            p.grad
            for baseline in self._baselines.values()
            for group in baseline.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not grads:
            return True
        if self.loss_scale != 1.0:
            torch._foreach_div_(grads, self.loss_scale)
        distributed.average_(grads)
        return all(bool(torch.isfinite(g).all()) for g in grads)

    def _learned_step(self, net, spec, features_state, lstm, g, h, layout):
        if not self.options.fast:
            return learned_step(net, spec, features_state, lstm, g, h, layout)
        return fast_learned_step(
            self._fused[id(net)], spec, features_state, lstm, g, h, layout.segments, layout.counts
        )

    def _refuse_sparse(self) -> None:
        """Refuse sparse gradients before anything moves (neither the nets nor the
        baselines' dense Adam/SGD state can take them)."""
        sparse = [
            a.name
            for a in self.assignments
            if a.param.grad is not None and (a.param.grad.is_sparse or a.param.grad.is_sparse_csr)
        ]
        if sparse:
            raise ConfigError(
                f"{', '.join(sparse)} {'has a' if len(sparse) == 1 else 'have'} sparse "
                "gradient(s); zoo needs dense gradients: build the embedding with "
                "sparse=False, or optimise it separately with torch.optim.SparseAdam"
            )

    def _check_mode(self, p: Tensor, name: str) -> None:
        used = curvature_mode_of(p)
        if self._mode_warned or self.curvature_mode is None or used in (None, self.curvature_mode):
            return
        self._mode_warned = True
        warnings.warn(
            f"{name}'s second derivative comes from curvature mode {used!r}, but the update "
            f"nets were meta-trained with {self.curvature_mode!r}; pass "
            f"mode={self.curvature_mode!r} to zoo.curvature.backward to match",
            UserWarning,
            stacklevel=3,
        )

    def _step_kind(self, net, ks: _KindState, active: list[int], g: Tensor, h) -> None:
        layout = ks.layout
        if len(active) == len(ks.params):
            update, ks.features, ks.lstm = self._learned_step(
                net, self.features, ks.features, ks.lstm, g, h, layout
            )
            pieces = layout.split(update)
        else:
            # Frozen parameters keep their state: step only the active coordinates.
            starts = [sum(layout.sizes[:i]) for i in range(len(layout.sizes))]
            index = torch.cat(
                [
                    torch.arange(starts[i], starts[i] + layout.sizes[i], device=g.device)
                    for i in active
                ]
            )
            sub_layout = KindLayout(
                [layout.names[i] for i in active],
                [layout.sizes[i] for i in active],
                layout.segments[index],
                layout.counts,
            )
            sub_features = FeatureState(*(t[index] for t in ks.features))
            update, new_features, new_lstm = self._learned_step(
                net, self.features, sub_features, ks.lstm[index], g, h, sub_layout
            )
            ks.features = FeatureState(
                *(t.index_copy(0, index, n) for t, n in zip(ks.features, new_features, strict=True))
            )
            ks.lstm = ks.lstm.index_copy(0, index, new_lstm)
            pieces = sub_layout.split(update)
        for i, piece in zip(active, pieces, strict=True):
            p = ks.params[i]
            p.add_(piece.view_as(p).to(p.dtype))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Per-coordinate state keyed by parameter name (plus the ``other`` Adam's)."""
        state = {}
        for ks in self._kinds.values():
            feature_parts = [ks.layout.split(t) for t in ks.features]
            lstm_parts = ks.layout.split(ks.lstm)
            for j, name in enumerate(ks.layout.names):
                entry = {
                    field: parts[j].clone()
                    for field, parts in zip(FeatureState._fields, feature_parts, strict=True)
                }
                entry["lstm"] = lstm_parts[j].clone()
                state[name] = entry
        return {
            "format": STATE_FORMAT,
            "state": state,
            "baselines": {
                route: {"names": self._baseline_names(route), "state": opt.state_dict()}
                for route, opt in self._baselines.items()
            },
            "skipped_steps": self.skipped_steps,
        }

    def _baseline_names(self, route: str) -> list[str]:
        return [a.name for a in self.assignments if a.route == route]

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`; parameters are matched by name and shape."""
        fmt = state_dict.get("format") if isinstance(state_dict, dict) else None
        if fmt not in (STATE_FORMAT, _OLD_STATE_FORMAT):
            got = fmt if isinstance(state_dict, dict) else type(state_dict).__name__
            raise CheckpointError(
                f"not a LearnedOptimizer state (expected format {STATE_FORMAT!r}, got {got!r})"
            )
        saved = state_dict.get("state")
        if not isinstance(saved, dict):
            raise CheckpointError("optimizer state: 'state' must map parameter names to state")
        baselines = self._saved_baselines(state_dict, fmt)
        expected = {n for ks in self._kinds.values() for n in ks.layout.names}
        missing = sorted(expected - set(saved))
        unexpected = sorted(set(saved) - expected, key=str)  # keys of a foreign state: any type
        if missing or unexpected:
            raise CheckpointError(
                "optimizer state does not match this model's parameters: "
                f"missing {missing or 'none'}, unexpected {unexpected or 'none'}"
            )
        for route in sorted(set(baselines) | set(self._baselines)):
            names = self._baseline_names(route)
            saved_names = baselines.get(route, {}).get("names")
            if saved_names != names:
                raise CheckpointError(
                    f"optimizer state does not match this model's parameters: the {route} "
                    f"baseline held {saved_names or 'none'}, this model routes {names or 'none'}"
                )
        wrong = []
        for ks in self._kinds.values():
            for name, size in zip(ks.layout.names, ks.layout.sizes, strict=True):
                if not _entry_fits(saved[name], size, ks.lstm.shape[1]):
                    wrong.append(name)
        if wrong:
            raise CheckpointError(f"optimizer state has the wrong shape for: {', '.join(wrong)}")
        skipped = state_dict.get("skipped_steps", 0)
        if type(skipped) is not int or skipped < 0:
            raise CheckpointError(f"optimizer state: skipped_steps {skipped!r} is not a count")
        # Load the baselines first: torch validates their state and raises on a mismatch,
        # before any of this optimizer's own state has changed.
        backups = {route: opt.state_dict() for route, opt in self._baselines.items()}
        try:
            for route, opt in self._baselines.items():
                opt.load_state_dict(baselines[route]["state"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
            for route, opt in self._baselines.items():
                opt.load_state_dict(backups[route])
            raise CheckpointError(
                f"optimizer state: a baseline's state does not fit: {error}"
            ) from error
        for ks in self._kinds.values():
            device = ks.lstm.device
            ks.features = FeatureState(
                *(
                    torch.cat([saved[n][f].to(device) for n in ks.layout.names])
                    for f in FeatureState._fields
                )
            )
            ks.lstm = torch.cat([saved[n]["lstm"].to(device) for n in ks.layout.names]).to(
                self.options.state_dtype
            )
        self.skipped_steps = skipped

    def _saved_baselines(self, state_dict: dict, fmt: str) -> dict:
        if fmt == _OLD_STATE_FORMAT:  # one Adam, called the fallback
            names = state_dict.get("fallback_names") or []
            return {"adam": {"names": names, "state": state_dict.get("fallback")}} if names else {}
        baselines = state_dict.get("baselines", {})
        if not isinstance(baselines, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("names"), list) for v in baselines.values()
        ):
            raise CheckpointError("optimizer state: 'baselines' is malformed")
        return baselines


def _entry_fits(entry, size: int, state_size: int) -> bool:
    """Whether one parameter's saved state is float32 tensors of the right shapes."""
    if not isinstance(entry, dict):
        return False
    shapes = {"lstm": (size, state_size), **{f: (size,) for f in FeatureState._fields}}
    return set(entry) == set(shapes) and all(
        isinstance(entry[k], Tensor)
        and entry[k].dtype == torch.float32
        and tuple(entry[k].shape) == shape
        for k, shape in shapes.items()
    )
