import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo import curvature
from zoo.errors import CheckpointError, ConfigError, CurvatureMissingError
from zoo.features import FeatureSpec
from zoo.optimizer import LearnedOptimizer

from .conftest import make_nets


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)
    )


def _batch(step=0):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 1, 12, 12, generator=g), torch.randint(0, 4, (8,), generator=g)


@pytest.mark.parametrize("features", ["g", "gh"])
def test_untrained_net_is_exactly_adam(features):
    a, b = _model(), _model()
    learned = LearnedOptimizer(a, make_nets(features), FeatureSpec(features))
    adam = torch.optim.Adam(b.parameters(), lr=2e-3)
    for step in range(5):
        x, y = _batch(step)
        learned.zero_grad()
        curvature.backward(a, x, y)
        learned.step()
        adam.zero_grad()
        F.cross_entropy(b(x), y).backward()
        adam.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


def test_parameters_are_routed_by_owning_module_not_rank():
    model = _model()
    opt = LearnedOptimizer(model, make_nets(), FeatureSpec("gh"))
    routes = {a.name: a.route for a in opt.assignments}
    assert routes == {"0.weight": "conv", "0.bias": "conv", "4.weight": "fc", "4.bias": "fc"}


def test_other_layer_kinds_follow_the_policy():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = LearnedOptimizer(model, make_nets(), FeatureSpec("g"))
    assert {a.name: a.route for a in opt.assignments}["1.weight"] == "adam"
    routed = LearnedOptimizer(model, make_nets(), FeatureSpec("g"), other="fc")
    assert {a.name: a.route for a in routed.assignments}["1.bias"] == "fc"
    with pytest.raises(
        ConfigError, match=r"no update net for 2 parameter\(s\) \(1.weight, 1.bias\)"
    ):
        LearnedOptimizer(model, make_nets(), FeatureSpec("g"), other="error")


def test_plain_backward_is_refused_by_a_second_order_optimizer():
    model = _model()
    opt = LearnedOptimizer(model, make_nets(), FeatureSpec("gh"))
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(CurvatureMissingError, match=r"zoo.curvature.backward\(model, inputs"):
        opt.step()


def test_gradient_only_optimizer_works_after_plain_backward():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    opt = LearnedOptimizer(model, make_nets("g"), FeatureSpec("g"))
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_finite_gradient_skips_the_step_and_keeps_state():
    model = _model()
    opt = LearnedOptimizer(model, make_nets(), FeatureSpec("gh"))
    x, y = _batch()
    curvature.backward(model, x, y)
    opt.step()
    params = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    curvature.backward(model, x, y)
    model[0].weight.grad[0, 0, 0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k])
    for name, entry in opt.state_dict()["state"].items():
        for field, value in entry.items():
            assert torch.equal(value, state["state"][name][field]), (name, field)


def test_frozen_parameters_do_not_move_and_their_state_does_not_advance():
    model = _model()
    opt = LearnedOptimizer(model, make_nets(), FeatureSpec("gh"))
    model[0].bias.requires_grad_(False)
    frozen = model[0].bias.clone()
    for step in range(3):
        opt.zero_grad()
        curvature.backward(model, *_batch(step))
        opt.step()
    assert torch.equal(model[0].bias, frozen)
    state = opt.state_dict()["state"]
    assert state["0.bias"]["step"].eq(0).all()
    assert state["0.weight"]["step"].eq(3).all()


def test_state_dict_is_keyed_by_name_and_resume_is_bitwise():
    def run(steps, model, opt, start=0):
        for step in range(start, start + steps):
            opt.zero_grad()
            curvature.backward(model, *_batch(step))
            opt.step()

    nets = make_nets(perturb=0.1)
    a = _model()
    opt_a = LearnedOptimizer(a, copy.deepcopy(nets), FeatureSpec("gh"))
    run(6, a, opt_a)

    b = _model()
    opt_b = LearnedOptimizer(b, copy.deepcopy(nets), FeatureSpec("gh"))
    run(3, b, opt_b)
    saved_params, saved_state = copy.deepcopy(b.state_dict()), copy.deepcopy(opt_b.state_dict())
    assert set(saved_state["state"]) == {"0.weight", "0.bias", "4.weight", "4.bias"}
    c = _model()
    c.load_state_dict(saved_params)
    opt_c = LearnedOptimizer(c, copy.deepcopy(nets), FeatureSpec("gh"))
    opt_c.load_state_dict(saved_state)
    run(3, c, opt_c, start=3)
    for pa, pc in zip(a.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pc)


def test_load_state_dict_names_mismatched_parameters():
    model = _model()
    opt = LearnedOptimizer(model, make_nets(), FeatureSpec("gh"))
    state = opt.state_dict()
    state["state"]["extra.weight"] = state["state"].pop("4.weight")
    with pytest.raises(
        CheckpointError, match=r"missing \['4.weight'\], unexpected \['extra.weight'\]"
    ):
        opt.load_state_dict(state)
    other = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(75, 5)
    )
    with pytest.raises(CheckpointError, match="wrong shape for: 4.weight, 4.bias"):
        LearnedOptimizer(other, make_nets(), FeatureSpec("gh")).load_state_dict(opt.state_dict())


def test_learned_optimizer_descends_on_a_tiny_problem():
    model = _model()
    opt = LearnedOptimizer(model, make_nets(), FeatureSpec("gh"))
    x, y = _batch(0)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = curvature.backward(model, x, y)
        first = first if first is not None else loss.item()
        opt.step()
    assert F.cross_entropy(model(x), y).item() < 0.5 * first
