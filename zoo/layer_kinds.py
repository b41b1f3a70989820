"""Which update net a parameter goes to, decided from the module that owns it.

A parameter of a convolution (``Conv1d``/``Conv2d``/``Conv3d``) is ``conv``; a parameter of
a ``Linear`` is ``fc``; anything else (norms, embeddings, transposed convolutions, bare
``nn.Parameter`` s on a container) is ``other`` and handled by the ``other`` policy:

* ``"adam"`` (default): hand them to ``torch.optim.Adam``; the report says so;
* ``"conv"`` / ``"fc"``: route them to that update net;
* ``"error"``: refuse, naming the parameters.

The kind comes from the owning module, never from the tensor's rank: a ``Linear`` bias
and a ``Conv2d`` bias are both 1-d but go to different nets.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn

from .errors import ConfigError

__all__ = ["KINDS", "OTHER_POLICIES", "Assignment", "assign", "layer_kind", "report"]

KINDS = ("conv", "fc")
OTHER_POLICIES = ("adam", "conv", "fc", "error")


@dataclass(frozen=True)
class Assignment:
    name: str
    param: nn.Parameter
    module_type: str
    kind: str  # the layer kind of the owner ("conv", "fc" or "other")
    route: str  # where it goes: "conv", "fc" or "adam"


def layer_kind(module: nn.Module) -> str:
    """``"conv"``, ``"fc"`` or ``"other"`` for the parameters owned directly by ``module``."""
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "fc"
    return "other"


def assign(model: nn.Module, kinds: tuple[str, ...], other: str = "adam") -> list[Assignment]:
    """Assign every trainable parameter of ``model`` to a route.

    ``kinds`` are the layer kinds the checkpoint has update nets for. A parameter whose
    kind has no net follows the ``other`` policy too.
    """
    if other not in OTHER_POLICIES:
        raise ConfigError(
            f"unknown policy other={other!r}; choose one of {', '.join(OTHER_POLICIES)}"
        )
    if other in KINDS and other not in kinds:
        raise ConfigError(f"policy other={other!r} names a net this checkpoint lacks: {kinds}")
    result = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        kind = layer_kind(module)
        for local, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            name = f"{module_name}.{local}" if module_name else local
            route = kind if kind in kinds else other
            result.append(Assignment(name, param, type(module).__name__, kind, route))
    refused = [a.name for a in result if a.route == "error"]
    if refused:
        raise ConfigError(
            f"no update net for {len(refused)} parameter(s) ({', '.join(refused[:5])}"
            f"{', ...' if len(refused) > 5 else ''}); pass other='adam', 'conv' or 'fc'"
        )
    return result


def report(assignments: list[Assignment]) -> str:
    """A human-readable table: parameter, owner, shape, and which net it went to."""
    lines = [f"{'parameter':<32} {'module':<12} {'shape':<18} net"]
    for a in assignments:
        shape = "x".join(str(s) for s in a.param.shape) or "scalar"
        lines.append(f"{a.name:<32} {a.module_type:<12} {shape:<18} {a.route}")
    counts = Counter(a.route for a in assignments)
    sizes = Counter()
    for a in assignments:
        sizes[a.route] += a.param.numel()
    summary = ", ".join(f"{r}: {counts[r]} tensors / {sizes[r]:,} coords" for r in sorted(counts))
    lines.append(f"total -> {summary}")
    return "\n".join(lines)
