import pytest
import torch

from zoo.errors import ConfigError
from zoo.features import BETA_FAST, BETA_V, EPS, FeatureSpec, compute_features, init_state
from zoo.optimizer import KindLayout


def _layout(sizes):
    return KindLayout.build([f"p{i}" for i in range(len(sizes))], sizes)


def test_first_step_matches_adam_moments():
    g = torch.tensor([0.5, -2.0, 1e-3])
    lay = _layout([3])
    feats, adam_dir, state = compute_features(
        FeatureSpec("g"), init_state(3), g, None, lay.segments, lay.counts
    )
    m = (1 - BETA_FAST) * g / (1 - BETA_FAST)
    v = (1 - BETA_V) * g * g / (1 - BETA_V)
    expected = m / (v.sqrt() + EPS)
    torch.testing.assert_close(adam_dir, expected)
    torch.testing.assert_close(feats[:, 0], expected)  # g/sqrt(v) = sign(g) at step 1
    assert state.step.tolist() == [1.0, 1.0, 1.0]


def test_features_are_invariant_to_the_loss_scale():
    torch.manual_seed(0)
    lay = _layout([50, 30])
    spec = FeatureSpec("gh")
    s1, s2 = init_state(80), init_state(80)
    for _ in range(5):
        g, h = torch.randn(80), torch.rand(80)
        f1, d1, s1 = compute_features(spec, s1, g, h, lay.segments, lay.counts)
        f2, d2, s2 = compute_features(spec, s2, 1000 * g, 1000 * h, lay.segments, lay.counts)
    torch.testing.assert_close(f1, f2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d1, d2, rtol=1e-4, atol=1e-5)


def test_zero_curvature_gives_finite_features():
    lay = _layout([4, 4])
    h = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 2.0, 0.0])  # a wholly dead tensor, and zeros
    feats, _, _ = compute_features(
        FeatureSpec("gh"), init_state(8), torch.randn(8), h, lay.segments, lay.counts
    )
    assert torch.isfinite(feats).all()
    assert feats.abs().max() <= 5.0


def test_relative_curvature_is_per_tensor():
    lay = _layout([2, 2])
    h = torch.tensor([1.0, 3.0, 100.0, 300.0])  # same ratios in both tensors
    feats, _, _ = compute_features(
        FeatureSpec("gh"), init_state(4), torch.ones(4), h, lay.segments, lay.counts
    )
    torch.testing.assert_close(feats[:2, 3], feats[2:, 3])
    assert feats[0, 3] < 0 < feats[1, 3]


def test_unknown_feature_set_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown feature set 'x'; known feature sets: g, gh"):
        FeatureSpec("x")


@pytest.mark.parametrize("name", ["gh-no-momenta", "gh-no-h-rel", "gh-no-h-trend"])
def test_ablation_sets_are_columns_of_the_full_set(name):
    from zoo.features import FEATURE_SETS

    gen = torch.Generator().manual_seed(3)
    grad, hess = torch.randn(40, generator=gen), torch.rand(40, generator=gen)
    segments = torch.cat([torch.zeros(25, dtype=torch.long), torch.ones(15, dtype=torch.long)])
    counts = torch.tensor([25.0, 15.0])
    full, dir_full, _ = compute_features(
        FeatureSpec("gh"), init_state(40), grad, hess, segments, counts
    )
    part, dir_part, _ = compute_features(
        FeatureSpec(name), init_state(40), grad, hess, segments, counts
    )
    columns = [FEATURE_SETS["gh"].index(n) for n in FEATURE_SETS[name]]
    assert torch.equal(part, full[:, columns])
    assert torch.equal(dir_part, dir_full)
    assert FeatureSpec(name).uses_curvature
