import math

import pytest
import torch

from zoo.errors import ConfigError
from zoo.meta import load_recipe, meta_train, parse_recipe

TINY = {
    "name": "tiny",
    "task": {"network": "small", "batch_size": 32, "widths": [0.5, 1.0], "init_scale": [0.7, 1.4]},
    "update_net": {"features": "gh", "init_lr": 0.002},
    "meta": {"iterations": 30, "horizon": 30, "unroll": 5, "meta_lr": 0.01, "validate_every": 15},
    "validation": [{"network": "small", "steps": 30, "seeds": [7]}],
}


def test_tiny_recipe_meta_trains_and_beats_its_untrained_start(tiny_data):
    result = meta_train(parse_recipe(TINY), tiny_data)
    assert len(result.history) == 30
    assert all(math.isfinite(v) for _, v in result.history)
    assert [it for it, _ in result.validation] == [0, 15, 30]
    untrained = result.validation[0][1]
    assert result.best_score < untrained  # the meta-gradient reached the nets and helped
    assert result.best_iteration in (15, 30)
    for net in result.nets.values():
        assert all(torch.isfinite(p).all() for p in net.parameters())
        assert net.head.weight.abs().sum() > 0  # moved away from the Adam-equivalent start


def test_shipped_recipe_parses():
    recipe = load_recipe("recipes/mnist-small.toml")
    assert recipe.task.network == "small" and recipe.update_net.features == "gh"
    assert {v.network for v in recipe.validation} == {"small", "big"}


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"meta": {"iterations": -1}}, r"meta.iterations = -1 is invalid; allowed: >= 1"),
        ({"meta": {"unroll": "20"}}, r"\[meta\] unroll must be an integer, got '20'"),
        ({"meta": {"epochs": 3}}, r"unknown key\(s\) epochs; allowed: iterations"),
        ({"task": {"network": "huge"}}, r"unknown network 'huge'; known networks: big, small"),
        ({"update_net": {"features": "q"}}, r"unknown feature set 'q'"),
        ({"colour": "red"}, r"recipe: unknown key\(s\) colour"),
        ({"meta": {"horizon": 3, "unroll": 5}}, r"meta.horizon = 3 is invalid; allowed: >= meta.unroll"),
    ],
)
def test_bad_recipes_name_the_key_and_what_is_allowed(patch, message):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for key, value in patch.items():
        if isinstance(value, dict):
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    with pytest.raises(ConfigError, match=message):
        parse_recipe(raw)


def test_malformed_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("name = [unclosed\n")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_recipe(path)
