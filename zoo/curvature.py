"""Second-order back-propagation: the gradient and the diagonal of the loss Hessian.

One pass yields, for every parameter, the gradient (by autograd, exact) and the diagonal
second derivative ``hessian_diag`` by the Becker–LeCun (1988) diagonal recursion.

The recursion. Write ``h_z = d²L/dz²`` for the diagonal curvature of the loss with respect
to a tensor ``z``. At the network output ``z`` (the logits) it starts from the exact
diagonal of the loss Hessian: ``p(1 - p)`` for softmax cross-entropy (divided by the batch
size for ``reduction="mean"``). It then runs backwards through the graph:

* linear maps ``y = W x (+ b)`` (``Linear``, ``Conv2d``): ``h_x = (W²)ᵀ h_y``,
  ``h_W = Σ_samples h_y (x²)ᵀ`` and ``h_b = Σ h_y``, i.e. squared weights on the way back and
  squared inputs for the weights;
* elementwise activations ``y = f(x)``: ``h_x = f'(x)² h_y + f''(x) g_y``; for ReLU the
  second term vanishes almost everywhere, so ``h_x = 1[x > 0] h_y`` (zero for dead units);
* max-pooling routes ``h_y`` to the selected inputs, ``Flatten`` reshapes it, sums pass it
  to every summand.

What it approximates, and why. The recursion keeps only the diagonal of each intermediate
Hessian: cross terms ``d²L/dz_i dz_j`` between different units of a layer are dropped at
every step. The result is therefore *exact for the last layer* (its weights see the
output Hessian's diagonal directly, sample by sample) and an approximation of the true
Hessian diagonal for earlier layers. It is cheap — one extra backward-shaped pass — and
never negative for piecewise-linear networks under cross-entropy, which is what the update
nets need as an input: a per-coordinate, positive measure of curvature.

Use it in an ordinary training loop:

    >>> loss = zoo.curvature.backward(model, inputs, target)   # instead of loss.backward()
    >>> optimizer.step()                                       # reads p.grad, p.hessian_diag

or functionally (meta-training, SOU) with :func:`curvature_pass`.

The graph is captured with ``torch.fx``, so any traceable model made of the supported
operations works, not only ``nn.Sequential``; an operation without a rule is a
``CurvatureError`` naming the module path and the operation.
"""

from __future__ import annotations

import logging
import operator
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .errors import CurvatureError, CurvatureMissingError

__all__ = [
    "LOSSES",
    "MODES",
    "CurvatureResult",
    "backward",
    "curvature_pass",
    "hessian_diag_of",
    "output_curvature",
]

logger = logging.getLogger(__name__)

MODES = ("diagonal",)
LOSSES = ("cross_entropy", "cross_entropy_sum")


@dataclass
class CurvatureResult:
    """What one curvature pass returns.

    ``loss`` keeps its graph to the parameters when the pass was asked to (meta-training
    needs it); ``grads`` and ``hessian_diag`` are detached, keyed by parameter name.
    """

    loss: Tensor
    output: Tensor
    grads: dict[str, Tensor]
    hessian_diag: dict[str, Tensor]


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
                f"cannot trace {type(model).__name__} with torch.fx ({error}); the diagonal "
                "curvature pass needs a forward without data-dependent control flow"
            ) from error
        _TRACES[model] = traced
    return traced


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps every node's value (what the backward recursion reads)."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.values: dict[fx.Node, object] = {}

    def run_node(self, node: fx.Node):
        if node.op == "call_module":
            submodule = self.module.get_submodule(node.target)
            if getattr(submodule, "inplace", False):
                # An in-place module would overwrite the input we recorded; record a copy.
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                args = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
                value = submodule(*args, **kwargs)
                self.values[node] = value
                return value
        value = super().run_node(node)
        self.values[node] = value
        return value


# --------------------------------------------------------------------------- losses


def output_curvature(output: Tensor, target: Tensor, loss: str) -> Tensor:
    """Exact diagonal of the loss Hessian with respect to the network output."""
    if loss in ("cross_entropy", "cross_entropy_sum"):
        logits = output.detach()
        # Half-precision logits get the softmax in fp32; fp32/fp64 keep their precision.
        p = torch.softmax(logits.float() if logits.element_size() < 4 else logits, dim=-1)
        h = p * (1.0 - p)
        if loss == "cross_entropy":
            h = h / output.shape[0]
        return h.to(output.dtype)
    raise CurvatureError(f"unknown loss {loss!r}; known losses: {', '.join(LOSSES)}")


def _loss_value(output: Tensor, target: Tensor, loss: str) -> Tensor:
    if loss == "cross_entropy":
        return F.cross_entropy(output, target)
    if loss == "cross_entropy_sum":
        return F.cross_entropy(output, target, reduction="sum")
    raise CurvatureError(f"unknown loss {loss!r}; known losses: {', '.join(LOSSES)}")


# --------------------------------------------------------------------------- rules
#
# A rule maps (module, input values, output value, h_out, weights) to the curvature of each
# tensor input (None where not needed) and of the module's own parameters.

ParamLookup = Callable[[str], Tensor]


def _linear_rule(module: nn.Linear, x: Tensor, h_y: Tensor, weight: ParamLookup, need_x: bool):
    w = weight("weight")
    x2 = (x * x).reshape(-1, x.shape[-1])
    hy = h_y.reshape(-1, h_y.shape[-1])
    params = {"weight": hy.t() @ x2}
    if module.bias is not None:
        params["bias"] = hy.sum(0)
    h_x = (h_y @ (w * w)) if need_x else None
    return h_x, params


def _conv2d_rule(module: nn.Conv2d, x: Tensor, h_y: Tensor, weight: ParamLookup, need_x: bool):
    if module.padding_mode != "zeros":
        raise CurvatureError(
            f"Conv2d padding_mode={module.padding_mode!r} has no curvature rule; use 'zeros'"
        )
    w = weight("weight")
    conv_args = (module.stride, module.padding, module.dilation, module.groups)
    params = {"weight": torch.nn.grad.conv2d_weight(x * x, w.shape, h_y, *conv_args)}
    if module.bias is not None:
        params["bias"] = h_y.sum((0, 2, 3))
    h_x = torch.nn.grad.conv2d_input(x.shape, w * w, h_y, *conv_args) if need_x else None
    return h_x, params


def _relu_rule(y: Tensor, h_y: Tensor) -> Tensor:
    # relu(x) > 0 exactly where x > 0, so the output gives the mask even after in-place use.
    return h_y * (y > 0).to(h_y.dtype)


def _maxpool2d_rule(module: nn.MaxPool2d, x: Tensor, h_y: Tensor) -> Tensor:
    # The Jacobian of max-pooling is a 0/1 selection, so its square is itself: h goes to
    # the selected inputs exactly as a gradient would (summed where windows overlap).
    def pool(t: Tensor) -> Tensor:
        return F.max_pool2d(
            t,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.ceil_mode,
        )

    _, vjp = torch.func.vjp(pool, x)
    return vjp(h_y)[0]


_RESHAPES = {torch.flatten, torch.reshape, Tensor.view, Tensor.reshape, Tensor.flatten}
_SUMS = {operator.add, operator.iadd, torch.add, Tensor.add}
_RELUS = {F.relu, torch.relu, Tensor.relu}


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(gm.get_submodule(node.target)).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target!r} (node {node.name!r})"


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


# --------------------------------------------------------------------------- the pass


def _backward_curvature(
    gm: fx.GraphModule,
    values: Mapping[fx.Node, object],
    output_node: fx.Node,
    h_output: Tensor,
    lookup: Callable[[str], Tensor],
) -> dict[str, Tensor]:
    """Run the diagonal recursion from the output back to the inputs."""
    h_of: dict[fx.Node, Tensor] = {output_node: h_output}
    h_params: dict[str, Tensor] = {}

    def give(node: object, h: Tensor | None) -> None:
        if h is None or not isinstance(node, fx.Node) or node.op in ("placeholder", "get_attr"):
            return
        value = values[node]
        if not isinstance(value, Tensor) or not value.is_floating_point():
            return
        h = _sum_to(h, value.shape)
        h_of[node] = h_of[node] + h if node in h_of else h

    def needed(arg: object) -> bool:
        return isinstance(arg, fx.Node) and arg.op not in ("placeholder", "get_attr")

    for node in reversed(gm.graph.nodes):
        h_y = h_of.pop(node, None)
        if h_y is None or node.op in ("placeholder", "get_attr", "output"):
            continue
        args = node.args
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            x = values[args[0]]

            def weight(local: str, _prefix=node.target) -> Tensor:
                return lookup(f"{_prefix}.{local}")

            if isinstance(module, nn.Linear):
                h_x, local = _linear_rule(module, x, h_y, weight, needed(args[0]))
            elif isinstance(module, nn.Conv2d):
                h_x, local = _conv2d_rule(module, x, h_y, weight, needed(args[0]))
            elif isinstance(module, nn.ReLU):
                h_x, local = _relu_rule(values[node], h_y), {}
            elif isinstance(module, nn.MaxPool2d):
                h_x, local = _maxpool2d_rule(module, x, h_y), {}
            elif isinstance(module, nn.Flatten):
                h_x, local = h_y.reshape(x.shape), {}
            else:
                raise CurvatureError(
                    f"no curvature rule for {_describe(node, gm)}; supported modules: Linear, "
                    "Conv2d, ReLU, MaxPool2d, Flatten"
                )
            for local_name, h in local.items():
                name = f"{node.target}.{local_name}"
                h_params[name] = h_params[name] + h if name in h_params else h
            give(args[0], h_x)
        elif node.target in _RESHAPES:
            give(args[0], h_y.reshape(values[args[0]].shape))
        elif node.target in _SUMS:
            for arg in args:
                give(arg, h_y)
        elif node.target in _RELUS:
            give(args[0], _relu_rule(values[node], h_y))
        elif node.op == "call_method" and node.target == "size":
            continue
        else:
            raise CurvatureError(f"no curvature rule for {_describe(node, gm)}")
    return h_params


def curvature_pass(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    *,
    loss: str = "cross_entropy",
    params: Mapping[str, Tensor] | None = None,
    mode: str = "diagonal",
    keep_graph: bool = False,
) -> CurvatureResult:
    """Gradient and diagonal second derivative of ``loss(model(inputs), target)``.

    Args:
        model: a torch.fx-traceable network of supported operations.
        inputs, target: one batch.
        loss: ``"cross_entropy"`` (mean over the batch) or ``"cross_entropy_sum"``.
        params: optional name → tensor mapping used instead of the model's own parameters
            (a functional call, as meta-training does); the gradient is taken with respect
            to these tensors.
        mode: ``"diagonal"`` (Becker–LeCun recursion).
        keep_graph: keep ``result.loss`` attached to ``params`` so it can itself be
            back-propagated (meta-training's meta-loss).

    Returns:
        A :class:`CurvatureResult` with detached ``grads`` and ``hessian_diag``.
    """
    if mode not in MODES:
        raise CurvatureError(f"unknown curvature mode {mode!r}; known modes: {', '.join(MODES)}")
    gm = _trace(model)
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    recorder = _Recorder(gm)
    # torch.func.functional_call cannot wrap an Interpreter run: swap the tensors in by hand.
    with _swapped(gm, params):
        output = recorder.run(inputs)
    loss_value = _loss_value(output, target, loss)
    names = [n for n, t in params.items() if t.requires_grad]
    grads = torch.autograd.grad(
        loss_value, [params[n] for n in names], retain_graph=keep_graph, allow_unused=True
    )
    grads_by_name = {
        n: (g.detach() if g is not None else torch.zeros_like(params[n]))
        for n, g in zip(names, grads, strict=True)
    }
    output_node = next(iter(n for n in gm.graph.nodes if n.op == "output"))
    result_node = output_node.args[0]
    if not isinstance(result_node, fx.Node):
        raise CurvatureError("the model's forward must return a single tensor of logits")
    with torch.no_grad():
        detached = {node: _detach(v) for node, v in recorder.values.items()}
        h_out = output_curvature(output, target, loss)
        h_params = _backward_curvature(
            gm, detached, result_node, h_out, lambda name: params[name].detach()
        )
    hessian = {}
    for n in names:
        h = h_params.get(n)
        # A parameter the output does not depend on through a rule has zero curvature.
        hessian[n] = h.reshape(params[n].shape) if h is not None else torch.zeros_like(params[n])
    return CurvatureResult(
        loss=loss_value if keep_graph else loss_value.detach(),
        output=output.detach(),
        grads=grads_by_name,
        hessian_diag={n: h.detach() for n, h in hessian.items()},
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
) -> Tensor:
    """Forward, loss, gradient and second derivatives in one call; returns the loss.

    Use it in place of ``loss.backward()``: each trainable parameter's ``.grad`` is
    accumulated as usual and its diagonal second derivative is stored as
    ``p.hessian_diag`` (accumulated the same way), where second-order optimizers read it.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    result = curvature_pass(model, inputs, target, loss=loss, params=params, mode=mode)
    for name, p in params.items():
        accumulate = p.grad is not None and _curvature_matches(p)
        g, h = result.grads[name], result.hessian_diag[name]
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)
        if accumulate:
            p.hessian_diag.add_(h)
        else:
            p.hessian_diag = h.clone()
        p._zoo_grad_token = (weakref.ref(p.grad), p.grad._version)
    return result.loss


def _curvature_matches(p: Tensor) -> bool:
    token = getattr(p, "_zoo_grad_token", None)
    if token is None or p.grad is None:
        return False
    ref, version = token
    return ref() is p.grad and p.grad._version == version


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
