"""SOU is the closed-form Newton step; the gradient-only LSTM never looks at curvature."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from zoo import curvature
from zoo.baselines import GRADIENT_ONLY, HAND_DESIGNED, SOU, is_gradient_only, sou_update
from zoo.errors import ConfigError, CurvatureMissingError
from zoo.features import FeatureSpec
from zoo.networks import build_network
from zoo.optimizer import LearnedOptimizer

from .conftest import make_nets


def _least_squares_problem(seed: int = 0, n: int = 64, k: int = 3):
    """y ≈ x·w with one input feature: under MSE each output weight is an independent
    quadratic, so the Hessian is exactly diagonal and the curvature pass exact for it."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=gen)
    y = x * torch.tensor([[0.5, -2.0, 3.0]])[:, :k] + 0.1 * torch.randn(n, k, generator=gen)
    # Wrapped in a Sequential: a bare Linear as the root traces to a function call that the
    # curvature pass has no rule for.
    model = nn.Sequential(nn.Linear(1, k, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(k, 1, generator=gen))
    return model, x, y


def test_sou_update_is_newtons_step_on_a_separable_quadratic():
    a = torch.tensor([0.5, 2.0, 10.0])  # the known diagonal
    c = torch.tensor([1.0, -3.0, 0.25])  # the minimiser
    theta = torch.zeros(3)
    g, h = a * (theta - c), a
    assert torch.allclose(theta + sou_update(g, h, lr=1.0, damping=0.0), c)
    damped = theta + sou_update(g, h, lr=0.5, damping=0.1)
    assert torch.allclose(damped, theta - 0.5 * g / (a + 0.1))


def test_sou_on_least_squares_lands_on_the_closed_form_solution():
    model, x, y = _least_squares_problem()
    opt = SOU(model.parameters(), lr=1.0, damping=0.0)
    opt.zero_grad()
    curvature.backward(model, x, y, loss="mse")
    h = model[0].weight.hessian_diag
    n, k = y.shape
    assert torch.allclose(h, torch.full_like(h, 2 * (x**2).sum().item() / (n * k)))
    opt.step()
    solution = (x * y).sum(0) / (x**2).sum()  # argmin_w Σ (x w_k − y_k)²
    assert torch.allclose(model[0].weight.view(-1), solution, atol=1e-5)


def test_sou_with_damping_matches_the_damped_newton_formula():
    model, x, y = _least_squares_problem(seed=1)
    start = model[0].weight.detach().clone()
    opt = SOU(model.parameters(), lr=0.3, damping=0.05)
    opt.zero_grad()
    curvature.backward(model, x, y, loss="mse")
    g, h = model[0].weight.grad.clone(), model[0].weight.hessian_diag.clone()
    opt.step()
    assert torch.allclose(model[0].weight, start - 0.3 * g / (h.abs() + 0.05))


def test_sou_needs_the_curvature_pass():
    model, x, y = _least_squares_problem()
    opt = SOU(model.parameters())
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(CurvatureMissingError, match="zoo.curvature.backward"):
        opt.step()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": 0.0}, r"SOU: lr \(the step size α\) must be > 0, got 0.0"),
        ({"lr": -1}, r"SOU: lr \(the step size α\) must be > 0, got -1"),
        ({"damping": -1e-3}, r"SOU: damping \(μ\) must be >= 0, got -0.001"),
    ],
)
def test_sou_rejects_bad_hyperparameters_naming_them(options, message):
    with pytest.raises(ConfigError, match=message):
        SOU(nn.Linear(2, 2).parameters(), **options)


@pytest.mark.parametrize("name", sorted(HAND_DESIGNED))
def test_hand_designed_baselines_descend_on_least_squares(name):
    model, x, y = _least_squares_problem()
    opt = HAND_DESIGNED[name](model.parameters(), 0.05)
    before = nn.functional.mse_loss(model(x), y).item()
    for _ in range(20):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert nn.functional.mse_loss(model(x), y).item() < before


def _learned_update(features: str, scramble_hessian: float | None, tiny_data) -> list[torch.Tensor]:
    torch.manual_seed(3)
    model = build_network("small", tiny_data.input_shape, tiny_data.num_classes)
    opt = LearnedOptimizer(model, make_nets(features, perturb=0.3), FeatureSpec(features))
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        x, y = tiny_data.train_x[32 * step : 32 * (step + 1)], tiny_data.train_y[32 * step :][:32]
        opt.zero_grad()
        curvature.backward(model, x, y)
        if scramble_hessian is not None:
            for p in model.parameters():
                p.hessian_diag.mul_(scramble_hessian).add_(torch.rand_like(p))
        opt.step()
    return [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]


def test_gradient_only_lstm_ignores_the_curvature_input(tiny_data):
    assert is_gradient_only(GRADIENT_ONLY) and not is_gradient_only(FeatureSpec("gh"))
    honest = _learned_update("g", None, tiny_data)
    scrambled = _learned_update("g", 1e3, tiny_data)
    for a, b in zip(honest, scrambled, strict=True):
        assert torch.equal(a, b)


def test_second_order_lstm_does_read_the_curvature_input(tiny_data):
    """The contrast that makes the test above meaningful."""
    honest = _learned_update("gh", None, tiny_data)
    scrambled = _learned_update("gh", 1e3, tiny_data)
    assert any(not torch.allclose(a, b) for a, b in zip(honest, scrambled, strict=True))


def test_gradient_only_lstm_trains_with_a_plain_backward(tiny_data):
    torch.manual_seed(0)
    model = build_network("small", tiny_data.input_shape, tiny_data.num_classes)
    twin = copy.deepcopy(model)
    for net, loop in ((model, "plain"), (twin, "curvature")):
        opt = LearnedOptimizer(net, make_nets("g", perturb=0.3), GRADIENT_ONLY)
        x, y = tiny_data.train_x[:32], tiny_data.train_y[:32]
        opt.zero_grad()
        if loop == "plain":
            nn.functional.cross_entropy(net(x), y).backward()
        else:
            curvature.backward(net, x, y)
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7)
