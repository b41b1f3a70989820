import json
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
        (
            {"meta": {"horizon": 3, "unroll": 5}},
            r"meta.horizon = 3 is invalid; allowed: >= meta.unroll",
        ),
        (
            {"meta": {"meta_lr": math.inf}},
            r"meta.meta_lr = inf is invalid; allowed: finite and > 0",
        ),
        ({"meta": {"clip": math.inf}}, r"meta.clip = inf is invalid; allowed: finite and > 0"),
        ({"meta": {"seed": -1}}, r"meta.seed = -1 is invalid"),
        ({"update_net": {"init_lr": math.inf}}, r"update_net.init_lr = inf is invalid"),
        ({"update_net": {"init_lr": math.nan}}, r"update_net.init_lr = nan is invalid"),
        ({"task": {"widths": [1.0, math.inf]}}, r"task.widths = \(1.0, inf\) is invalid"),
        ({"task": {"init_scale": [1.0, math.inf]}}, r"task.init_scale = \(1.0, inf\) is invalid"),
        ({"update_net": {"hidden_size": 40000}}, r"update_net.hidden_size = 40000 .* 1..4096"),
        ({"update_net": {"num_layers": 17}}, r"update_net.num_layers = 17 .* 1..16"),
        ({"validation": [{"seeds": [99999999999999999999]}]}, r"seeds .* 0 <= seed < 2\*\*63"),
        ({"validation": [{"seeds": [-3]}]}, r"seeds = \[-3\] is invalid"),
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


def test_subset_larger_than_the_training_split_warns_and_uses_all(tiny_data, caplog):
    raw = {
        **TINY,
        "task": {**TINY["task"], "subset": 10_000},
        "meta": {"iterations": 1, "horizon": 2, "unroll": 2, "validate_every": 1},
        "validation": [{"network": "small", "steps": 1, "seeds": [7]}],
    }
    with caplog.at_level("WARNING", logger="zoo.meta"):
        result = meta_train(parse_recipe(raw), tiny_data)
    assert len(result.history) == 1
    assert "task.subset = 10000 exceeds the 192 training examples" in caplog.text
    assert "a warning, not an error" in caplog.text


def test_huge_validation_seed_below_2_63_trains(tiny_data):
    raw = {
        **TINY,
        "meta": {"iterations": 1, "horizon": 2, "unroll": 2, "validate_every": 1},
        "validation": [{"network": "small", "steps": 1, "seeds": [2**63 - 1]}],
    }
    assert len(meta_train(parse_recipe(raw), tiny_data).history) == 1


def test_a_run_with_no_successful_meta_iteration_raises(tiny_data, poison_curvature):
    from zoo.errors import NonFiniteError

    raw = {
        **TINY,
        "meta": {"iterations": 3, "horizon": 2, "unroll": 2, "validate_every": 3},
        "validation": [{"network": "small", "steps": 1, "seeds": [7]}],
    }
    with pytest.raises(NonFiniteError, match="no meta-iteration succeeded: all 3 were non-finite"):
        meta_train(parse_recipe(raw), tiny_data)


def test_resumed_run_sums_the_time_and_lists_both_commands(tiny_data, tmp_path):
    raw = {
        **TINY,
        "meta": {"iterations": 2, "horizon": 2, "unroll": 1, "validate_every": 2},
        "validation": [{"network": "small", "steps": 1, "seeds": [7]}],
    }
    state = tmp_path / "s"
    first = meta_train(parse_recipe(raw), tiny_data, state_dir=state, save_every=2, command="one")
    assert first.commands == ("one",) and first.total_seconds == first.seconds
    raw["meta"] = {**raw["meta"], "iterations": 3}
    again = meta_train(parse_recipe(raw), tiny_data, state_dir=state, resume=True, command="two")
    assert again.commands == ("one", "two")
    assert again.total_seconds > again.seconds


def test_shared_net_is_one_set_of_weights_for_every_kind(tiny_data, tmp_path):
    from zoo.checkpoint import load_checkpoint, save_checkpoint
    from zoo.features import FeatureSpec

    raw = {
        **TINY,
        "update_net": {"features": "gh", "init_lr": 0.002, "shared": True},
        "meta": {"iterations": 4, "horizon": 4, "unroll": 2, "meta_lr": 0.01, "validate_every": 2},
        "validation": [{"network": "small", "steps": 4, "seeds": [7]}],
    }
    state = tmp_path / "state"
    result = meta_train(parse_recipe(raw), tiny_data, state_dir=state, save_every=2)
    assert result.nets["conv"] is result.nets["fc"]  # trained as one net
    assert result.nets["conv"].head.weight.abs().sum() > 0
    save_checkpoint(tmp_path / "ck", result.nets, FeatureSpec("gh"), {"name": "s"}, "card")
    loaded = load_checkpoint(tmp_path / "ck")
    for (name, a), (_, b) in zip(
        loaded.nets["conv"].state_dict().items(),
        loaded.nets["fc"].state_dict().items(),
        strict=True,
    ):
        assert torch.equal(a, b), name
        assert torch.equal(a, result.nets["conv"].state_dict()[name])
    # The resumable state holds the shared net too, and resumes.
    raw["meta"] = {**raw["meta"], "iterations": 6}
    again = meta_train(parse_recipe(raw), tiny_data, state_dir=state, resume=True)
    assert again.nets["conv"] is again.nets["fc"]


def test_shared_and_per_layer_are_exclusive():
    raw = {**TINY, "update_net": {"features": "gh", "shared": True, "per_layer": True}}
    with pytest.raises(ConfigError, match="exclusive"):
        parse_recipe(raw)


def test_horizon_schedule_cycles_task_lengths(tiny_data):
    from zoo.meta import longest_horizon, task_horizon

    raw = {
        **TINY,
        "meta": {
            "iterations": 6,
            "horizon": 4,
            "horizon_schedule": [2, 4],
            "unroll": 2,
            "meta_lr": 0.01,
            "validate_every": 6,
        },
        "validation": [{"network": "small", "steps": 2, "seeds": [7]}],
    }
    recipe = parse_recipe(raw)
    assert [task_horizon(recipe.meta, i) for i in range(4)] == [2, 4, 2, 4]
    assert longest_horizon(recipe.meta) == 4
    result = meta_train(recipe, tiny_data)
    assert len(result.history) == 6
    for entries in ([1, 4], [3, 4]):  # below unroll; not a multiple of unroll
        bad = {**raw, "meta": {**raw["meta"], "horizon_schedule": entries}}
        with pytest.raises(ConfigError, match="horizon_schedule"):
            parse_recipe(bad)
    # An empty schedule is "off", as every checkpoint's recorded recipe says.
    off = parse_recipe({**raw, "meta": {**raw["meta"], "horizon_schedule": []}})
    assert task_horizon(off.meta, 1) == 4
    recorded = json.loads(json.dumps(off.to_dict()))  # as config.json stores it
    assert parse_recipe(recorded).meta == off.meta
    wrong = {**raw, "meta": {**raw["meta"], "horizon_schedule": [2.5]}}
    with pytest.raises(ConfigError, match="list of int"):
        parse_recipe(wrong)


def test_state_saved_before_an_option_existed_resumes(tiny_data, tmp_path):
    from zoo.meta_state import _recipe_changes

    current = parse_recipe(TINY).to_dict()
    older = {k: dict(v) if isinstance(v, dict) else v for k, v in current.items()}
    del older["update_net"]["shared"], older["meta"]["horizon_schedule"]
    assert _recipe_changes(older, current) == []
    on = parse_recipe({**TINY, "update_net": {**TINY["update_net"], "shared": True}}).to_dict()
    assert _recipe_changes(older, on) == ["update_net.shared"]
