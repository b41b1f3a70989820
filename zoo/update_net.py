"""The coordinate-wise LSTM that turns features into an update.

One small network (2 LSTM layers × 20 units, Andrychowicz et al. 2016) is shared by every
coordinate of every parameter of one layer kind; each coordinate keeps its own hidden
state, so the batch dimension of the LSTM is the coordinate index.

Output parameterisation. The LSTM's two outputs ``(a, b)`` modulate a preconditioned step
rather than predicting a raw number (Roy & Todorovic predict the update directly; measured
here, that neither transferred to a bigger network nor survived past its training
horizon):

    update = -lr · exp(MULT_RANGE · tanh(a)) · (d + MIX_RANGE · tanh(b) · ĝ)

with ``d = m̂ / (sqrt(v̂) + eps)`` the Adam direction, ``ĝ`` the RMS-normalised gradient
(features ``m_fast`` and ``g_rms``) and ``lr = exp(log_lr)`` a learned scalar per net. The
step multiplier is bounded to ``[1/3, 3]`` and the gradient mix to ``±1``, so no input can
make the net take a step more than a few times Adam's; the head starts at zero, so an
untrained net *is* Adam with learning rate ``init_lr``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["MIX_RANGE", "MULT_RANGE", "UpdateNet"]

# Largest step multiplier is e^MULT_RANGE = 3: the 200-step meta-training horizon measured
# here taught unbounded nets 1.8x multipliers that spiked late; keep the range modest.
MULT_RANGE = math.log(3.0)
MIX_RANGE = 1.0


class UpdateNet(nn.Module):
    """Coordinate-wise LSTM: ``(features, state) -> (update, new_state)``.

    Args:
        num_features: inputs per coordinate (see :mod:`zoo.features`).
        hidden_size: LSTM units per layer (20).
        num_layers: stacked LSTM layers (2).
        init_lr: the base learning rate the net starts from (it is meta-trained).

    The state of ``N`` coordinates is one tensor of shape ``(N, 2 · num_layers ·
    hidden_size)`` holding ``(h, c)`` of every layer, so it can live in flat buffers.

    Example:
        >>> net = UpdateNet(num_features=5)
        >>> state = net.init_state(10)
        >>> feats = torch.zeros(10, 5)
        >>> out, state = net(feats, state)
        >>> out.shape
        torch.Size([10, 2])
    """

    def __init__(
        self, num_features: int, hidden_size: int = 20, num_layers: int = 2, init_lr: float = 1e-3
    ):
        super().__init__()
        if num_features < 1 or hidden_size < 1 or num_layers < 1:
            raise ValueError(
                f"num_features, hidden_size and num_layers must be >= 1, got "
                f"{num_features}, {hidden_size}, {num_layers}"
            )
        if not init_lr > 0:
            raise ValueError(f"init_lr must be > 0, got {init_lr}")
        self.num_features = num_features
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.cells = nn.ModuleList(
            nn.LSTMCell(num_features if i == 0 else hidden_size, hidden_size)
            for i in range(num_layers)
        )
        self.head = nn.Linear(hidden_size, 2)
        # Zero head: untrained output (0, 0) is exactly Adam. PyTorch's default init here
        # blew meta-training up in the first unroll of a prototype.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.log_lr = nn.Parameter(torch.tensor(math.log(init_lr)))

    @property
    def state_size(self) -> int:
        return 2 * self.num_layers * self.hidden_size

    def init_state(self, n: int, device=None, dtype=torch.float32) -> Tensor:
        return torch.zeros(n, self.state_size, device=device, dtype=dtype)

    def forward(self, features: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """LSTM outputs ``(N, 2)`` and the new state for ``N`` coordinates."""
        hs = self.hidden_size
        x = features
        new_state = []
        for i, cell in enumerate(self.cells):
            h = state[:, 2 * i * hs : (2 * i + 1) * hs]
            c = state[:, (2 * i + 1) * hs : (2 * i + 2) * hs]
            h, c = cell(x, (h, c))
            new_state += [h, c]
            x = h
        return self.head(x), torch.cat(new_state, dim=1)

    def update(self, outputs: Tensor, adam_dir: Tensor, g_rms: Tensor) -> Tensor:
        """The parameter update from the LSTM outputs (see the module docstring)."""
        multiplier = torch.exp(MULT_RANGE * torch.tanh(outputs[:, 0]))
        mix = MIX_RANGE * torch.tanh(outputs[:, 1])
        return -torch.exp(self.log_lr) * multiplier * (adam_dir + mix * g_rms)

    def hyperparameters(self) -> dict:
        return {
            "num_features": self.num_features,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
        }
