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

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .curvature import curvature_mode_of, hessian_diag_of
from .errors import CheckpointError, ConfigError
from .features import FeatureSpec, FeatureState, compute_features, init_state
from .layer_kinds import Assignment, assign
from .update_net import UpdateNet

__all__ = ["KindLayout", "LearnedOptimizer", "learned_step"]

logger = logging.getLogger(__name__)

STATE_FORMAT = "zoo.LearnedOptimizer/1"


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
        other: policy for parameters of other layer kinds (see :mod:`zoo.layer_kinds`).
        other_lr: learning rate of the Adam that takes ``other`` parameters under
            ``other="adam"``.
        curvature_mode: the curvature mode the nets were meta-trained with (a checkpoint's
            ``curvature.mode``); the first step whose second derivatives come from another
            mode warns (``UserWarning``), since the nets then see inputs of another
            distribution. A warning, not an error: checking with ``mode="exact"`` is
            legitimate.

    ``state_dict()`` is keyed by parameter name; ``load_state_dict`` checks names and
    shapes and names any mismatch. Steps whose gradient or second derivative holds NaN or
    inf are skipped (state unchanged) and counted in ``skipped_steps``.
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
    ):
        if not other_lr > 0:
            raise ConfigError(f"other_lr must be > 0, got {other_lr}")
        self.nets = dict(nets)
        self.features = features
        self.assignments: list[Assignment] = assign(model, tuple(self.nets), other)
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
        self._fallback: torch.optim.Adam | None = None
        for group in self.param_groups:
            members = [a for a in self.assignments if a.route == group["route"]]
            if group["route"] == "adam":
                self._fallback = torch.optim.Adam(group["params"], lr=other_lr)
                continue
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
        self.curvature_mode = curvature_mode
        self._mode_warned = False

    # ------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer's contract
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = []
        finite = True
        for route, ks in self._kinds.items():
            active = [i for i, p in enumerate(ks.params) if p.grad is not None and p.numel()]
            if not active:
                continue
            grads, hessians = [], []
            for i in active:
                p, name = ks.params[i], ks.layout.names[i]
                if p.grad.is_sparse:
                    raise ConfigError(f"{name} has a sparse gradient; zoo needs dense gradients")
                grads.append(p.grad.reshape(-1).float())
                if self.features.uses_curvature:
                    hessians.append(hessian_diag_of(p, name).reshape(-1).float())
                    self._check_mode(p, name)
            g = torch.cat(grads)
            h = torch.cat(hessians) if hessians else None
            finite &= bool(torch.isfinite(g).all()) and (h is None or bool(torch.isfinite(h).all()))
            plans.append((route, ks, active, g, h))
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
        if self._fallback is not None:
            self._fallback.step()
        return loss

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
            update, ks.features, ks.lstm = learned_step(
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
            update, new_features, new_lstm = learned_step(
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
            "fallback": self._fallback.state_dict() if self._fallback is not None else None,
            "fallback_names": [a.name for a in self.assignments if a.route == "adam"],
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`; parameters are matched by name and shape."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            raise CheckpointError(
                f"not a LearnedOptimizer state (expected format {STATE_FORMAT!r}, got "
                f"{state_dict.get('format') if isinstance(state_dict, dict) else type(state_dict)})"
            )
        saved = state_dict["state"]
        expected = {n for ks in self._kinds.values() for n in ks.layout.names}
        missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
        fallback_names = [a.name for a in self.assignments if a.route == "adam"]
        if missing or unexpected or fallback_names != state_dict.get("fallback_names", []):
            raise CheckpointError(
                "optimizer state does not match this model's parameters: "
                f"missing {missing or 'none'}, unexpected {unexpected or 'none'}"
            )
        wrong = []
        for ks in self._kinds.values():
            for name, size in zip(ks.layout.names, ks.layout.sizes, strict=True):
                entry = saved[name]
                if entry["lstm"].shape != (size, ks.lstm.shape[1]) or any(
                    entry[f].shape != (size,) for f in FeatureState._fields
                ):
                    wrong.append(name)
        if wrong:
            raise CheckpointError(f"optimizer state has the wrong shape for: {', '.join(wrong)}")
        for ks in self._kinds.values():
            device = ks.lstm.device
            ks.features = FeatureState(
                *(
                    torch.cat([saved[n][f].to(device) for n in ks.layout.names])
                    for f in FeatureState._fields
                )
            )
            ks.lstm = torch.cat([saved[n]["lstm"].to(device) for n in ks.layout.names])
        if self._fallback is not None:
            self._fallback.load_state_dict(state_dict["fallback"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
