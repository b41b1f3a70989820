"""A fast update step: the coordinate-wise LSTM over millions of coordinates.

The update nets are tiny (2 layers x 20 units) but run once per coordinate per step: about
10.5 kFLOP per parameter, almost all of it in two small matrix products per layer. Run
naively (``nn.LSTMCell`` on all ``N`` coordinates at once) every intermediate is an
``(N, 80)`` tensor — 3.5 GB per layer for ResNet-18's 11.7 M parameters — and each of a
dozen element-wise kernels streams it through memory, so the step is memory-bound at
15-30x the arithmetic it needs.

:class:`FusedUpdateNet` evaluates the same net chunk by chunk, ``chunk_size`` coordinates
at a time, so the working set is bounded (``chunk_size x ~200`` floats) and stays in
cache, and fuses each layer into one GEMM: the input and the previous hidden state are
copied side by side into one preallocated ``(chunk, in + hidden)`` buffer and multiplied
by the stacked ``[W_ih | W_hh]ᵀ`` with the two biases pre-summed (``torch.addmm`` into a
preallocated gate buffer). The gate rows are reordered to ``(i, f, o, g)`` and the g rows doubled, so one in-place
sigmoid over the contiguous gate buffer covers all four (``tanh(z) = 2σ(2z) − 1``; PyTorch's
CPU ``tanh`` measured ~10x slower than its ``sigmoid``). The state is updated in place.

Options (:class:`UpdateOptions`, passed to ``LearnedOptimizer(..., options=...)``):

* ``chunk_size``: coordinates per chunk; ``None`` (default) keeps today's one-shot path,
  bit for bit;
* ``state_dtype=torch.bfloat16``: keep the 80 LSTM numbers per coordinate in bf16 (half
  the optimizer memory); every chunk is computed in fp32 and rounded on the way back;
* ``hessian_every=k``: recompute the second derivative only every ``k``-th step and feed
  the last one in between (those steps cost a plain backward);
* ``compile=True``: ``torch.compile`` the per-chunk cell (one fused kernel for the
  element-wise part); any failure falls back to the hand-fused path with a warning.

Meta-training never comes here: it needs the differentiable one-shot path
(:func:`zoo.optimizer.learned_step`), whose numerics this module reproduces to float
round-off (tests/test_scale.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ConfigError
from .features import FeatureSpec, FeatureState, compute_features
from .update_net import UpdateNet

__all__ = ["DEFAULT_CHUNK", "FusedUpdateNet", "UpdateOptions", "fast_learned_step"]

logger = logging.getLogger(__name__)

# 2 Ki coordinates: the gate buffer is 2 Ki x 80 x 4 B = 640 KB, inside one core's L2 here;
# measured 770 ns/param at 2 Ki against 830 at 1 Ki, 800 at 4 Ki, 990 at 16 Ki and 1580 at
# 64 Ki (benchmarks/update_step.py, 1 thread).
DEFAULT_CHUNK = 2048
STATE_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class UpdateOptions:
    """How :class:`zoo.LearnedOptimizer` evaluates its update nets (see the module doc)."""

    chunk_size: int | None = None
    state_dtype: torch.dtype = torch.float32
    hessian_every: int = 1
    compile: bool = False

    def __post_init__(self) -> None:
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1 or None, got {self.chunk_size}")
        if self.state_dtype not in STATE_DTYPES:
            raise ConfigError(
                f"state_dtype must be torch.float32 or torch.bfloat16, got {self.state_dtype}"
            )
        if self.hessian_every < 1:
            raise ConfigError(f"hessian_every must be >= 1, got {self.hessian_every}")

    @property
    def fast(self) -> bool:
        """Whether the fused path is used (anything but the defaults)."""
        return self.chunk_size is not None or self.state_dtype != torch.float32 or self.compile


class FusedUpdateNet:
    """A no-grad, chunked, fused evaluator of one :class:`UpdateNet`.

    Example:
        >>> net = UpdateNet(num_features=5)
        >>> fused = FusedUpdateNet(net, chunk_size=4096)
        >>> state = net.init_state(10_000)
        >>> out = fused(torch.zeros(10_000, 5), state)   # state advanced in place
        >>> out.shape
        torch.Size([10000, 2])
    """

    def __init__(self, net: UpdateNet, chunk_size: int | None = None, compile: bool = False):
        self.net = net
        self.chunk_size = chunk_size or DEFAULT_CHUNK
        self.compile = compile
        self._compiled = None
        self._weights_key: tuple | None = None
        self._buffers: dict = {}

    # ------------------------------------------------------------------ weights

    def _key(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.net.parameters())

    def _refresh_weights(self) -> None:
        """Stacked ``[W_ih | W_hh]ᵀ`` per layer, gate rows reordered (i, f, g, o) -> (i, f, o, g)."""
        key = self._key()
        if key == self._weights_key:
            return
        hs = self.net.hidden_size
        order = torch.cat(
            [torch.arange(0, 2 * hs), torch.arange(3 * hs, 4 * hs), torch.arange(2 * hs, 3 * hs)]
        )
        layers = []
        with torch.no_grad():
            for cell in self.net.cells:
                order_d = order.to(cell.weight_ih.device)
                stacked = torch.cat([cell.weight_ih, cell.weight_hh], dim=1)[order_d]
                bias = (cell.bias_ih + cell.bias_hh)[order_d]
                # tanh(z) = 2·σ(2z) − 1: doubling the g rows lets one sigmoid cover all four
                # gates (measured: PyTorch's CPU tanh is ~10x slower than its sigmoid).
                stacked[3 * hs :] *= 2
                bias[3 * hs :] *= 2
                layers.append((stacked.t().contiguous().float(), bias.float().contiguous()))
            head = (
                self.net.head.weight.t().contiguous().float(),
                self.net.head.bias.float().contiguous(),
            )
        self._layers, self._head = layers, head
        self._weights_key = key

    def _buffers_for(self, device: torch.device) -> dict:
        if device not in self._buffers:
            hs, n = self.net.hidden_size, self.chunk_size
            sizes = [self.net.num_features] + [hs] * (self.net.num_layers - 1)
            self._buffers[device] = {
                "xh": [torch.empty(n, s + hs, device=device) for s in sizes],
                "gates": torch.empty(n, 4 * hs, device=device),
                "c": torch.empty(n, hs, device=device),
                "h": torch.empty(n, hs, device=device),
            }
        return self._buffers[device]

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def __call__(self, features: Tensor, state: Tensor) -> Tensor:
        """LSTM outputs ``(N, 2)`` for ``N`` coordinates; ``state`` is advanced in place."""
        self._refresh_weights()
        n = features.shape[0]
        out = torch.empty(n, 2, device=features.device)
        if self.compile and self._compiled is None:
            self._compiled = _try_compile()
        buffers = self._buffers_for(features.device)
        for start in range(0, n, self.chunk_size):
            stop = min(start + self.chunk_size, n)
            if self._compiled:
                try:
                    out[start:stop] = self._compiled(
                        features[start:stop], state[start:stop], self._layers, self._head
                    )
                    continue
                except Exception as error:  # inductor raises many types; all mean "not here"
                    logger.warning(
                        "torch.compile'd update cell failed (%s); using the fused cell", error
                    )
                    self._compiled = False
            self._chunk(features[start:stop], state[start:stop], out[start:stop], buffers)
        return out

    def _chunk(self, x: Tensor, state: Tensor, out: Tensor, buffers: dict) -> None:
        hs, m = self.net.hidden_size, x.shape[0]
        gates, c, h = buffers["gates"][:m], buffers["c"][:m], buffers["h"][:m]
        for i, (weight_t, bias) in enumerate(self._layers):
            h_slot = state[:, 2 * i * hs : (2 * i + 1) * hs]
            c_slot = state[:, (2 * i + 1) * hs : (2 * i + 2) * hs]
            xh = buffers["xh"][i][:m]
            width = xh.shape[1] - hs
            xh[:, :width].copy_(x)
            xh[:, width:].copy_(h_slot)
            torch.addmm(bias, xh, weight_t, out=gates)
            torch.sigmoid_(gates)  # i, f, o; and σ(2z) for g
            g, o = gates[:, 3 * hs :], gates[:, 2 * hs : 3 * hs]
            g.mul_(2).sub_(1)  # g = tanh(z)
            torch.mul(gates[:, hs : 2 * hs], c_slot, out=c)  # f · c_prev
            c.addcmul_(gates[:, :hs], g)  # + i · g
            torch.mul(c, 2, out=h)
            torch.sigmoid_(h)
            h.mul_(o).mul_(2).sub_(o)  # o · tanh(c) = o · (2σ(2c) − 1)
            h_slot.copy_(h)
            c_slot.copy_(c)
            x = h
        torch.addmm(self._head[1], x, self._head[0], out=out)


def _cell_reference(x: Tensor, state: Tensor, layers, head) -> Tensor:
    """The per-chunk cell in plain tensor ops, for ``torch.compile`` to fuse."""
    hs = layers[0][0].shape[1] // 4
    new = []
    for i, (weight_t, bias) in enumerate(layers):
        h_prev = state[:, 2 * i * hs : (2 * i + 1) * hs].float()
        c_prev = state[:, (2 * i + 1) * hs : (2 * i + 2) * hs].float()
        gates = torch.addmm(bias, torch.cat([x, h_prev], dim=1), weight_t)
        ifo = torch.sigmoid(gates[:, : 3 * hs])
        g = 2 * torch.sigmoid(gates[:, 3 * hs :]) - 1  # the g rows are doubled
        c = ifo[:, hs : 2 * hs] * c_prev + ifo[:, :hs] * g
        h = ifo[:, 2 * hs :] * (2 * torch.sigmoid(2 * c) - 1)
        new += [h, c]
        x = h
    state.copy_(torch.cat(new, dim=1))
    return torch.addmm(head[1], x, head[0])


def _try_compile():
    try:
        return torch.compile(_cell_reference, dynamic=True)
    except Exception as error:  # no compiler, unsupported platform, ...
        logger.warning("torch.compile unavailable (%s); using the hand-fused cell", error)
        return False


def fast_learned_step(
    fused: FusedUpdateNet,
    spec: FeatureSpec,
    features_state: FeatureState,
    lstm_state: Tensor,
    grad: Tensor,
    hess: Tensor | None,
    segments: Tensor,
    counts: Tensor,
) -> tuple[Tensor, FeatureState, Tensor]:
    """:func:`zoo.optimizer.learned_step` through :class:`FusedUpdateNet` (no grad).

    ``lstm_state`` is advanced in place and returned.
    """
    # TODO: the features are still computed for all N coordinates at once (about 10
    # N-sized fp32 temporaries); chunking them at parameter-tensor boundaries would bound
    # that too (the segment means of h need whole tensors).
    with torch.no_grad():
        feats, adam_dir, features_state = compute_features(
            spec, features_state, grad, hess, segments, counts
        )
        outputs = fused(feats, lstm_state)
        update = fused.net.update(outputs, adam_dir, feats[:, 0])
    return update, features_state, lstm_state
