"""The command line, end to end: real MNIST where it matters, bad input everywhere."""

import json

import pytest
from click.testing import CliRunner

from cli import main
from zoo.checkpoint import load_checkpoint, save_checkpoint
from zoo.features import FeatureSpec

from .conftest import make_nets


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "ck"
    config = {"name": "tiny-ck", "source_network": {"name": "small", "dataset": "mnist"}}
    save_checkpoint(path, make_nets(perturb=0.05), FeatureSpec("gh"), config, "# tiny\n")
    return path


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_transfer_end_to_end_on_real_mnist(checkpoint, mnist_root, tmp_path):
    out = tmp_path / "out"
    result = _run(
        "transfer",
        "--src",
        str(checkpoint),
        "--dst",
        "big",
        "--data-root",
        str(mnist_root),
        "--steps",
        "4",
        "--seeds",
        "2",
        "--adam-grid",
        "1e-3,3e-3",
        "--out",
        str(out),
        "--eval-examples",
        "256",
        "--test-examples",
        "500",
    )
    assert result.exit_code == 0, result.output
    assert "data: MNIST: 10,000 train" in result.output
    assert "conv1.weight" in result.output and "fc2.bias" in result.output
    assert (
        "total -> conv: 6 tensors / 14,048 coords, fc: 4 tensors / 38,282 coords" in result.output
    )
    assert "| zoo tiny-ck |" in result.output and "| Adam lr=" in result.output
    png = out / "transfer-big-mnist.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((out / "transfer-big-mnist.json").read_text())
    assert set(payload["adam_grid"]) == {"0.001", "0.003"}
    assert len(payload["runs"]["zoo tiny-ck"]) == 2


def _meta_train(recipe_text: str, mnist_root, tmp_path):
    """``zoo meta-train`` on a tiny recipe given as TOML text; (result, checkpoint folder)."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text)
    out = tmp_path / "ck"
    result = _run("meta-train", str(recipe), "--out", str(out), "--data-root", str(mnist_root))
    assert result.exit_code == 0, result.output
    return result, out


def test_meta_train_writes_a_loadable_checkpoint(mnist_root, tmp_path):
    result, out = _meta_train(
        'name = "cli-tiny"\n[task]\nbatch_size = 16\n'
        "[meta]\niterations = 2\nhorizon = 4\nunroll = 2\nvalidate_every = 2\n"
        '[[validation]]\nnetwork = "small"\nsteps = 2\nseeds = [5]\n',
        mnist_root,
        tmp_path,
    )
    loaded = load_checkpoint(out)
    assert loaded.name == "cli-tiny"
    card = (out / "README.md").read_text()
    assert "zoo meta-train" in card and "final meta-loss" in card
    assert loaded.config["training"]["horizon"] == 4
    assert "validation by iteration: 0 " in result.output
    # Whether the nets beat their Adam start is said on screen and in the card.
    never = loaded.config["training"]["best_iteration"] == 0
    assert ("behaves exactly as Adam with lr 0.002" in result.output) == never
    assert ("behaves exactly as Adam with lr 0.002" in card) == never


def test_meta_train_records_a_horizon_schedule(mnist_root, tmp_path):
    _, out = _meta_train(
        'name = "cli-sched"\n[task]\nbatch_size = 16\n'
        "[meta]\niterations = 2\nhorizon = 4\nhorizon_schedule = [2, 6]\nunroll = 2\n"
        'validate_every = 2\n[[validation]]\nnetwork = "small"\nsteps = 2\nseeds = [5]\n',
        mnist_root,
        tmp_path,
    )
    training = load_checkpoint(out).config["training"]
    assert training["horizon"] == 6 and training["horizon_schedule"] == [2, 6]
    assert "tasks of 2/6 (cycled) steps" in (out / "README.md").read_text()


def test_meta_train_card_names_the_layers_of_a_per_layer_checkpoint(mnist_root, tmp_path):
    _, out = _meta_train(
        'name = "cli-layers"\n[task]\nbatch_size = 16\n[update_net]\nper_layer = true\n'
        "[meta]\niterations = 1\nhorizon = 2\nunroll = 2\nvalidate_every = 1\n"
        '[[validation]]\nnetwork = "small"\nsteps = 2\nseeds = [5]\n',
        mnist_root,
        tmp_path,
    )
    card = (out / "README.md").read_text()
    assert "one net per\nlayer of `small`: conv1, fc1" in card, card
    assert "layer kind: conv, fc" not in card


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--src", "{tmp}/missing"], "not a folder, not a shipped name"),
        (["--src", "{corrupt}"], "model.safetensors is missing"),
        (["--dst", "huge"], "unknown network 'huge'; known networks: big, small"),
        (["--data-root", "{tmp}/nodata"], "does not exist or is not a folder"),
        (["--steps", "-3"], "must be >= 1, got -3"),
        (["--adam-grid", "fast"], "expected comma-separated numbers"),
    ],
)
def test_transfer_bad_input_exits_non_zero_and_writes_nothing(args, message, checkpoint, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{}")
    args = [a.format(tmp=tmp_path, corrupt=corrupt) for a in args]
    if "--src" not in args:
        args = ["--src", str(checkpoint), *args]
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["transfer", *args, "--out", str(out), "--steps", "1"]
        if "--steps" not in args
        else ["transfer", *args, "--out", str(out)],
    )
    assert result.exit_code != 0
    assert message in result.output
    assert not out.exists()


def test_meta_train_malformed_recipe_exits_non_zero_and_writes_nothing(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('name = "x"\n[meta]\niterations = "many"\n')
    out = tmp_path / "ck"
    result = CliRunner().invoke(main, ["meta-train", str(recipe), "--out", str(out)])
    assert result.exit_code == 1
    assert "[meta] iterations must be an integer, got 'many'" in result.output
    assert not out.exists()


def test_info_describes_a_checkpoint(checkpoint):
    result = _run("info", str(checkpoint))
    assert result.exit_code == 0
    assert "h_rel" in result.output and "conv, fc" in result.output


TINY_RECIPE = (
    'name = "cli-tiny"\n[task]\nbatch_size = 16\n'
    "[meta]\niterations = 2\nhorizon = 4\nunroll = 2\nvalidate_every = 2\n"
    '[[validation]]\nnetwork = "small"\nsteps = 2\nseeds = [5]\n'
)


def test_meta_train_save_every_creates_the_missing_out_parent(mnist_root, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / "new" / "deeper" / "ck"
    result = _run(
        "meta-train",
        str(recipe),
        "--out",
        str(out),
        "--data-root",
        str(mnist_root),
        "--save-every",
        "1",
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "deeper" / "ck.meta-state" / "meta_state.json").is_file()
    assert load_checkpoint(out).name == "cli-tiny"


@pytest.mark.parametrize(
    ("command", "option", "where"),
    [
        ("transfer", "--out", "/proc/zoo"),
        ("transfer", "--out", "/sys/zoo"),
        ("bench", "--out", "/sys/zoo/deeper"),
        ("meta-train", "--out", "/proc/zoo"),
        ("meta-train", "--state-dir", "/sys/zoo"),
    ],
)
def test_uncreatable_output_folders_are_refused_at_startup(
    command, option, where, checkpoint, tmp_path
):
    args = [command]
    if command == "transfer":
        args += ["--src", str(checkpoint), "--steps", "1"]
    if command == "meta-train":
        recipe = tmp_path / "r.toml"
        recipe.write_text(TINY_RECIPE)
        args += [str(recipe), "--data-root", str(tmp_path / "nodata")]
        if option != "--out":
            args += ["--out", str(tmp_path / "a" / "ck")]
    result = CliRunner().invoke(main, [*args, option, where])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output
    assert "cannot be created or written" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "a").exists()  # the probe leaves nothing behind


def test_out_below_a_file_says_the_file_is_a_file(checkpoint, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = CliRunner().invoke(
        main, ["transfer", "--src", str(checkpoint), "--out", str(afile / "sub")]
    )
    assert result.exit_code == 2
    assert f"{afile} is a file" in result.output


def test_meta_train_card_resume_and_state_message(mnist_root, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY_RECIPE.replace("[meta]", "[update_net]\nnum_layers = 1\n[meta]"))
    out = tmp_path / "ck"
    args = ["meta-train", str(recipe), "--out", str(out), "--data-root", str(mnist_root)]
    first = _run(*args, "--save-every", "5")  # never reached in 2 iterations: nothing saved
    assert first.exit_code == 0, first.output
    assert "resumable state" not in first.output
    assert "1 layer(s) x 20 units" in (out / "README.md").read_text()
    saved = _run(*args, "--save-every", "2")
    assert f"resumable state in {tmp_path / 'ck.meta-state'}" in saved.output
    minutes = load_checkpoint(out).config["metrics"]["meta_training_minutes"]
    resumed = _run(*args, "--resume", "--iterations", "3")
    assert resumed.exit_code == 0, resumed.output
    config = load_checkpoint(out).config
    assert len(config["commands"]) == 2
    assert config["metrics"]["meta_training_minutes"] >= minutes
    assert "resumed with `zoo " in (out / "README.md").read_text()


def test_meta_train_says_prominently_that_iterations_were_discarded(
    mnist_root, tmp_path, monkeypatch
):
    import dataclasses

    import zoo.meta

    real = zoo.meta.meta_train
    monkeypatch.setattr(
        zoo.meta, "meta_train", lambda *a, **k: dataclasses.replace(real(*a, **k), skipped=2)
    )
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY_RECIPE)
    result = CliRunner().invoke(
        main,
        ["meta-train", str(recipe), "--out", str(tmp_path / "ck"), "--data-root", str(mnist_root)],
    )
    assert result.exit_code == 0, result.output
    assert "WARNING: 2 meta-iteration(s) went non-finite and were discarded" in result.output


def test_meta_train_with_no_successful_iteration_fails_and_writes_nothing(
    mnist_root, tmp_path, poison_curvature
):
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / "ck"
    result = CliRunner().invoke(
        main, ["meta-train", str(recipe), "--out", str(out), "--data-root", str(mnist_root)]
    )
    assert result.exit_code == 1, result.output
    assert "no meta-iteration succeeded" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "-1"], "Invalid value for '--workers': -1 is not in the range x>=0"),
        (["--chunk-size", "0"], "Invalid value for '--chunk-size': expected auto, off or a"),
        (["--chunk-size", "lots"], "Invalid value for '--chunk-size'"),
    ],
)
def test_transfer_option_errors_name_the_option(args, message, checkpoint, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["transfer", "--src", str(checkpoint), "--out", str(out), *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_bench_long_factor_must_not_be_negative(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--long-factor", "-2", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "'--long-factor'" in result.output
