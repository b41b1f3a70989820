"""Which update net a parameter goes to, decided from the module that owns it.

The kind comes from the owning module, never from the tensor's rank: a ``Linear`` bias
and a ``Conv2d`` bias are both 1-d but go to different nets. Every module falls in one
*family*:

==================  ==============================================  =================
family              modules                                         default route
==================  ==============================================  =================
``conv``            ``Conv2d``, ``Conv3d``                          the ``conv`` net
``fc``              ``Linear`` (and ``LazyLinear``)                 the ``fc`` net
``conv1d``          ``Conv1d``                                      the ``conv`` net
``conv_transpose``  ``ConvTranspose1d/2d/3d``                       ``other`` policy
``embedding``       ``Embedding``, ``EmbeddingBag``                 ``other`` policy
``norm``            batch/instance/layer/group/RMS norms            ``other`` policy
``parameter``       a bare ``nn.Parameter`` set on any other module  ``other`` policy
==================  ==============================================  =================

A bare parameter is one owned by a module that is none of the above (a container, a
custom block, an attention layer's ``in_proj_weight``).

Routes: ``"conv"`` / ``"fc"`` (that update net), ``"adam"`` / ``"sgd"`` (hand the
parameter to that ``torch.optim`` baseline at the optimizer's ``other_lr``) or ``"error"``
(refuse, naming the parameters). The ``other`` argument is either one route for every
family without a net of its own (default ``"adam"``), or a mapping from family to route,
with ``"default"`` for the families it does not name::

    opt = pretrained.attach(model, other={"embedding": "sgd", "norm": "fc", "default": "adam"})

A parameter whose family routes to a net the checkpoint lacks falls back to the default
route. :func:`report` prints every parameter with its family and route.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from .errors import ConfigError

__all__ = [
    "BASELINES",
    "FAMILIES",
    "KINDS",
    "OTHER_POLICIES",
    "Assignment",
    "assign",
    "family_of",
    "layer_kind",
    "report",
    "resolve_policy",
]

KINDS = ("conv", "fc")
BASELINES = ("adam", "sgd")
OTHER_POLICIES = ("adam", "sgd", "conv", "fc", "error")
FAMILIES = ("conv", "fc", "conv1d", "conv_transpose", "embedding", "norm", "parameter")
# Families with a net of their own; ``conv1d`` shares the conv net by default (a 1-d
# convolution's weights are shared over positions like a 2-d one's) but can be re-routed.
_FIXED = {"conv": "conv", "fc": "fc"}
_DEFAULT_ROUTES = {"conv1d": "conv"}

_NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclass(frozen=True)
class Assignment:
    name: str
    param: nn.Parameter
    module_type: str
    kind: str  # the layer kind of the owner ("conv", "fc" or "other")
    route: str  # where it goes: "conv", "fc", "adam" or "sgd"
    family: str = ""  # the owner's family (see the module docstring)


def family_of(module: nn.Module) -> str:
    """The family (see the module docstring) of the parameters ``module`` owns directly."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "conv_transpose"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d | nn.Conv3d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "fc"
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "embedding"
    if isinstance(module, _NORMS):
        return "norm"
    return "parameter"


def layer_kind(module: nn.Module) -> str:
    """``"conv"``, ``"fc"`` or ``"other"`` for the parameters owned directly by ``module``."""
    family = family_of(module)
    if family in ("conv", "conv1d"):
        return "conv"
    return "fc" if family == "fc" else "other"


def resolve_policy(other: str | Mapping[str, str], kinds: tuple[str, ...]) -> dict[str, str]:
    """``other`` (a route, or family → route) → the route of every family, validated."""
    if isinstance(other, str):
        overrides, default = {}, other
    elif isinstance(other, Mapping):
        overrides = {k: v for k, v in other.items() if k != "default"}
        default = other.get("default", "adam")
        unknown = sorted(str(k) for k in overrides if k not in FAMILIES or k in _FIXED)
        if unknown:
            allowed = ", ".join(f for f in FAMILIES if f not in _FIXED)
            raise ConfigError(
                f"unknown layer family {', '.join(unknown)} in other=; allowed: {allowed}, default"
            )
    else:
        raise ConfigError(f"other must be a route or a mapping family -> route, got {other!r}")
    for where, route in [("default", default), *overrides.items()]:
        if route not in OTHER_POLICIES:
            raise ConfigError(
                f"unknown policy other[{where!r}]={route!r}; choose one of "
                f"{', '.join(OTHER_POLICIES)}"
            )
        if route in KINDS and route not in kinds:
            raise ConfigError(
                f"policy other[{where!r}]={route!r} names a net this checkpoint lacks: {kinds}"
            )
    policy = {}
    for family in FAMILIES:
        route = _FIXED.get(family) or overrides.get(family) or _DEFAULT_ROUTES.get(family, default)
        if route in KINDS and route not in kinds:
            route = default
        policy[family] = route
    return policy


def assign(
    model: nn.Module, kinds: tuple[str, ...], other: str | Mapping[str, str] = "adam"
) -> list[Assignment]:
    """Assign every trainable parameter of ``model`` to a route.

    ``kinds`` are the layer kinds the checkpoint has update nets for; ``other`` is the
    policy for the rest (see the module docstring).
    """
    policy = resolve_policy(other, kinds)
    result = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        family = family_of(module)
        kind = layer_kind(module)
        for local, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            name = f"{module_name}.{local}" if module_name else local
            route = policy[family]
            result.append(Assignment(name, param, type(module).__name__, kind, route, family))
    refused = [a.name for a in result if a.route == "error"]
    if refused:
        raise ConfigError(
            f"no update net for {len(refused)} parameter(s) ({', '.join(refused[:5])}"
            f"{', ...' if len(refused) > 5 else ''}); pass other='adam', 'sgd', 'conv' or 'fc'"
        )
    return result


def report(assignments: list[Assignment]) -> str:
    """A human-readable table: parameter, owner, shape, family, and where it went."""
    lines = [f"{'parameter':<32} {'module':<12} {'shape':<18} {'family':<15} net"]
    for a in assignments:
        shape = "x".join(str(s) for s in a.param.shape) or "scalar"
        route = a.route if a.route in KINDS else f"{a.route} (baseline)"
        lines.append(f"{a.name:<32} {a.module_type:<12} {shape:<18} {a.family:<15} {route}")
    counts = Counter(a.route for a in assignments)
    sizes = Counter()
    for a in assignments:
        sizes[a.route] += a.param.numel()
    summary = ", ".join(f"{r}: {counts[r]} tensors / {sizes[r]:,} coords" for r in sorted(counts))
    lines.append(f"total -> {summary}")
    return "\n".join(lines)
