"""How close the diagonal recursion comes to the exact diagonal (generalized Gauss–Newton).

For each network, one batch of synthetic inputs (standard normal) and uniform random labels,
cross-entropy (mean): per parameter tensor, the relative error ``‖d - e‖ / ‖e‖`` and the
Pearson correlation of ``d`` (``mode="diagonal"``) with ``e`` (``mode="exact"``), plus the
same over all parameters concatenated. ``e`` is the exact GGN diagonal, which equals the
Hessian diagonal for the piecewise-linear ``small`` and ``big``; the ResNet uses
training-mode BatchNorm, where it is the GGN's.

    OMP_NUM_THREADS=1 python benchmarks/curvature_accuracy.py > accuracy.md
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from zoo import curvature
from zoo.networks import build_network


def tiny_resnet(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet with one BasicBlock per stage (a 'ResNet-10'), unmodified."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float(a @ b / denom) if denom > 0 else float("nan")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float("nan")


def compare(name: str, model: nn.Module, shape, batch: int, seed: int) -> list[str]:
    torch.manual_seed(seed)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    # Same batch statistics / dropout for both passes: freeze the RNG state per pass.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    started = time.perf_counter()
    diag = curvature.curvature_pass(model, x, y).hessian_diag
    model.load_state_dict(state)
    middle = time.perf_counter()
    exact = curvature.curvature_pass(model, x, y, mode="exact").hessian_diag
    done = time.perf_counter()
    rows = []
    for param in diag:
        rows.append(
            f"| {name} | `{param}` | {diag[param].numel()} | {rel(diag[param], exact[param]):.3f} "
            f"| {corr(diag[param], exact[param]):.3f} |"
        )
    d = torch.cat([t.reshape(-1) for t in diag.values()])
    e = torch.cat([t.reshape(-1) for t in exact.values()])
    rows.append(
        f"| **{name}** | **all** | {d.numel()} | **{rel(d, e):.3f}** | **{corr(d, e):.3f}** |"
    )
    print(
        f"<!-- {name}: batch {batch}, diagonal {middle - started:.2f}s, exact {done - middle:.2f}s -->"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = ["| network | parameter | size | rel. error | correlation |", "|---|---|---|---|---|"]
    torch.manual_seed(args.seed)
    rows += compare("small", build_network("small", (1, 28, 28)), (1, 28, 28), args.batch, 0)
    torch.manual_seed(args.seed)
    rows += compare("big", build_network("big", (1, 28, 28)), (1, 28, 28), args.batch, 0)
    torch.manual_seed(args.seed)
    rows += compare("resnet10", tiny_resnet(), (3, 32, 32), min(args.batch, 8), 0)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
