"""zoo bench end to end, joint mode, per-layer nets, and the bench's verdicts and intervals."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner

from cli import main
from zoo.bench import BenchConfig, _interval, _verdict, plan_bench, run_bench, write_report
from zoo.checkpoint import load_checkpoint, save_checkpoint
from zoo.errors import ConfigError
from zoo.features import FeatureSpec
from zoo.meta import JointTrainer, meta_train, parse_recipe
from zoo.networks import build_network
from zoo.train import Method, RunRecord, compare

from .conftest import make_nets

PNG = b"\x89PNG\r\n\x1a\n"


def _checkpoint(path, features: str, horizon: int = 3):
    config = {
        "name": f"tiny-{features}",
        "source_network": {"name": "small", "dataset": "mnist"},
        "training": {"horizon": horizon},
    }
    save_checkpoint(path, make_nets(features, perturb=0.05), FeatureSpec(features), config, "#\n")
    return path


def test_tiny_bench_through_the_cli_writes_the_table_and_plots(mnist_root, tmp_path):
    g, gh = _checkpoint(tmp_path / "g", "g"), _checkpoint(tmp_path / "gh", "gh")
    out = tmp_path / "bench"
    args = [
        "bench", "--datasets", "mnist", "--networks", "small", "--seeds", "2",
        "--steps", "4", "--sgd-grid", "0.03,0.1", "--rmsprop-grid", "1e-3",
        "--adam-grid", "1e-3,3e-3", "--sou-grid", "0.01", "--sou-dampings", "0.03", "--lstm-g", str(g),
        "--lstm-gh", str(gh), "--lstm-layer", str(tmp_path / "absent"),
        "--data-root", str(mnist_root), "--train-examples", "512", "--eval-examples", "128",
        "--test-examples", "128", "--sensitivity-steps", "2", "--long-max-steps", "4",
        "--joint-unroll", "2", "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "LSTM (second order, per layer) skipped" in result.output  # no such checkpoint
    report = (out / "report.md").read_text()
    for row in ("| SGD lr=", "| RMSprop lr=0.001 |", "| Adam lr=", "| SOU α=0.01 μ=0.03 |",
                "| LSTM (gradient only) |", "| LSTM (second order) |", "| joint mode |"):  # fmt: skip
        assert row in report, row
    assert "## mnist / small" in report
    assert "Adam grid (final loss on the tuning seed): 0.001: " in report
    assert "worst/best" in report and "verdict" in report
    for kind in ("loss", "accuracy", "sensitivity", "long"):
        assert (out / f"mnist-small-{kind}.png").read_bytes()[:8] == PNG
    saved = json.loads((out / "bench.json").read_text())
    cell = saved["cells"][0]
    assert cell["long"]["lstm-gh"]["steps"] == 4  # 10 × horizon 3, capped at 4
    assert len(cell["runs"]["SOU α=0.01 μ=0.03"]) == 2


def test_bench_refuses_unknown_methods_naming_the_known_ones():
    with pytest.raises(ConfigError, match="unknown method.*'newton'.*known methods: sgd"):
        BenchConfig(methods=("newton",))


def test_bench_library_api_runs_a_cell_without_checkpoints(tiny_data, tmp_path):
    config = BenchConfig(
        datasets=("tiny",),
        networks=("small",),
        methods=("adam", "sou", "lstm-gh", "joint"),
        seeds=2,
        steps=3,
        grids={"adam": (1e-3,), "sou": (0.01,)},
        sou_dampings=(0.03,),
        checkpoints={"lstm-gh": str(tmp_path / "missing")},
        eval_examples=64,
        test_examples=64,
        sensitivity=False,
    )
    plan = plan_bench(config, load=lambda name, root: tiny_data)
    assert plan.notes and "LSTM (second order) skipped" in plan.notes[0]
    cells = run_bench(plan)
    assert set(cells[0].results) == {"Adam lr=0.001", "SOU α=0.01 μ=0.03", "joint mode"}
    text = write_report(cells, config, tmp_path / "out")
    assert "| joint mode | init lr 0.002 |" in text


def test_joint_mode_meta_trains_the_nets_on_the_network_it_trains(tiny_data):
    torch.manual_seed(0)
    model = build_network("small", tiny_data.input_shape, tiny_data.num_classes)
    nets = make_nets("gh")
    start = copy.deepcopy(nets)
    trainer = JointTrainer(model, nets, FeatureSpec("gh"), unroll=4, meta_lr=0.01)
    losses = [
        trainer.train_step(tiny_data.train_x[i : i + 32], tiny_data.train_y[i : i + 32]).item()
        for i in range(0, 192, 16)[:12]
    ]
    assert trainer.meta_updates == 2  # steps 5 and 9 close the unrolls of steps 1-4, 5-8
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    moved = [
        not torch.equal(a, b)
        for a, b in zip(nets["fc"].parameters(), start["fc"].parameters(), strict=True)
    ]
    assert any(moved)
    # The model's own parameters follow the trajectory (what evaluation reads).
    for a in trainer.trainee.assignments:
        assert torch.equal(a.param, trainer.trainee.params[a.name])


def test_joint_mode_runs_in_compare_beside_ordinary_optimizers(tiny_data):
    joint = Method(
        "joint",
        lambda m: JointTrainer(m, make_nets("gh"), FeatureSpec("gh"), unroll=2),
        needs_curvature=True,
    )
    adam = Method("adam", lambda m: torch.optim.Adam(m.parameters(), lr=2e-3))
    results = compare("small", tiny_data, [joint, adam], steps=1, seeds=[0], eval_examples=64)
    # Before any meta-update the fresh nets are Adam at lr 2e-3: the same first step.
    assert results["joint"][0].train_loss == pytest.approx(results["adam"][0].train_loss)


def test_joint_mode_validates_its_arguments(tiny_data):
    model = build_network("small", tiny_data.input_shape, tiny_data.num_classes)
    with pytest.raises(ConfigError, match="JointTrainer: unroll must be >= 1, got 0"):
        JointTrainer(model, make_nets("gh"), FeatureSpec("gh"), unroll=0)
    with pytest.raises(ConfigError, match=r"no update net for \['fc'\]"):
        JointTrainer(model, {"conv": make_nets("gh")["conv"]}, FeatureSpec("gh"))


def test_per_layer_nets_meta_train_on_big_and_round_trip_through_a_checkpoint(tiny_data, tmp_path):
    recipe = parse_recipe(
        {
            "name": "tiny-per-layer",
            "task": {"network": "big", "batch_size": 16},
            "update_net": {"features": "gh", "per_layer": True},
            "meta": {"iterations": 2, "horizon": 4, "unroll": 2, "validate_every": 2},
            "validation": [{"network": "big", "steps": 2, "seeds": [7]}],
        }
    )
    result = meta_train(recipe, tiny_data)
    assert sorted(result.nets) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    path = tmp_path / "ck"
    config = {"name": "tiny-per-layer", "per_layer": True, "training": {"horizon": 4}}
    save_checkpoint(path, result.nets, FeatureSpec("gh"), config, "#\n")
    loaded = load_checkpoint(path)
    assert loaded.per_layer and sorted(loaded.nets) == sorted(result.nets)
    model = build_network("big", tiny_data.input_shape, tiny_data.num_classes)
    opt = loaded.attach(model)
    assert {a.name: a.route for a in opt.assignments}["conv2.weight"] == "conv2"
    assert {a.route for a in opt.assignments} == set(result.nets)


def test_per_layer_recipes_must_validate_on_their_own_network():
    with pytest.raises(ConfigError, match="every \\[\\[validation\\]\\] network must be 'big'"):
        parse_recipe(
            {
                "name": "x",
                "task": {"network": "big"},
                "update_net": {"per_layer": True},
                "validation": [{"network": "small"}],
            }
        )


def _record(curve):
    steps = list(range(0, 10 * len(curve), 10))
    return RunRecord("m", 0, steps, curve, 0.5, 1.0)


@pytest.mark.parametrize(
    ("curve", "verdict"),
    [
        ([2.3, 1.0, 0.8, 0.5, 0.3], "keeps improving"),
        ([2.3, 1.0, 0.8, 0.79, 0.78], "stalls"),
        ([2.3, 1.0, 0.8, 1.5, 2.0], "diverges"),
        ([2.3, 1.0, 0.8, float("nan"), 2.0], "diverges"),
    ],
)
def test_longer_than_trained_verdicts(curve, verdict):
    assert _verdict(_record(curve), horizon=20) == verdict


def test_intervals_are_95_percent_t_intervals():
    mean, half = _interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.30 * 1.0 / math.sqrt(3))
    assert _interval([5.0]) == (5.0, 0.0)


@pytest.mark.parametrize("factor", [0, 1])
def test_long_runs_are_skipped_entirely_at_long_factor_zero(tiny_data, tmp_path, factor):
    gh = _checkpoint(tmp_path / "gh", "gh", horizon=2)
    config = BenchConfig(
        datasets=("tiny",), networks=("small",), methods=("lstm-gh",), seeds=1, steps=2,
        checkpoints={"lstm-gh": str(gh)}, eval_examples=32, test_examples=32,
        sensitivity=False, long_factor=factor,
    )  # fmt: skip
    (cell,) = run_bench(plan_bench(config, load=lambda name, root: tiny_data))
    if factor == 0:
        assert cell.long == {}
    else:
        assert cell.long["lstm-gh"]["steps"] == 2 and cell.long["lstm-gh"]["runs"]
