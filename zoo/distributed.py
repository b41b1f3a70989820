"""Many GPUs with ``torch.distributed``: every rank takes the same learned step.

Launch with ``torchrun --nproc-per-node=N`` (or any launcher that sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``) and call :func:`init_from_env` once.

Data parallelism, DDP-style. Each rank runs the forward, the loss and the curvature pass on
its own batch; :class:`zoo.LearnedOptimizer` then averages the flat gradient *and* the flat
second derivative of each layer kind across ranks (one ``all_reduce`` each — they are
already one contiguous bucket) before the features are computed. All ranks start from the
same parameters (:func:`broadcast_module`), see the same averaged inputs and run the same
deterministic update, so parameters and LSTM state stay bitwise identical without ever
being communicated (tests/test_distributed.py checks it after every step).

Do not wrap the model in ``DistributedDataParallel``: DDP averages gradients from hooks on
``loss.backward()``, but the curvature pass takes its gradient with ``torch.autograd.grad``
on a ``torch.fx`` trace of the bare module, and DDP would not average the second
derivative anyway. :func:`refuse_wrapped` says so.

Sharded training (FSDP, ZeRO) is refused, for two reasons that are not just work left:
the ``h_rel`` feature divides each coordinate's curvature by the mean over its whole
parameter tensor, which a shard does not hold, and the curvature pass traces the full,
unsharded module with ``torch.fx`` (FSDP's flattened parameters and its all-gathers in
forward hooks are not in that graph). The LSTM state itself would shard cleanly — it is per
coordinate; a sharded path needs a cross-shard segment mean and a curvature pass over
FSDP's unit boundaries.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ConfigError

__all__ = [
    "average_",
    "average_gradients",
    "broadcast_module",
    "init_from_env",
    "is_distributed",
    "rank",
    "refuse_wrapped",
    "world_size",
]

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(device: torch.device | None = None) -> bool:
    """Join the process group ``torchrun`` describes in the environment, if any.

    Uses NCCL for CUDA devices and gloo otherwise; returns whether a group of more than
    one rank is active.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return is_distributed()
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    logger.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return is_distributed()


def average_(tensors: Sequence[Tensor]) -> None:
    """Average each tensor across ranks, in place (no-op outside a process group)."""
    if not is_distributed() or not tensors:
        return
    if len(tensors) == 1:
        flat = tensors[0]
        dist.all_reduce(flat)
        flat.div_(world_size())
        return
    # One collective for the lot (baselines' many small gradients).
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat.div_(world_size())
    for t, piece in zip(tensors, torch.split(flat, [t.numel() for t in tensors]), strict=True):
        t.copy_(piece.view_as(t))


def average_gradients(g: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The rank-average of a flat gradient and second derivative (inputs untouched)."""
    if not is_distributed():
        return g, h
    g = g.clone()
    average_([g])
    if h is not None:
        h = h.clone()
        average_([h])
    return g, h


@torch.no_grad()
def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (same start everywhere)."""
    if not is_distributed():
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src)


def refuse_wrapped(model: nn.Module) -> nn.Module:
    """Refuse DDP/FSDP-wrapped models with the reason (see the module docstring)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise ConfigError(
            "pass the bare module, not DistributedDataParallel(model): LearnedOptimizer "
            "averages the gradient and the second derivative across ranks itself, and the "
            "curvature pass needs the unwrapped module"
        )
    fsdp_types = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp_types.append(FullyShardedDataParallel)
    except ImportError:  # builds without distributed support
        pass
    sharded = isinstance(model, tuple(fsdp_types)) if fsdp_types else False
    sharded |= any(type(p).__name__ == "DTensor" for p in model.parameters())
    if sharded:
        raise ConfigError(
            "sharded models (FSDP, DTensor parameters) are not supported: the h_rel feature "
            "needs each parameter tensor's whole curvature and the curvature pass traces the "
            "unsharded module; use data parallelism (every rank holds the full model) — see "
            "zoo.distributed"
        )
    return model
