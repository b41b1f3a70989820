"""Shared fixtures: tiny data, tiny checkpoints, and the real MNIST beside the project."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from zoo.data import Dataset
from zoo.features import FeatureSpec
from zoo.update_net import UpdateNet

SHARED_MNIST = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_data() -> Dataset:
    """Random 1x12x12 'images' with labels that depend on them (learnable, fast)."""
    return make_tiny_data()


def make_tiny_data() -> Dataset:
    """The :func:`tiny_data` set, for module-scoped fixtures."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 12, 12, generator=gen)
    y = (x[:, 0, :6].sum((1, 2)) > 0).long() + 2 * (x[:, 0, :, :6].sum((1, 2)) > 0).long()
    return Dataset("tiny", x[:192], y[:192], x[192:], y[192:], "tiny synthetic", num_classes=4)


def make_nets(features: str = "gh", seed: int = 0, perturb: float = 0.0) -> dict[str, UpdateNet]:
    torch.manual_seed(seed)
    spec = FeatureSpec(features)
    nets = {k: UpdateNet(spec.num_features, init_lr=2e-3) for k in ("conv", "fc")}
    if perturb:
        with torch.no_grad():
            for net in nets.values():
                for p in net.parameters():
                    p.add_(perturb * torch.randn_like(p))
    return nets


@pytest.fixture
def mnist_root() -> Path:
    if not (SHARED_MNIST / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real MNIST not found at {SHARED_MNIST}")
    return SHARED_MNIST


@pytest.fixture
def poison_curvature(monkeypatch):
    """Make every second derivative meta-training sees infinite (a run that cannot succeed)."""
    import math

    import zoo.meta

    real = zoo.meta.curvature_pass

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        for name in result.hessian_diag:
            result.hessian_diag[name] = torch.full_like(result.hessian_diag[name], math.inf)
        return result

    monkeypatch.setattr(zoo.meta, "curvature_pass", poisoned)
