"""Second-order back-propagation: the gradient and the diagonal of the loss Hessian.

One pass yields, for every parameter, the gradient (by autograd, exact) and a diagonal
second derivative ``hessian_diag``. Three modes share one API, :func:`curvature_pass`
(and :func:`backward` for an ordinary training loop):

``mode="diagonal"`` (default) — the Becker–LeCun (1988) diagonal recursion, one extra
backward-shaped pass. Write ``h_z = d²L/dz²`` for the diagonal curvature of the loss
with respect to a tensor ``z``. At the network output it starts from the exact diagonal
of the loss Hessian (``p(1 - p)`` for softmax cross-entropy, ``2`` for squared error, each
divided by what ``reduction="mean"`` divides by) and runs backwards through the graph:

* linear maps ``y = W x (+ b)`` (``Linear``, ``Conv1d``, ``Conv2d`` with any stride,
  padding, dilation and groups): ``h_x = (W²)ᵀ h_y``, ``h_W = Σ_samples h_y (x²)ᵀ``,
  ``h_b = Σ h_y`` — squared weights on the way back, squared inputs for the weights;
* parameter-free linear maps with Jacobian ``J`` (pooling, mean, flatten, dropout, sums,
  scaling): ``h_x = (J²)ᵀ h_y``; for 0/1 Jacobians (max-pooling, reshapes, residual sums)
  that is the transposed Jacobian itself, for average pooling the squared ``1/window``;
* elementwise activations ``y = f(x)``: ``h_x = f'(x)² h_y + f''(x) g_y`` with ``g_y`` the
  gradient at ``y``. ``activation="gauss_newton"`` (default, recommended) drops the second
  term, so ``h`` stays non-negative — what the update nets and Newton-like steps need;
  ``activation="full"`` keeps it (it can make ``h`` negative). ReLU and LeakyReLU are
  piecewise linear: ``f'' = 0`` almost everywhere and both forms agree (zero for dead
  units);
* ``BatchNorm`` (see :func:`_batchnorm_rule` for the derivation and what it neglects).

The recursion keeps only the diagonal of each intermediate Hessian: cross terms
``d²L/dz_i dz_j`` between units of a layer are dropped at every step. It is therefore
*exact for the last layer* and an approximation for earlier ones (docs/curvature.md
records its error against ``mode="exact"``).

``mode="exact"`` — the exact diagonal of the generalized Gauss–Newton matrix
``G = Σ_n J_nᵀ H_n J_n`` (``J_n`` the Jacobian of sample ``n``'s output with respect to the
parameters, ``H_n = S_n S_nᵀ`` the output Hessian). Every column of every ``S_n`` is
back-propagated (batched vector–Jacobian products, ``chunk_size`` at a time) and the
squares summed: ``diag G = Σ_n Σ_k (J_nᵀ s_nk)²``. Costs ``batch × classes`` backward
passes; for checking and small networks. For piecewise-linear networks (ReLU, max-pool,
linear layers, eval-mode BatchNorm) the output is linear in each single parameter, so
``diag G`` equals the Hessian diagonal.

``mode="hutchinson"`` — ``E[v ⊙ Hv]`` over Rademacher ``v`` (``samples`` of them), by double
back-propagation: works for anything autograd can differentiate twice. Its standard error
per coordinate is ``sqrt(Σ_{j≠i} H_ij² / samples)``. ``refresh_every=k`` recomputes the
estimate only every ``k``-th call for a model and reuses it in between (those calls cost
one plain backward).

Use it in an ordinary training loop:

    >>> loss = zoo.curvature.backward(model, inputs, target)   # instead of loss.backward()
    >>> optimizer.step()                                       # reads p.grad, p.hessian_diag

or functionally (meta-training, SOU) with :func:`curvature_pass`.

The graph is captured with ``torch.fx``, so any traceable model made of the supported
operations works, not only ``nn.Sequential`` (torchvision's ResNets included). An
operation without a rule is a ``CurvatureError`` naming the module path and the
operation, raised before any computation; with ``fallback="hutchinson"`` the parameters
whose curvature would have to pass through it get a Hutchinson estimate instead and the
others keep the diagonal recursion.
"""

from __future__ import annotations

import logging
import math
import operator
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .errors import CurvatureError, CurvatureMissingError

__all__ = [
    "ACTIVATION_FORMS",
    "FALLBACKS",
    "LOSSES",
    "MODES",
    "CurvatureResult",
    "backward",
    "curvature_mode_of",
    "curvature_pass",
    "hessian_diag_of",
    "output_curvature",
]

logger = logging.getLogger(__name__)

MODES = ("diagonal", "exact", "hutchinson")
ACTIVATION_FORMS = ("gauss_newton", "full")
FALLBACKS = ("error", "hutchinson")
LOSSES = ("cross_entropy", "cross_entropy_sum", "mse", "mse_sum")
# Vector–Jacobian products per batched backward in exact and Hutchinson modes: large
# enough to amortise autograd's per-call overhead, small enough for CPU memory.
DEFAULT_CHUNK = 64


@dataclass
class CurvatureResult:
    """What one curvature pass returns.

    ``loss`` keeps its graph to the parameters when the pass was asked to (meta-training
    needs it); ``grads`` and ``hessian_diag`` are detached, keyed by parameter name.
    ``mode`` is the mode that produced ``hessian_diag``; ``estimated`` names the parameters
    whose value is a Hutchinson estimate (all of them in Hutchinson mode, those behind an
    unsupported operation under ``fallback="hutchinson"``).
    """

    loss: Tensor
    output: Tensor
    grads: dict[str, Tensor]
    hessian_diag: dict[str, Tensor]
    mode: str = "diagonal"
    estimated: tuple[str, ...] = field(default_factory=tuple)


# --------------------------------------------------------------------------- tracing

_TRACES: weakref.WeakKeyDictionary[nn.Module, fx.GraphModule] = weakref.WeakKeyDictionary()


def _trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` graph of ``model``, cached per model; shares the model's parameters."""
    if isinstance(model, fx.GraphModule):
        return model
    traced = _TRACES.get(model)
    if traced is None:
        try:
            traced = fx.symbolic_trace(model)
        except Exception as error:  # fx raises many types; all mean "not traceable"
            raise CurvatureError(
                f"cannot trace {type(model).__name__} with torch.fx ({error}); the curvature "
                "pass needs a forward without data-dependent control flow"
            ) from error
        _TRACES[model] = traced
    return traced


_INPLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub}
_INPLACE_METHODS = {"add_": "add", "sub_": "sub", "relu_": "relu", "mul_": "mul"}


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps every node's value (what the backward recursion reads).

    In-place operations would overwrite values already recorded, so they run out of place
    (same result, same gradient). Dropout runs as ``x * mask`` with the mask kept, because
    its curvature rule needs the mask.
    """

    def __init__(self, module: fx.GraphModule, allow_inplace: bool = True):
        super().__init__(module)
        # In place would re-base an overwritten output's autograd history, and
        # ``activation="full"`` differentiates with respect to node outputs.
        self.allow_inplace = allow_inplace
        self.values: dict[fx.Node, object] = {}
        self.masks: dict[fx.Node, Tensor] = {}
        self.indices: dict[fx.Node, Tensor] = {}  # max-pooling argmax per output

    def run_node(self, node: fx.Node):
        value = self._run(node)
        self.values[node] = value
        return value

    def _run(self, node: fx.Node):
        if node.op == "call_module":
            submodule = self.module.get_submodule(node.target)
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            if isinstance(submodule, nn.MaxPool1d | nn.MaxPool2d) and not submodule.return_indices:
                # Keep the argmax: the curvature rule scatters through it instead of
                # pooling a second time (pooling is a large share of small nets' time).
                pool = F.max_pool1d if isinstance(submodule, nn.MaxPool1d) else F.max_pool2d
                value, self.indices[node] = pool(
                    args[0],
                    submodule.kernel_size,
                    submodule.stride,
                    submodule.padding,
                    submodule.dilation,
                    ceil_mode=submodule.ceil_mode,
                    return_indices=True,
                )
                return value
            if isinstance(submodule, _DROPOUTS):
                if not (submodule.training and submodule.p > 0):
                    return args[0]
                mask = submodule(torch.ones_like(args[0]))
                self.masks[node] = mask
                return args[0] * mask
            if getattr(submodule, "inplace", False) and not (
                self.allow_inplace and _sole_user(node)
            ):
                # Another consumer reads the tensor an in-place op would overwrite: run it
                # out of place (one pass over memory, unlike a clone). With this node as
                # the only consumer the overwrite is harmless, and in place saves memory.
                submodule.inplace = False
                try:
                    return submodule(*args, **kwargs)
                finally:
                    submodule.inplace = True
            return submodule(*args, **kwargs)
        if node.op == "call_function":
            if node.target in _INPLACE_FUNCTIONS:
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                return _INPLACE_FUNCTIONS[node.target](*args, **kwargs)
            if node.target is F.dropout:
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                bound = _bind_dropout(*args, **kwargs)
                if not (bound["training"] and bound["p"] > 0):
                    return bound["input"]
                mask = F.dropout(torch.ones_like(bound["input"]), bound["p"], True)
                self.masks[node] = mask
                return bound["input"] * mask
            if node.kwargs.get("inplace"):
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                return node.target(*args, **{**kwargs, "inplace": False})
        if node.op == "call_method" and node.target in _INPLACE_METHODS:
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            return getattr(args[0], _INPLACE_METHODS[node.target])(*args[1:], **kwargs)
        return super().run_node(node)


def _sole_user(node: fx.Node) -> bool:
    """Whether ``node`` is the only consumer of its input (so it may overwrite it)."""
    arg = node.args[0] if node.args else None
    return isinstance(arg, fx.Node) and arg.op != "placeholder" and len(arg.users) == 1


def _bind_dropout(input, p=0.5, training=True, inplace=False):  # noqa: A002 - F.dropout's names
    return {"input": input, "p": p, "training": training}


# --------------------------------------------------------------------------- losses


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise CurvatureError(f"unknown loss {loss!r}; known losses: {', '.join(LOSSES)}")


def _mean_divisor(output: Tensor, loss: str) -> int:
    """What ``reduction="mean"`` divides the summed loss by."""
    if loss == "cross_entropy":
        return output.shape[0]
    if loss == "mse":
        return output.numel()
    return 1


def output_curvature(output: Tensor, target: Tensor, loss: str) -> Tensor:
    """Exact diagonal of the loss Hessian with respect to the network output."""
    _check_loss(loss)
    if loss.startswith("cross_entropy"):
        logits = output.detach()
        # Half-precision logits get the softmax in fp32; fp32/fp64 keep their precision.
        p = torch.softmax(logits.float() if logits.element_size() < 4 else logits, dim=-1)
        h = p * (1.0 - p)
    else:  # squared error: d²/do² (o - t)² = 2 for every element
        h = torch.full_like(output.detach(), 2.0)
    return (h / _mean_divisor(output, loss)).to(output.dtype)


def _output_hessian_factor(output: Tensor, loss: str) -> Tensor:
    """``S`` of shape ``(N, D, K)`` with ``S_n S_nᵀ`` the Hessian of the loss in sample n's output.

    Softmax cross-entropy: ``H = diag(p) - p pᵀ = S Sᵀ`` with ``S = diag(√p) - p √pᵀ``
    (uses ``Σ p = 1``). Squared error: ``H = 2 I``, ``S = √2 I``. Both divided by the mean's
    divisor.
    """
    n = output.shape[0]
    logits = output.detach().reshape(n, -1)
    scale = 1.0 / math.sqrt(_mean_divisor(output, loss))
    if loss.startswith("cross_entropy"):
        p = torch.softmax(logits, dim=-1)
        root = p.sqrt()
        factor = torch.diag_embed(root) - p.unsqueeze(2) * root.unsqueeze(1)
    else:
        eye = torch.eye(logits.shape[1], dtype=logits.dtype, device=logits.device)
        factor = (math.sqrt(2.0) * eye).expand(n, -1, -1)
    return factor * scale


def _check_classes(output: Tensor, target: Tensor) -> None:
    """Integer class targets must lie in 0..C-1 for the C outputs (CUDA would assert)."""
    if target.dtype.is_floating_point or target.dtype == torch.bool or output.dim() < 2:
        return  # class probabilities, or nothing to check against
    classes = output.shape[1]
    if target.numel() and bool(((target < 0) | (target >= classes)).any()):
        low, high = int(target.min()), int(target.max())
        raise CurvatureError(
            f"class targets must lie in 0..{classes - 1} for the model's {classes} outputs "
            f"(classes), got values in {low}..{high}; check the labels or the model's "
            "number of classes"
        )


def _loss_value(output: Tensor, target: Tensor, loss: str) -> Tensor:
    _check_loss(loss)
    if loss in ("cross_entropy", "cross_entropy_sum"):
        _check_classes(output, target)
    if loss == "cross_entropy":
        return F.cross_entropy(output, target)
    if loss == "cross_entropy_sum":
        return F.cross_entropy(output, target, reduction="sum")
    if target.shape != output.shape:
        raise CurvatureError(
            f"loss {loss!r} needs a target shaped like the output {tuple(output.shape)}, "
            f"got {tuple(target.shape)}"
        )
    return F.mse_loss(output, target, reduction="mean" if loss == "mse" else "sum")


# --------------------------------------------------------------------------- rules
#
# A rule maps (context, node, h at the node's output) to the curvature of each of the
# node's tensor inputs and of the node's own parameters: ([(input node, h)], {name: h}).

Contributions = tuple[list[tuple[fx.Node, Tensor]], dict[str, Tensor]]


@dataclass
class _Context:
    gm: fx.GraphModule
    values: dict[fx.Node, object]  # every node's value, detached; released as consumed
    masks: Mapping[fx.Node, Tensor]  # dropout masks (already divided by 1 - p)
    indices: Mapping[fx.Node, Tensor]  # max-pooling argmax (flat index in each plane)
    grads_at: Mapping[fx.Node, Tensor]  # dL/d(node output), only for activation="full"
    lookup: Callable[[str], Tensor]  # parameter name -> detached tensor
    needs_h: set[fx.Node]  # nodes that depend on a parameter: only these need curvature
    activation: str = "gauss_newton"

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def weight(self, node: fx.Node, local: str) -> Tensor:
        return self.lookup(f"{node.target}.{local}")

    def x(self, node: fx.Node) -> Tensor:
        return self.values[node.args[0]]

    def to_input(self, node: fx.Node, h: Tensor | None) -> list[tuple[fx.Node, Tensor]]:
        arg = node.args[0]
        return [(arg, h)] if h is not None and arg in self.needs_h else []


def _linear(ctx: _Context, node: fx.Node, h_y: Tensor) -> Contributions:
    module, x = ctx.module(node), ctx.x(node)
    w = ctx.weight(node, "weight")
    hy = h_y.reshape(-1, h_y.shape[-1])
    params = {"weight": hy.t() @ (x * x).reshape(-1, x.shape[-1])}
    if module.bias is not None:
        params["bias"] = hy.sum(0)
    h_x = (h_y @ (w * w)) if node.args[0] in ctx.needs_h else None
    return ctx.to_input(node, h_x), params


def _conv_padding(module: nn.Module, node: fx.Node) -> list[int]:
    if not isinstance(module.padding, str):
        return list(module.padding)
    if module.padding == "valid":
        return [0] * len(module.kernel_size)
    span = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
    if any(s % 2 for s in span):
        raise CurvatureError(
            f"no curvature rule for module {node.target!r} ({type(module).__name__}): "
            "padding='same' with an even kernel span pads asymmetrically; pad explicitly"
        )
    return [s // 2 for s in span]


def _conv(ctx: _Context, node: fx.Node, h_y: Tensor) -> Contributions:
    module, x = ctx.module(node), ctx.x(node)
    if module.padding_mode != "zeros":
        raise CurvatureError(
            f"no curvature rule for module {node.target!r} ({type(module).__name__}) with "
            f"padding_mode={module.padding_mode!r}; use padding_mode='zeros'"
        )
    w = ctx.weight(node, "weight")
    dims = len(module.kernel_size)
    conv = (
        list(module.stride),
        _conv_padding(module, node),
        list(module.dilation),
        False,
        [0] * dims,
        module.groups,
    )
    has_bias = module.bias is not None
    # The weight-gradient kernel with x² in place of x gives Σ h_y x² per weight, the
    # input-gradient kernel with W² in place of W gives (W²)ᵀ h_y: no extra forward.
    _, h_w, h_b = torch.ops.aten.convolution_backward(
        h_y, x * x, w, [w.shape[0]] if has_bias else None, *conv, [False, True, has_bias]
    )
    params = {"weight": h_w}
    if has_bias:
        params["bias"] = h_b
    h_x = None
    if node.args[0] in ctx.needs_h:
        h_x = torch.ops.aten.convolution_backward(h_y, x, w * w, None, *conv, [True, False, False])[
            0
        ]
    return ctx.to_input(node, h_x), params


def _batchnorm(ctx: _Context, node: fx.Node, h_y: Tensor) -> Contributions:
    """BatchNorm: ``y = γ x̂ + β`` per channel, ``x̂ = (x - μ) / σ``, ``σ = sqrt(var + ε)``.

    Parameters: ``y`` is linear in ``γ`` and ``β``, so ``h_γ = Σ h_y x̂²`` and
    ``h_β = Σ h_y`` (sums over batch and space), exact given the diagonal ``h_y``.

    Input, eval mode (running statistics): an exact per-channel affine map,
    ``h_x = (γ/σ)² h_y``.

    Input, training mode (batch statistics over the ``m`` elements of a channel): the
    Jacobian is no longer diagonal, ``∂y_i/∂x_j = (γ/σ)(δ_ij - a_ij)`` with
    ``a_ij = (1 + x̂_i x̂_j)/m``. The rule keeps all of it in ``h_x = (J²)ᵀ h_y``::

        h_x_j = (γ/σ)² [ (1 - 2 a_jj) h_j + (A + 2 x̂_j B + x̂_j² C) / m² ]

    with per-channel sums ``A = Σ h_i``, ``B = Σ x̂_i h_i``, ``C = Σ x̂_i² h_i``: three
    reductions, no ``m × m`` matrix. What it neglects: (1) like every rule, the
    off-diagonal entries of the Hessian at ``y``; (2) the second-derivative term
    ``Σ_i g_i ∂²y_i/∂x_j²`` (normalisation is curved in ``x``), i.e. this is always the
    Gauss–Newton form, whatever ``activation`` says; (3) nothing from the running
    statistics, which do not influence this batch's output in training mode.
    """
    module, x = ctx.module(node), ctx.x(node)
    reduce = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    batch_stats = module.training or module.running_mean is None
    if batch_stats:
        var, mean = torch.var_mean(x, dim=reduce, correction=0)
    else:
        var, mean = module.running_var, module.running_mean
    inv_std = torch.rsqrt(var + module.eps).reshape(shape)
    x_hat = (x - mean.reshape(shape)) * inv_std
    params = {}
    gamma2 = inv_std * inv_std
    if module.affine:
        params["weight"] = (h_y * x_hat * x_hat).sum(reduce)
        params["bias"] = h_y.sum(reduce)
        w = ctx.weight(node, "weight").reshape(shape)
        gamma2 = gamma2 * w * w
    h_x = None
    if node.args[0] in ctx.needs_h:
        if batch_stats:
            m = x.numel() // x.shape[1]
            a = h_y.sum(reduce, keepdim=True)
            b = (x_hat * h_y).sum(reduce, keepdim=True)
            c = (x_hat * x_hat * h_y).sum(reduce, keepdim=True)
            diag = 1.0 - 2.0 * (1.0 + x_hat * x_hat) / m
            h_x = gamma2 * (diag * h_y + (a + 2.0 * x_hat * b + x_hat * x_hat * c) / (m * m))
        else:
            h_x = gamma2 * h_y
    return ctx.to_input(node, h_x), params


def _relu(ctx: _Context, node: fx.Node, h_y: Tensor) -> Contributions:
    # relu(x) > 0 exactly where x > 0 (in-place ReLU ran out of place, so y is intact).
    y = ctx.values[node]
    return ctx.to_input(node, torch.ops.aten.threshold_backward(h_y, y, 0)), {}


def _maxpool(ctx: _Context, node: fx.Node, h_y: Tensor) -> Contributions:
    # Max-pooling's Jacobian is a 0/1 selection (J² = J): h goes to each window's argmax,
    # summed where windows overlap — a scatter-add through the indices the forward kept.
    if node.args[0] not in ctx.needs_h:
        return [], {}
    x, index = ctx.x(node), ctx.indices[node]
    spatial = 2 if isinstance(ctx.module(node), nn.MaxPool2d) else 1
    lead = x.shape[: x.dim() - spatial]
    h = h_y.new_zeros(*lead, math.prod(x.shape[x.dim() - spatial :]))
    h.scatter_add_(-1, index.flatten(-spatial), h_y.flatten(-spatial))
    return ctx.to_input(node, h.reshape(x.shape)), {}


def _leaky_relu(ctx: _Context, node: fx.Node, h_y: Tensor) -> Contributions:
    slope = ctx.module(node).negative_slope
    scale = torch.where(ctx.x(node) > 0, 1.0, slope * slope).to(h_y.dtype)
    return ctx.to_input(node, h_y * scale), {}


def _derivatives(fn: Callable[[Tensor], Tensor], x: Tensor, second: bool):
    """``f'(x)`` and (when asked) ``f''(x)`` of an elementwise ``fn``, by autograd."""
    with torch.enable_grad():
        xv = x.detach().requires_grad_(True)
        (d1,) = torch.autograd.grad(fn(xv).sum(), xv, create_graph=second)
        d2 = None
        if second:
            d2 = torch.autograd.grad(d1.sum(), xv, allow_unused=True)[0]
            d2 = torch.zeros_like(x) if d2 is None else d2
    return d1.detach(), d2


def _smooth(ctx: _Context, node: fx.Node, h_y: Tensor, fn: Callable) -> Contributions:
    full = ctx.activation == "full"
    d1, d2 = _derivatives(fn, ctx.x(node), full)
    h_x = d1 * d1 * h_y
    if full and node in ctx.grads_at:
        h_x = h_x + d2 * ctx.grads_at[node]
    return ctx.to_input(node, h_x), {}


def _smooth_module(ctx: _Context, node: fx.Node, h_y: Tensor) -> Contributions:
    return _smooth(ctx, node, h_y, ctx.module(node))


def _rerun(ctx: _Context, node: fx.Node, inputs: Sequence[fx.Node], tensors: Sequence[Tensor]):
    """Evaluate ``node`` again with ``tensors`` in place of the values of ``inputs``."""
    env = dict(zip(inputs, tensors, strict=True))
    args = fx.node.map_arg(node.args, lambda n: env.get(n, ctx.values[n]))
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env.get(n, ctx.values[n]))
    if node.op == "call_module":
        return ctx.module(node)(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _smooth_function(ctx: _Context, node: fx.Node, h_y: Tensor) -> Contributions:
    return _smooth(ctx, node, h_y, lambda t: _rerun(ctx, node, [node.args[0]], [t]))


def _float_inputs(ctx: _Context, node: fx.Node) -> list[fx.Node]:
    return [
        n
        for n in node.all_input_nodes
        if isinstance(ctx.values[n], Tensor) and ctx.values[n].is_floating_point()
    ]


def _select(ctx: _Context, node: fx.Node, h_y: Tensor, scale: Tensor | float = 1.0):
    """Parameter-free maps with 0/1 Jacobians ``J`` (max-pool, slicing, concatenation,
    permutation, broadcasting): ``J² = J``, so ``h_x = Jᵀ h_y``, a vector–Jacobian product.

    With ``scale``: maps whose Jacobian rows hold one repeated coefficient ``c_y`` (average
    pooling, mean), ``h_x = Σ_y c_y² J⁰_yx h_y`` = the VJP of ``h_y · c_y``.
    """
    inputs = [n for n in _float_inputs(ctx, node) if n in ctx.needs_h]
    if not inputs:
        return [], {}
    _, vjp = torch.func.vjp(
        lambda *ts: _rerun(ctx, node, inputs, ts), *(ctx.values[n] for n in inputs)
    )
    return list(zip(inputs, vjp(h_y * scale), strict=True)), {}


def _reshape(ctx: _Context, node: fx.Node, h_y: Tensor) -> Contributions:
    return ctx.to_input(node, h_y.reshape(ctx.x(node).shape)), {}


def _passthrough(ctx: _Context, node: fx.Node, h_y: Tensor) -> Contributions:
    return ctx.to_input(node, h_y), {}


def _dropout(ctx: _Context, node: fx.Node, h_y: Tensor) -> Contributions:
    # y = x · mask (mask is 0 or 1/(1-p), kept by the recorder): h_x = mask² h_y.
    mask = ctx.masks.get(node)
    return ctx.to_input(node, h_y if mask is None else h_y * mask * mask), {}


def _avgpool(ctx: _Context, node: fx.Node, h_y: Tensor) -> Contributions:
    module = ctx.module(node)
    if module.divisor_override:
        coefficient: Tensor | float = 1.0 / module.divisor_override
    else:
        # Every tap of output y has the coefficient 1/divisor_y; pooling ones gives
        # n_y/divisor_y and sum-pooling ones gives n_y (n_y: taps inside the input).
        x = ctx.x(node)
        ones = torch.ones_like(x[:1, :1])
        args = (module.kernel_size, module.stride, module.padding, module.ceil_mode)
        coefficient = F.avg_pool2d(ones, *args, module.count_include_pad) / F.avg_pool2d(
            ones, *args, True, divisor_override=1
        )
    return _select(ctx, node, h_y, coefficient)


def _window_counts(in_size: int, out_size: int, device) -> Tensor:
    """Taps per output of adaptive average pooling along one dimension (PyTorch's windows)."""
    i = torch.arange(out_size, device=device)
    return ((i + 1) * in_size + out_size - 1) // out_size - (i * in_size) // out_size


def _adaptive_avgpool(ctx: _Context, node: fx.Node, h_y: Tensor) -> Contributions:
    x, y = ctx.x(node), ctx.values[node]
    one_d = node.target is F.adaptive_avg_pool1d or (
        node.op == "call_module" and isinstance(ctx.module(node), nn.AdaptiveAvgPool1d)
    )
    spatial = 1 if one_d else 2
    coefficient = torch.ones((), dtype=h_y.dtype, device=h_y.device)
    for d in range(-spatial, 0):
        counts = _window_counts(x.shape[d], y.shape[d], h_y.device).to(h_y.dtype)
        coefficient = coefficient.unsqueeze(-1) / counts
    return _select(ctx, node, h_y, coefficient)


def _mean(ctx: _Context, node: fx.Node, h_y: Tensor) -> Contributions:
    return _select(ctx, node, h_y, h_y.numel() / ctx.x(node).numel())


def _sum(ctx: _Context, node: fx.Node, h_y: Tensor) -> Contributions:
    # A sum's Jacobian is an identity per summand (signs square away); alpha scales one.
    alpha = node.kwargs.get("alpha", 1)
    out = []
    for i, arg in enumerate(node.args[:2]):
        if isinstance(arg, fx.Node) and arg in ctx.needs_h:
            h = _sum_to(h_y, ctx.values[arg].shape)
            out.append((arg, h * alpha * alpha if i == 1 and alpha != 1 else h))
    return out, {}


def _scale(ctx: _Context, node: fx.Node, h_y: Tensor) -> Contributions:
    # y = c · x (or x / c, or -x) with a number c: h_x = c² h_y.
    tensor = next(a for a in node.args if isinstance(a, fx.Node))
    other = [a for a in node.args if not isinstance(a, fx.Node)]
    c = -1.0 if not other else float(other[0])
    if node.target in (operator.truediv, torch.div, "div"):
        c = 1.0 / c
    return ([(tensor, h_y * (c * c))] if tensor in ctx.needs_h else []), {}


def _sum_to(h: Tensor, shape: torch.Size) -> Tensor:
    """Undo broadcasting: sum ``h`` down to ``shape``."""
    if h.shape == shape:
        return h
    while h.dim() > len(shape):
        h = h.sum(0)
    for dim, size in enumerate(shape):
        if size == 1 and h.shape[dim] != 1:
            h = h.sum(dim, keepdim=True)
    return h


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_SMOOTH_MODULES = (
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Softplus,
    nn.Hardtanh,
    nn.ReLU6,
    nn.Mish,
)
_MODULE_RULES: tuple[tuple[type | tuple[type, ...], Callable], ...] = (
    (nn.Linear, _linear),
    ((nn.Conv1d, nn.Conv2d), _conv),
    (nn.modules.batchnorm._BatchNorm, _batchnorm),
    (nn.ReLU, _relu),
    (nn.LeakyReLU, _leaky_relu),
    (_SMOOTH_MODULES, _smooth_module),
    ((nn.MaxPool1d, nn.MaxPool2d), _maxpool),
    (nn.AvgPool2d, _avgpool),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d), _adaptive_avgpool),
    ((nn.Flatten, nn.Unflatten), _reshape),
    (_DROPOUTS, _dropout),
    (nn.Identity, _passthrough),
)
_FUNCTION_RULES: dict[object, Callable] = {
    **dict.fromkeys((torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze), _reshape),
    **dict.fromkeys(
        (operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub), _sum
    ),
    **dict.fromkeys((F.relu, torch.relu), _relu),
    **dict.fromkeys(
        (
            torch.tanh,
            torch.sigmoid,
            F.tanh,
            F.sigmoid,
            F.gelu,
            F.silu,
            F.elu,
            F.softplus,
            F.leaky_relu,
            F.hardtanh,
            F.relu6,
        ),
        _smooth_function,
    ),
    **dict.fromkeys(
        (
            operator.getitem,
            torch.cat,
            torch.stack,
            torch.transpose,
            torch.permute,
            torch.narrow,
            torch.sum,
            F.max_pool1d,
            F.max_pool2d,
        ),
        _select,
    ),
    torch.mean: _mean,
    **dict.fromkeys((F.adaptive_avg_pool1d, F.adaptive_avg_pool2d), _adaptive_avgpool),
    F.dropout: _dropout,
    **dict.fromkeys(
        (operator.mul, torch.mul, operator.truediv, torch.div, operator.neg, torch.neg), _scale
    ),
}
_METHOD_RULES: dict[str, Callable] = {
    **dict.fromkeys(
        ("view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "view_as"), _reshape
    ),
    **dict.fromkeys(("add", "add_", "sub", "sub_"), _sum),
    **dict.fromkeys(("relu", "relu_"), _relu),
    **dict.fromkeys(("tanh", "sigmoid"), _smooth_function),
    **dict.fromkeys(("permute", "transpose", "t", "expand", "expand_as", "narrow", "sum"), _select),
    "mean": _mean,
    **dict.fromkeys(("mul", "div", "neg"), _scale),
}


def _rule_for(node: fx.Node, gm: fx.GraphModule) -> Callable | None:
    """The rule for ``node``, or None where there is none."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        for types, rule in _MODULE_RULES:
            if isinstance(module, types):
                if isinstance(module, nn.MaxPool1d | nn.MaxPool2d) and module.return_indices:
                    return None
                return rule
        return None
    if node.op == "call_function":
        rule = _FUNCTION_RULES.get(node.target)
    elif node.op == "call_method":
        rule = _METHOD_RULES.get(node.target)
    else:
        return None
    if rule is _scale:
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        numbers = [a for a in node.args if isinstance(a, int | float)]
        if len(tensors) != 1 or len(tensors) + len(numbers) != len(node.args):
            return None  # a product of two tensors is bilinear: no rule
        if node.target in (operator.truediv, torch.div, "div") and node.args[0] is not tensors[0]:
            return None  # c / x is not linear
    return rule


def _module_path(node: fx.Node) -> str:
    """The module a node belongs to, as ``model.named_modules()`` names it."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(list(stack)[-1]).split("@")[0] or "<root>"
    return "<root>"


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(gm.get_submodule(node.target)).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target!r} in module {_module_path(node)!r} (node {node.name!r})"


# --------------------------------------------------------------------------- the graph


@dataclass
class _GraphFacts:
    """What one forward pass tells about the graph, for the recursion and the fallback."""

    needs_h: set[fx.Node]  # float-tensor nodes that depend on a trainable parameter
    unsupported: list[fx.Node]  # nodes on a parameter → output path with no rule
    owned: dict[fx.Node, list[str]]  # node → the trainable parameters it owns

    def behind(self, nodes: Sequence[fx.Node]) -> set[str]:
        """Trainable parameters whose curvature must pass through one of ``nodes``."""
        seen, stack, names = set(), list(nodes), set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            names.update(self.owned.get(node, ()))
            stack.extend(node.all_input_nodes)
        return names


def _holds_tensor(value: object) -> bool:
    if isinstance(value, Tensor):
        return value.is_floating_point()
    if isinstance(value, list | tuple):
        return any(_holds_tensor(v) for v in value)
    return False


def _graph_facts(
    gm: fx.GraphModule, values: Mapping[fx.Node, object], trainable: set[str], result: fx.Node
) -> _GraphFacts:
    owned: dict[fx.Node, list[str]] = {}
    depends: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in trainable:
            owned[node] = [node.target]
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            names = [f"{node.target}.{n}" for n, _ in module.named_parameters()]
            owned[node] = [n for n in names if n in trainable]
        if owned.get(node) or any(a in depends for a in node.all_input_nodes):
            depends.add(node)
    reaches = {result}
    for node in reversed(gm.graph.nodes):
        if node in reaches:
            reaches.update(node.all_input_nodes)
    needs, unsupported = set(), []
    for node in gm.graph.nodes:
        if node not in depends or node not in reaches:
            continue
        value = values[node]
        if isinstance(value, Tensor) and value.is_floating_point():
            needs.add(node)
            if node.op != "get_attr" and _rule_for(node, gm) is None:
                unsupported.append(node)
        elif _holds_tensor(value):
            unsupported.append(node)  # a tuple of tensors (split, chunk): no rule
    return _GraphFacts(needs, unsupported, owned)


def _backward_curvature(
    ctx: _Context, result: fx.Node, h_output: Tensor, blocked: set[fx.Node]
) -> dict[str, Tensor]:
    """Run the diagonal recursion from the output back towards the inputs."""
    h_of: dict[fx.Node, Tensor] = {result: h_output}
    h_params: dict[str, Tensor] = {}

    def add_param(name: str, h: Tensor) -> None:
        h_params[name] = h_params[name] + h if name in h_params else h

    for node in reversed(ctx.gm.graph.nodes):
        h_y = h_of.pop(node, None)
        if h_y is None or node in blocked or node.op in ("placeholder", "output"):
            ctx.values.pop(node, None)
            continue
        if node.op == "get_attr":  # a parameter used directly, e.g. ``x + self.offset``
            add_param(node.target, h_y)
            continue
        rule = _rule_for(node, ctx.gm)
        contributions, local = rule(ctx, node, h_y)
        for local_name, h in local.items():
            add_param(f"{node.target}.{local_name}", h)
        for arg, h in contributions:
            if arg in ctx.needs_h:
                h = _sum_to(h, ctx.values[arg].shape)
                h_of[arg] = h_of[arg] + h if arg in h_of else h
        # Its users come later in the graph, so they are done: the value is not read again.
        # Releasing activations as the recursion passes them keeps the peak near a backward's.
        ctx.values.pop(node, None)
    return h_params


# --------------------------------------------------------------------------- exact and stochastic


def _batched_vjp(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], vectors: Sequence[Tensor]
) -> list[Tensor | None]:
    """``Σ vᵀ ∂outputs/∂inputs`` for a leading batch of vectors, in one autograd call.

    Falls back to one call per vector where an operation has no batching rule.
    """
    try:
        return list(
            torch.autograd.grad(
                outputs,
                inputs,
                vectors,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        )
    except RuntimeError as error:
        logger.debug("batched vector-Jacobian products failed (%s); looping instead", error)
    per_vector = [
        torch.autograd.grad(
            outputs, inputs, [v[i] for v in vectors], retain_graph=True, allow_unused=True
        )
        for i in range(vectors[0].shape[0])
    ]
    return [
        None if column[0] is None else torch.stack(column)
        for column in zip(*per_vector, strict=True)
    ]


def _exact_ggn(output: Tensor, loss: str, tensors: Sequence[Tensor], chunk: int) -> list[Tensor]:
    """``diag G = Σ_n Σ_k (J_nᵀ s_nk)²``: each column of each sample's factor, back-propagated."""
    factor = _output_hessian_factor(output, loss)  # (N, D, K)
    n_samples, dim, k_cols = factor.shape
    total = [torch.zeros_like(t) for t in tensors]
    for start in range(0, n_samples * k_cols, chunk):
        index = torch.arange(start, min(start + chunk, n_samples * k_cols), device=output.device)
        sample, column = index // k_cols, index % k_cols
        vectors = output.new_zeros(len(index), n_samples, dim)
        vectors[torch.arange(len(index)), sample] = factor[sample, :, column]
        vjps = _batched_vjp([output], tensors, [vectors.reshape(len(index), *output.shape)])
        for acc, v in zip(total, vjps, strict=True):
            if v is not None:
                acc += (v * v).sum(0)
    return total


def _rademacher(shape: Sequence[int], like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    signs = torch.randint(0, 2, tuple(shape), generator=generator, device=device)
    return (signs * 2 - 1).to(device=like.device, dtype=like.dtype)


def _hutchinson(
    grads: Sequence[Tensor | None],
    tensors: Sequence[Tensor],
    samples: int,
    chunk: int,
    generator: torch.Generator | None,
) -> list[Tensor]:
    """``mean over samples of v ⊙ Hv``, ``Hv`` by differentiating ``gᵀv`` (``g`` with a graph)."""
    total = [torch.zeros_like(t) for t in tensors]
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    done = 0
    while live and done < samples:
        size = min(chunk, samples - done)
        vectors = [_rademacher((size, *tensors[i].shape), tensors[i], generator) for i in live]
        products = _batched_vjp([grads[i] for i in live], [tensors[i] for i in live], vectors)
        for i, v, hv in zip(live, vectors, products, strict=True):
            if hv is not None:
                total[i] += (v * hv).sum(0)
        done += size
    # A gradient without a graph to the parameters is constant there: zero curvature.
    return [t / samples for t in total]


@dataclass
class _Estimate:
    """A Hutchinson estimate kept for ``refresh_every`` calls on one model."""

    key: tuple  # (names, shapes) it was computed for
    hessian: dict[str, Tensor]
    calls: int = 1


_ESTIMATES: weakref.WeakKeyDictionary[nn.Module, _Estimate] = weakref.WeakKeyDictionary()


def _reuse_estimate(model: nn.Module, key: tuple, refresh_every: int) -> dict[str, Tensor] | None:
    cached = _ESTIMATES.get(model)
    if refresh_every <= 1 or cached is None or cached.key != key:
        return None
    if cached.calls % refresh_every == 0:
        return None
    cached.calls += 1
    return cached.hessian


# --------------------------------------------------------------------------- the pass


def _validate(mode, loss, activation, fallback, samples, refresh_every, chunk_size) -> None:
    if mode not in MODES:
        raise CurvatureError(f"unknown curvature mode {mode!r}; known modes: {', '.join(MODES)}")
    _check_loss(loss)
    if activation not in ACTIVATION_FORMS:
        raise CurvatureError(
            f"unknown activation form {activation!r}; known: {', '.join(ACTIVATION_FORMS)}"
        )
    if fallback not in FALLBACKS:
        raise CurvatureError(f"unknown fallback {fallback!r}; known: {', '.join(FALLBACKS)}")
    for name, value in (
        ("samples", samples),
        ("refresh_every", refresh_every),
        ("chunk_size", chunk_size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CurvatureError(f"{name} must be an integer >= 1, got {value!r}")


def curvature_pass(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    *,
    loss: str = "cross_entropy",
    params: Mapping[str, Tensor] | None = None,
    mode: str = "diagonal",
    keep_graph: bool = False,
    activation: str = "gauss_newton",
    fallback: str = "error",
    samples: int = 1,
    refresh_every: int = 1,
    chunk_size: int = DEFAULT_CHUNK,
    generator: torch.Generator | None = None,
    loss_scale: float = 1.0,
) -> CurvatureResult:
    """Gradient and diagonal second derivative of ``loss(model(inputs), target)``.

    Args:
        model: a torch.fx-traceable network; in ``"diagonal"`` mode made of operations
            with a rule (see the module docstring), in the other modes anything.
        inputs, target: one batch (``target`` shaped like the output for the MSE losses).
        loss: ``"cross_entropy"`` / ``"mse"`` (mean) or ``"cross_entropy_sum"`` /
            ``"mse_sum"``.
        params: optional name → tensor mapping used instead of the model's own parameters
            (a functional call, as meta-training does); the gradient is taken with respect
            to these tensors.
        mode: ``"diagonal"`` (Becker–LeCun recursion), ``"exact"`` (diagonal of the
            generalized Gauss–Newton matrix) or ``"hutchinson"`` (``E[v ⊙ Hv]``).
        keep_graph: keep ``result.loss`` attached to ``params`` so it can itself be
            back-propagated (meta-training's meta-loss).
        activation: ``"gauss_newton"`` (default; drops ``f''``, never negative) or
            ``"full"`` (adds ``f''(x) · g_y`` at smooth activations) — diagonal mode only.
        fallback: for an operation without a rule in diagonal mode, ``"error"`` (default)
            raises ``CurvatureError`` naming it; ``"hutchinson"`` estimates the curvature of
            the parameters behind it stochastically and logs which ones.
        samples: Rademacher vectors per Hutchinson estimate.
        refresh_every: recompute a Hutchinson estimate only every ``k``-th call for this
            model and reuse the last one in between (cost amortised over ``k`` steps).
        chunk_size: vector–Jacobian products per batched backward (exact, Hutchinson).
        generator: random source of the Rademacher vectors.
        loss_scale: differentiate ``loss_scale · loss`` (mixed-precision loss scaling, so
            fp16 backward values do not underflow); the gradients *and* the second
            derivatives come back multiplied by it (``h`` is linear in the loss too) —
            unscale both before use. ``result.loss`` stays unscaled.

    Returns:
        A :class:`CurvatureResult` with detached ``grads`` and ``hessian_diag``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> r = curvature_pass(net, torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> sorted(r.hessian_diag)
        ['0.bias', '0.weight']
    """
    _validate(mode, loss, activation, fallback, samples, refresh_every, chunk_size)
    gm = _trace(model)
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = [n for n, t in params.items() if t.requires_grad]
    if not names:
        raise CurvatureError(
            "the model has no trainable parameters (every one has requires_grad=False); "
            "unfreeze some before the curvature pass"
        )
    tensors = [params[n] for n in names]
    result_node = next(iter(n for n in gm.graph.nodes if n.op == "output")).args[0]
    if not isinstance(result_node, fx.Node):
        raise CurvatureError("the model's forward must return a single tensor of logits")
    recorder = _Recorder(gm, allow_inplace=activation != "full")
    # torch.func.functional_call cannot wrap an Interpreter run: swap the tensors in by hand.
    with _swapped(gm, params):
        output = recorder.run(inputs)
    if not isinstance(output, Tensor):
        raise CurvatureError("the model's forward must return a single tensor of logits")
    loss_value = _loss_value(output, target, loss)
    if not (isinstance(loss_scale, int | float) and math.isfinite(loss_scale) and loss_scale > 0):
        raise CurvatureError(f"loss_scale must be a finite number > 0, got {loss_scale!r}")
    scaled = loss_value * loss_scale if loss_scale != 1.0 else loss_value

    hessian: dict[str, Tensor] = {}
    estimated: list[str] = []
    key = (tuple(names), tuple(tuple(t.shape) for t in tensors))
    if mode == "diagonal":
        facts = _graph_facts(gm, recorder.values, set(names), result_node)
        stochastic: set[str] = set()
        if facts.unsupported:
            described = "; ".join(_describe(n, gm) for n in facts.unsupported)
            if fallback == "error":
                raise CurvatureError(
                    f"no curvature rule for {described}; use supported operations, pass "
                    "fallback='hutchinson' to estimate the parameters behind it "
                    "stochastically, or mode='exact' / 'hutchinson'"
                )
            stochastic = facts.behind(facts.unsupported)
            logger.info(
                "no curvature rule for %s: Hutchinson estimate (%d samples) for %s",
                described,
                samples,
                ", ".join(sorted(stochastic)),
            )
        smooth = [
            n
            for n in facts.needs_h
            if activation == "full" and _rule_for(n, gm) in (_smooth_module, _smooth_function)
        ]
        chosen = [i for i, n in enumerate(names) if n in stochastic]
        reused = _reuse_estimate(model, key, refresh_every) if chosen else None
        second_order = bool(chosen) and reused is None
        all_grads = torch.autograd.grad(
            scaled,
            tensors + [recorder.values[n] for n in smooth],
            retain_graph=keep_graph or second_order,
            create_graph=second_order,
            allow_unused=True,
        )
        grads, node_grads = all_grads[: len(tensors)], all_grads[len(tensors) :]
        if chosen:
            if reused is None:
                picked = _hutchinson(
                    [grads[i] for i in chosen],
                    [tensors[i] for i in chosen],
                    samples,
                    chunk_size,
                    generator,
                )
                reused = {names[i]: h.detach() for i, h in zip(chosen, picked, strict=True)}
                _ESTIMATES[model] = _Estimate(key, reused)
            hessian.update(reused)
            estimated = sorted(reused)
        with torch.no_grad():
            detached = {node: _detach(v) for node, v in recorder.values.items()}
            recorder.values.clear()  # the recursion releases activations as it goes
            ctx = _Context(
                gm,
                detached,
                recorder.masks,
                recorder.indices,
                {n: g.detach() for n, g in zip(smooth, node_grads, strict=True) if g is not None},
                # Frozen parameters get no curvature but still carry it to the layers below.
                lambda name: (params[name] if name in params else gm.get_parameter(name)).detach(),
                facts.needs_h,
                activation,
            )
            h_out = output_curvature(output, target, loss)
            if loss_scale != 1.0:
                h_out = h_out * loss_scale
            recursed = _backward_curvature(ctx, result_node, h_out, set(facts.unsupported))
        for name, h in recursed.items():
            if name in params and name not in stochastic:
                # Gauss–Newton curvature is a sum of non-negative terms; what falls below
                # zero is round-off of the convolution kernels (seen at ~1e-10 of the max).
                hessian[name] = h.clamp_min_(0) if activation == "gauss_newton" else h
    elif mode == "exact":
        grads = torch.autograd.grad(scaled, tensors, retain_graph=True, allow_unused=True)
        for name, h in zip(names, _exact_ggn(output, loss, tensors, chunk_size), strict=True):
            hessian[name] = h * loss_scale if loss_scale != 1.0 else h
    else:  # hutchinson
        reused = _reuse_estimate(model, key, refresh_every)
        grads = torch.autograd.grad(
            scaled,
            tensors,
            retain_graph=keep_graph or reused is None,
            create_graph=reused is None,
            allow_unused=True,
        )
        if reused is None:
            picked = _hutchinson(grads, tensors, samples, chunk_size, generator)
            reused = {n: h.detach() for n, h in zip(names, picked, strict=True)}
            _ESTIMATES[model] = _Estimate(key, reused)
        hessian.update(reused)
        estimated = list(names)

    grads_by_name = {
        n: (g.detach() if g is not None else torch.zeros_like(params[n]))
        for n, g in zip(names, grads, strict=True)
    }
    # A parameter the loss does not reach through any rule has zero curvature, not an error.
    hessian_diag = {
        n: hessian[n].detach().reshape(params[n].shape)
        if n in hessian
        else torch.zeros_like(params[n]).detach()
        for n in names
    }
    return CurvatureResult(
        loss=loss_value if keep_graph else loss_value.detach(),
        output=output.detach(),
        grads=grads_by_name,
        hessian_diag=hessian_diag,
        mode=mode,
        estimated=tuple(estimated),
    )


def _detach(value: object) -> object:
    return value.detach() if isinstance(value, Tensor) else value


class _swapped:
    """Temporarily replace ``gm``'s parameters by the tensors in ``params``."""

    def __init__(self, gm: nn.Module, params: Mapping[str, Tensor]):
        self.gm = gm
        self.params = params
        self.saved: list[tuple[nn.Module, str, object]] = []

    def __enter__(self):
        own = dict(self.gm.named_parameters(remove_duplicate=False))
        for name, tensor in self.params.items():
            if name not in own:
                continue
            if own[name] is tensor:
                continue
            owner_name, _, local = name.rpartition(".")
            owner = self.gm.get_submodule(owner_name) if owner_name else self.gm
            self.saved.append((owner, local, owner._parameters[local]))
            del owner._parameters[local]
            setattr(owner, local, tensor)
        return self

    def __exit__(self, *exc):
        for owner, local, original in reversed(self.saved):
            delattr(owner, local)
            owner._parameters[local] = original
        self.saved.clear()
        return False


# --------------------------------------------------------------------------- training loop API


def backward(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    *,
    loss: str = "cross_entropy",
    mode: str = "diagonal",
    **options,
) -> Tensor:
    """Forward, loss, gradient and second derivatives in one call; returns the loss.

    Use it in place of ``loss.backward()``: each trainable parameter's ``.grad`` is
    accumulated as usual and its diagonal second derivative is stored as
    ``p.hessian_diag`` (accumulated the same way), where second-order optimizers read it.
    ``options`` are :func:`curvature_pass`'s (``activation``, ``fallback``, ``samples``,
    ``refresh_every``, ...); the mode is recorded so an optimizer can check it
    (:func:`curvature_mode_of`).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    result = curvature_pass(model, inputs, target, loss=loss, params=params, mode=mode, **options)
    for name, p in params.items():
        # Accumulate like .grad does, unless the gradient was zeroed in place since
        # (zero_grad(set_to_none=False)), which resets the curvature too.
        accumulate = p.grad is not None and _curvature_matches(p) and bool(p.grad.any())
        g, h = result.grads[name], result.hessian_diag[name]
        if name in result.estimated:
            h = h.clone()  # a Hutchinson estimate may be cached for reuse: keep it intact
        # Otherwise both are fresh tensors of this pass: store them without a copy.
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)
        if accumulate:
            p.hessian_diag.add_(h)
        else:
            p.hessian_diag = h
        p._zoo_grad_token = weakref.ref(p.grad)
        p._zoo_curvature_mode = result.mode
    return result.loss


def _curvature_matches(p: Tensor) -> bool:
    # The curvature belongs to the gradient tensor it was computed with. In-place changes
    # to that tensor (clipping, GradScaler.unscale_) keep it valid; a new gradient tensor
    # (after zero_grad(), whose default is set_to_none=True, and a plain backward) does not.
    token = getattr(p, "_zoo_grad_token", None)
    return token is not None and p.grad is not None and token() is p.grad


def curvature_mode_of(p: Tensor) -> str | None:
    """The mode of the curvature pass behind ``p``'s current gradient (None if none)."""
    return getattr(p, "_zoo_curvature_mode", None) if _curvature_matches(p) else None


def hessian_diag_of(p: Tensor, name: str = "parameter") -> Tensor:
    """The second derivative stored by :func:`backward` for ``p``'s current gradient.

    Raises ``CurvatureMissingError`` when ``p.grad`` did not come from a curvature pass
    (a plain ``loss.backward()``, or a gradient changed since).
    """
    if not _curvature_matches(p):
        raise CurvatureMissingError(
            f"{name} has a gradient but no second derivative from the same backward pass; "
            "second-order optimizers need `loss = zoo.curvature.backward(model, inputs, "
            "target)` in place of `loss.backward()`"
        )
    return p.hessian_diag
