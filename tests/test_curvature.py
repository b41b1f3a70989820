"""The curvature pass: every rule on a tiny instance, the three modes against brute force.

References are computed by brute force in double precision: the Hessian by
``torch.autograd.functional.hessian``, Jacobians by ``torch.autograd.functional.jacobian``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo import curvature as C
from zoo.errors import CurvatureError, CurvatureMissingError
from zoo.features import FeatureSpec
from zoo.networks import build_network
from zoo.optimizer import LearnedOptimizer
from zoo.update_net import UpdateNet

RTOL = 1e-5


@pytest.fixture(autouse=True)
def _double():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def loss_of(output, target, loss):
    return C._loss_value(output, target, loss)


def hessian_diag(model: nn.Module, x, y, loss="cross_entropy", seed=None) -> dict:
    """Brute-force diagonal of the loss Hessian, per parameter (and its full blocks)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    values = tuple(dict(model.named_parameters())[n].detach().clone() for n in names)

    def f(*tensors):
        if seed is not None:
            torch.manual_seed(seed)
        out = torch.func.functional_call(model, dict(zip(names, tensors, strict=True)), (x,))
        return loss_of(out, y, loss)

    blocks = torch.autograd.functional.hessian(f, values, vectorize=True)
    return {
        n: torch.diagonal(blocks[i][i].reshape(v.numel(), v.numel())).reshape(v.shape)
        for i, (n, v) in enumerate(zip(names, values, strict=True))
    }


def full_hessian(model: nn.Module, x, y, loss="cross_entropy") -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        tensors = [t.reshape(s) for t, s in zip(flat.split(sizes), shapes, strict=True)]
        out = torch.func.functional_call(model, dict(zip(names, tensors, strict=True)), (x,))
        return loss_of(out, y, loss)

    return torch.autograd.functional.hessian(f, flat0, vectorize=True)


def relu_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.ReLU(),
        nn.Linear(5, 4),
    )


def batch(shape=(6, 2, 8, 8), classes=4):
    return torch.randn(*shape), torch.randint(0, classes, (shape[0],))


class Offset(nn.Module):
    """``z = x + b`` with ``b`` shaped like the whole batch: ``h_b`` is the curvature at z."""

    def __init__(self, shape):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(shape))

    def forward(self, x):
        return x + self.b


# ----------------------------------------------------------------------------- exact mode


@pytest.mark.parametrize("loss", C.LOSSES)
def test_exact_mode_equals_hessian_diagonal_for_piecewise_linear_net(loss):
    net = relu_net()
    x, y = batch()
    if loss.startswith("mse"):
        y = torch.randn(6, 4)
    reference = hessian_diag(net, x, y, loss)
    result = C.curvature_pass(net, x, y, loss=loss, mode="exact", chunk_size=7)
    for name, h in reference.items():
        assert rel_err(result.hessian_diag[name], h) < RTOL, name
    assert result.mode == "exact"


class Block(nn.Module):
    """A torchvision-style basic block: conv-bn-relu-conv-bn, ``out += identity``, relu."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.block = Block(2)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.pool(self.block(x))
        return self.fc(torch.flatten(x, 1))


def test_exact_mode_on_a_residual_net_in_eval_mode():
    net = TinyResNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net.eval()  # eval BatchNorm is affine: the net stays piecewise linear
    x, y = torch.randn(3, 1, 5, 5), torch.randint(0, 3, (3,))
    reference = hessian_diag(net, x, y)
    result = C.curvature_pass(net, x, y, mode="exact")
    for name, h in reference.items():
        assert rel_err(result.hessian_diag[name], h) < RTOL, name


# ----------------------------------------------------------------------------- diagonal mode


def test_diagonal_recursion_is_exact_for_the_last_layer():
    net = relu_net()
    x, y = batch()
    reference = hessian_diag(net, x, y)
    h = C.curvature_pass(net, x, y).hessian_diag
    for name in ("6.weight", "6.bias"):
        assert rel_err(h[name], reference[name]) < RTOL
    # ...and only an approximation for earlier layers (it drops cross terms).
    assert rel_err(h["0.weight"], reference["0.weight"]) > 1e-2


def test_diagonal_recursion_hand_computed_earlier_layer():
    # out = v · (W2 (W1 x)), L = (out - t)². Exact: d²L/dW1_ab² = 2 (Σ_c v_c W2_ca)² x_b²;
    # the recursion drops the cross term: 2 Σ_c v_c² W2_ca² x_b².
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    net.append(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.5, -1.0], [2.0, 1.5]]))
        net[1].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
    x, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.3]])
    diagonal = C.curvature_pass(net, x, t, loss="mse_sum").hessian_diag["0.weight"]
    exact = C.curvature_pass(net, x, t, loss="mse_sum", mode="exact").hessian_diag["0.weight"]
    torch.testing.assert_close(diagonal, torch.tensor([[20.0, 80.0], [40.0, 160.0]]))
    torch.testing.assert_close(exact, torch.tensor([[8.0, 32.0], [8.0, 32.0]]))


def test_curvature_is_non_negative_and_gradient_is_exact():
    net = relu_net()
    x, y = batch()
    result = C.curvature_pass(net, x, y)
    loss = F.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    for (name, _), g in zip(net.named_parameters(), grads, strict=True):
        assert (result.hessian_diag[name] >= 0).all(), name
        torch.testing.assert_close(result.grads[name], g)
    assert math.isclose(result.loss.item(), loss.item(), rel_tol=1e-12)


def test_dead_relu_units_get_exactly_zero():
    net = relu_net()
    with torch.no_grad():
        net[4].bias[:2] = -1e6  # hidden units 0 and 1 never fire
    x, y = batch()
    for mode in ("diagonal", "exact"):
        h = C.curvature_pass(net, x, y, mode=mode).hessian_diag
        assert (h["4.weight"][:2] == 0).all() and (h["4.bias"][:2] == 0).all(), mode
        assert (h["6.weight"][:, :2] == 0).all(), mode  # their outputs are 0 too
        assert (h["4.weight"][2:] > 0).any(), mode


def _rule_instances():
    """(name, op, input shape, train mode) for every parameter-free and layer rule."""
    return [
        ("conv2d stride 2 pad 1", nn.Conv2d(2, 4, 3, stride=2, padding=1), (2, 2, 6, 6)),
        ("conv2d dilation 2", nn.Conv2d(2, 3, 3, dilation=2, padding=2), (2, 2, 6, 6)),
        ("conv2d depthwise", nn.Conv2d(4, 4, 3, groups=4, bias=False), (2, 4, 5, 5)),
        ("conv2d groups 2", nn.Conv2d(4, 2, 3, groups=2), (2, 4, 5, 5)),
        ("conv2d 1x1", nn.Conv2d(3, 2, 1), (2, 3, 4, 4)),
        ("conv2d same", nn.Conv2d(2, 2, 3, padding="same"), (2, 2, 4, 4)),
        ("conv1d", nn.Conv1d(2, 3, 3, stride=2, padding=1), (2, 2, 7)),
        ("linear", nn.Linear(4, 3), (3, 4)),
        ("linear no bias", nn.Linear(4, 3, bias=False), (3, 4)),
        ("relu", nn.ReLU(), (3, 5)),
        ("relu inplace", nn.ReLU(inplace=True), (3, 5)),
        ("leaky relu", nn.LeakyReLU(0.2), (3, 5)),
        ("tanh", nn.Tanh(), (3, 5)),
        ("sigmoid", nn.Sigmoid(), (3, 5)),
        ("gelu", nn.GELU(), (3, 5)),
        ("gelu tanh", nn.GELU(approximate="tanh"), (3, 5)),
        ("maxpool overlapping", nn.MaxPool2d(3, stride=2, padding=1), (2, 2, 6, 6)),
        ("avgpool", nn.AvgPool2d(2), (2, 2, 4, 4)),
        ("avgpool pad", nn.AvgPool2d(3, stride=2, padding=1), (2, 2, 5, 5)),
        (
            "avgpool pad excluded",
            nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True),
            (2, 2, 6, 6),
        ),
        ("adaptive avgpool uneven", nn.AdaptiveAvgPool2d((2, 3)), (2, 2, 5, 7)),
        ("adaptive avgpool global", nn.AdaptiveAvgPool2d(1), (2, 2, 3, 3)),
        ("flatten", nn.Flatten(), (2, 2, 3)),
        ("dropout eval", nn.Dropout(0.5).eval(), (3, 5)),
        ("dropout train", nn.Dropout(0.5), (3, 5)),
        ("batchnorm eval", nn.BatchNorm2d(2).eval(), (3, 2, 3, 3)),
        ("batchnorm train", nn.BatchNorm2d(2), (3, 2, 3, 3)),
        ("batchnorm1d train", nn.BatchNorm1d(4), (5, 4)),
    ]


@pytest.mark.parametrize(
    "op, shape", [pytest.param(op, s, id=name) for name, op, s in _rule_instances()]
)
def test_each_rule_maps_curvature_by_the_squared_jacobian(op, shape):
    """h at the op's input equals ``(J²)ᵀ h_out``, ``J`` the op's brute-force Jacobian."""
    op = op.double()  # built at collection time, in the default dtype
    x = torch.randn(*shape)
    if isinstance(op, nn.modules.batchnorm._BatchNorm) and not op.training:
        op.running_mean.uniform_(-1, 1)
        op.running_var.uniform_(0.5, 2.0)
    net = nn.Sequential(Offset(shape), op, nn.Flatten())
    with torch.no_grad():
        classes = net(x).shape[1]
    y = torch.randint(0, classes, (shape[0],))
    torch.manual_seed(1)
    result = C.curvature_pass(net, x, y, loss="cross_entropy_sum")
    torch.manual_seed(1)
    with torch.no_grad():
        out = net(x)
    h_out = C.output_curvature(out, y, "cross_entropy_sum").reshape(-1)

    def through_op(z):
        torch.manual_seed(1)  # the same dropout mask as the pass drew
        return nn.Flatten()(op(z.clone()))  # clone: an in-place op must not hit the leaf

    jacobian = torch.autograd.functional.jacobian(through_op, x.clone())
    jacobian = jacobian.reshape(out.numel(), x.numel())
    expected = ((jacobian * jacobian).t() @ h_out).reshape(shape)
    assert rel_err(result.hessian_diag["0.b"], expected) < RTOL
    assert (result.hessian_diag["0.b"] >= 0).all()


@pytest.mark.parametrize(
    "op",
    [
        nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1),
        nn.Conv2d(4, 4, 3, groups=4, padding=2, dilation=2),
        nn.Conv2d(2, 3, 1, bias=False),
    ],
    ids=["conv strided", "conv depthwise dilated", "conv 1x1 no bias"],
)
def test_conv_weight_rule_is_exact_under_a_diagonal_output_hessian(op):
    # Under squared error the output Hessian is diagonal (2I), so Σ_p h_y x_p² is exact for
    # the weights of a conv that is the last layer. (Under cross-entropy it is not: a conv
    # weight touches every position of a sample, and the positions' logits interact.)
    op = op.double()
    x = torch.randn(3, op.in_channels, 5, 5)
    net = nn.Sequential(op, nn.Flatten())
    with torch.no_grad():
        t = torch.randn_like(net(x))
    reference = hessian_diag(net, x, t, "mse_sum")
    result = C.curvature_pass(net, x, t, loss="mse_sum").hessian_diag
    for name, h in reference.items():
        assert rel_err(result[name], h) < RTOL, name


@pytest.mark.parametrize("op", [nn.Tanh(), nn.Sigmoid(), nn.GELU()], ids=["tanh", "sig", "gelu"])
def test_smooth_activation_forms(op):
    # Offset → f → MSE: the Hessian at the offset is diagonal, so the full form is the exact
    # Hessian diagonal and the Gauss–Newton form the exact GGN diagonal.
    x, t = torch.randn(3, 5), torch.randn(3, 5)
    net = nn.Sequential(Offset((3, 5)), op)
    with torch.no_grad():
        net[0].b.normal_()
    full = C.curvature_pass(net, x, t, loss="mse", activation="full").hessian_diag["0.b"]
    gn = C.curvature_pass(net, x, t, loss="mse").hessian_diag["0.b"]
    assert rel_err(full, hessian_diag(net, x, t, "mse")["0.b"]) < RTOL
    assert (
        rel_err(gn, C.curvature_pass(net, x, t, loss="mse", mode="exact").hessian_diag["0.b"])
        < RTOL
    )
    assert (gn >= 0).all() and rel_err(full, gn) > 1e-3


def test_dropout_in_training_mode_uses_the_drawn_mask():
    net = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    torch.manual_seed(3)
    result = C.curvature_pass(net, x, y)
    torch.manual_seed(3)
    with torch.no_grad():
        kept = net[1](torch.ones(5, 6)) != 0
    dropped_units = ~kept.any(0)
    reference = hessian_diag(net, x, y, seed=3)
    assert rel_err(result.hessian_diag["2.weight"], reference["2.weight"]) < RTOL
    # A unit dropped for every sample has zero curvature in the first layer.
    assert (result.hessian_diag["0.weight"][dropped_units] == 0).all()


def test_functional_operations_in_a_custom_forward():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.fc = nn.Linear(2 * 2 * 2, 3)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv(x)), 2)
            x = torch.tanh(x) * 0.5 - 1.0
            x = x.view(x.size(0), -1)
            return self.fc(x)

    net = Net()
    x, y = torch.randn(3, 1, 4, 4), torch.randint(0, 3, (3,))
    result = C.curvature_pass(net, x, y).hessian_diag
    reference = hessian_diag(net, x, y)
    assert rel_err(result["fc.weight"], reference["fc.weight"]) < RTOL
    assert (result["conv.weight"] > 0).any()


# ----------------------------------------------------------------------------- arbitrary graphs


def test_resnet18_unmodified_gets_finite_curvature_for_every_parameter():
    torchvision = pytest.importorskip("torchvision")
    torch.set_default_dtype(torch.float32)
    net = torchvision.models.resnet18(weights=None)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2,))
    result = C.curvature_pass(net, x, y)
    names = [n for n, _ in net.named_parameters()]
    assert sorted(result.hessian_diag) == sorted(names)
    for name in names:
        h = result.hessian_diag[name]
        assert torch.isfinite(h).all() and (h >= 0).all(), name
        assert h.abs().sum() > 0, name  # every layer receives curvature


def test_tiny_resnet_train_mode_last_layer_exact():
    net = TinyResNet()
    x, y = torch.randn(4, 1, 5, 5), torch.randint(0, 3, (4,))
    reference = hessian_diag(net, x, y)
    result = C.curvature_pass(net, x, y).hessian_diag
    assert rel_err(result["fc.weight"], reference["fc.weight"]) < RTOL
    assert all(torch.isfinite(h).all() and (h >= 0).all() for h in result.values())


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(F.relu(self.inner(x)))


def test_unsupported_operation_error_names_module_path_and_operation():
    net = WithNorm()
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    with pytest.raises(CurvatureError, match=r"'inner\.1' \(LayerNorm\).*fallback='hutchinson'"):
        C.curvature_pass(net, x, y)


def test_unsupported_function_error_names_the_owning_module():
    class Gate(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)  # a product of two tensors: bilinear, no rule

    net = nn.Sequential(nn.Linear(3, 4), Gate(), nn.Linear(4, 2))
    with pytest.raises(CurvatureError, match=r"'mul' in module '1'"):
        C.curvature_pass(net, torch.randn(2, 3), torch.randint(0, 2, (2,)))


def test_hutchinson_fallback_only_for_the_parameters_behind_the_operation():
    net = WithNorm()
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    result = C.curvature_pass(
        net, x, y, fallback="hutchinson", samples=4, generator=torch.Generator().manual_seed(0)
    )
    assert result.estimated == ("inner.0.bias", "inner.0.weight", "inner.1.bias", "inner.1.weight")
    reference = hessian_diag(net, x, y)
    assert rel_err(result.hessian_diag["head.weight"], reference["head.weight"]) < RTOL
    assert result.hessian_diag["inner.0.weight"].abs().sum() > 0


# ----------------------------------------------------------------------------- Hutchinson


def test_hutchinson_mean_converges_to_the_hessian_diagonal():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
    hessian = full_hessian(net, x, y)
    samples = 4000
    result = C.curvature_pass(
        net, x, y, mode="hutchinson", samples=samples, generator=torch.Generator().manual_seed(0)
    )
    estimate = torch.cat([result.hessian_diag[n].reshape(-1) for n, _ in net.named_parameters()])
    # Var(v_i (Hv)_i) = Σ_{j≠i} H_ij² for Rademacher v: the mean's standard error follows.
    off = hessian - torch.diag(torch.diagonal(hessian))
    stderr = (off * off).sum(1).sqrt() / math.sqrt(samples)
    error = (estimate - torch.diagonal(hessian)).abs()
    assert (error <= 5 * stderr + 1e-12).all()
    assert error.max() > 0  # it is an estimate, not the exact answer by accident


def test_hutchinson_refresh_every_k_reuses_the_estimate():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
    gen = torch.Generator().manual_seed(0)

    def estimate():
        r = C.curvature_pass(net, x, y, mode="hutchinson", refresh_every=2, generator=gen)
        return r.hessian_diag["0.weight"].clone(), r.grads["0.weight"].clone()

    first, g1 = estimate()
    with torch.no_grad():
        net[0].weight.mul_(1.5)
    second, g2 = estimate()  # reused: same estimate, fresh gradient
    third, _ = estimate()  # refreshed
    assert torch.equal(first, second) and not torch.equal(g1, g2)
    assert not torch.equal(second, third)


# ----------------------------------------------------------------------------- training-loop API


def test_bad_options_are_rejected_with_their_names():
    net, (x, y) = relu_net(), batch()
    with pytest.raises(CurvatureError, match="unknown curvature mode 'newton'"):
        C.curvature_pass(net, x, y, mode="newton")
    with pytest.raises(CurvatureError, match="samples must be an integer >= 1, got 0"):
        C.curvature_pass(net, x, y, mode="hutchinson", samples=0)
    with pytest.raises(CurvatureError, match="unknown activation form 'exactish'"):
        C.curvature_pass(net, x, y, activation="exactish")


def test_parameter_without_second_derivative_gets_zero():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x)

    net = Net()
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    for mode in C.MODES:
        h = C.curvature_pass(net, x, y, mode=mode).hessian_diag
        assert (h["unused.weight"] == 0).all() and (h["fc.weight"] != 0).any(), mode


def _optimizer(model, curvature_mode="diagonal"):
    torch.set_default_dtype(torch.float32)
    spec = FeatureSpec("gh")
    nets = {
        kind: UpdateNet(num_features=spec.num_features, hidden_size=4, num_layers=1)
        for kind in ("conv", "fc")
    }
    return LearnedOptimizer(model, nets, spec, curvature_mode=curvature_mode)


def test_stepping_after_plain_backward_says_how_to_run_the_curvature_pass():
    model = build_network("small", (1, 12, 12)).float()
    opt = _optimizer(model)
    x, y = torch.randn(4, 1, 12, 12), torch.randint(0, 10, (4,))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(CurvatureMissingError, match=r"zoo\.curvature\.backward\(model"):
        opt.step()
    opt.zero_grad()
    C.backward(model, x, y)
    opt.step()  # now it has what it needs
    assert C.curvature_mode_of(model.fc1.weight) == "diagonal"


def test_curvature_mode_mismatch_warns_once_at_step():
    model = build_network("small", (1, 12, 12)).float()
    opt = _optimizer(model, curvature_mode="diagonal")
    x, y = torch.randn(4, 1, 12, 12), torch.randint(0, 10, (4,))
    C.backward(model, x, y, mode="hutchinson")
    with pytest.warns(UserWarning, match="mode 'hutchinson'.*meta-trained with 'diagonal'"):
        opt.step()
    opt.zero_grad()
    C.backward(model, x, y, mode="hutchinson")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # reported once, not every step


def test_attach_warns_when_declared_mode_differs_from_checkpoint():
    from zoo.checkpoint import PretrainedOptimizer

    spec = FeatureSpec("gh")
    nets = {"fc": UpdateNet(num_features=spec.num_features, hidden_size=4, num_layers=1)}
    pretrained = PretrainedOptimizer(nets, spec, {"name": "t", "curvature": {"mode": "diagonal"}})
    model = nn.Sequential(nn.Linear(3, 2)).float()
    with pytest.warns(
        UserWarning, match="meta-trained with curvature mode 'diagonal', not 'exact'"
    ):
        opt = pretrained.attach(model, curvature_mode="exact")
    assert opt.curvature_mode == "diagonal"


def test_parameters_frozen_before_the_pass_are_skipped_and_the_optimizer_skips_them():
    import zoo

    torch.set_default_dtype(torch.float32)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    zoo.curvature.backward(model, x, y)
    frozen = model[0].weight
    assert frozen.grad is None and not hasattr(frozen, "hessian_diag")
    assert model[0].bias.hessian_diag.abs().sum() > 0  # curvature still reaches below it
    optimizer = _optimizer(model)
    before = frozen.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        zoo.curvature.backward(model, x, y)
        optimizer.step()
    assert torch.equal(frozen, before)


def test_no_trainable_parameters_and_bad_targets_are_curvature_errors():
    import zoo

    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(CurvatureError, match="class targets must lie in 0..2 for the model's 3"):
        zoo.curvature.backward(model, torch.randn(2, 4), torch.tensor([1, 200]))
    model.requires_grad_(False)
    with pytest.raises(CurvatureError, match="no trainable parameters"):
        zoo.curvature.backward(model, torch.randn(2, 4), torch.tensor([1, 2]))
