"""The optimizers the paper compares against: SOU, the gradient-only LSTM, SGD, RMSprop, Adam.

**SOU** (second-order update, the diagonal-Newton baseline of Roy & Todorovic 2018) divides
each coordinate's gradient by its own curvature:

    θ ← θ − α · g / (|h| + μ)

with ``h`` the diagonal second derivative from :func:`zoo.curvature.backward`, ``α`` the
step size (``α = 1, μ = 0`` is Newton's step, exact on a quadratic whose Hessian is
diagonal) and ``μ`` a damping that keeps flat coordinates (``h ≈ 0``, dead ReLU units,
biases far from the output) from taking huge steps. ``|h|`` rather than ``h`` so that a
negative curvature estimate (``activation="full"``) never turns the step uphill.

The **gradient-only LSTM** (Andrychowicz et al. 2016) is the same coordinate-wise update
net with the curvature inputs removed: feature set ``"g"`` (:data:`GRADIENT_ONLY`), which
never reads a second derivative, so it trains with a plain ``loss.backward()``.

**SGD, RMSprop, Adam** are ``torch.optim``'s; :data:`HAND_DESIGNED` maps their names to
factories taking ``(params, lr)``.

Example:
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = SOU(model.parameters(), lr=1.0, damping=1e-4)
    >>> loss = zoo.curvature.backward(model, x, y, loss="mse")   # stores p.hessian_diag
    >>> opt.step()
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .curvature import hessian_diag_of
from .errors import ConfigError
from .features import FeatureSpec

__all__ = [
    "GRADIENT_ONLY",
    "HAND_DESIGNED",
    "SECOND_ORDER",
    "SOU",
    "is_gradient_only",
    "sou_update",
]

logger = logging.getLogger(__name__)

# The gradient-only LSTM is the second-order one without the curvature family of inputs.
GRADIENT_ONLY = FeatureSpec("g")
SECOND_ORDER = FeatureSpec("gh")

HAND_DESIGNED: dict[str, Callable[[Iterable, float], torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}


def is_gradient_only(features: FeatureSpec) -> bool:
    """Whether an update net with ``features`` is the gradient-only LSTM baseline."""
    return not features.uses_curvature


def sou_update(grad: Tensor, hess: Tensor, lr: float, damping: float) -> Tensor:
    """The SOU step ``−α · g / (|h| + μ)`` for one tensor (pure; no state)."""
    return -lr * grad / (hess.abs() + damping)


class SOU(torch.optim.Optimizer):
    """Diagonal-Newton step θ ← θ − α·g/(|h| + μ), fed by the curvature pass.

    Args:
        params: parameters (or parameter groups) to optimise.
        lr: the step size ``α`` (> 0); ``1`` is the undamped Newton step.
        damping: ``μ`` (>= 0) added to ``|h|``; ``0`` only when every ``h`` is positive.

    Each parameter's second derivative is read with
    :func:`zoo.curvature.hessian_diag_of`, so the gradient must come from
    ``zoo.curvature.backward(model, inputs, target)``; a plain ``loss.backward()`` raises
    ``CurvatureMissingError`` at the step.
    """

    def __init__(self, params, lr: float = 0.1, damping: float = 1e-3):
        if not (isinstance(lr, int | float) and lr > 0):
            raise ConfigError(f"SOU: lr (the step size α) must be > 0, got {lr!r}")
        if not (isinstance(damping, int | float) and damping >= 0):
            raise ConfigError(f"SOU: damping (μ) must be >= 0, got {damping!r}")
        super().__init__(params, {"lr": float(lr), "damping": float(damping)})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer's contract
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g_index, group in enumerate(self.param_groups):
            for p_index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                h = hessian_diag_of(p, f"param_groups[{g_index}].params[{p_index}]")
                p.add_(sou_update(p.grad, h, group["lr"], group["damping"]).to(p.dtype))
        return loss
