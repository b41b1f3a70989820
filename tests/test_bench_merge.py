"""Merging bench runs: one table per cell, comparable runs only, legacy files, bad input."""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import statistics

import pytest
from click.testing import CliRunner

from cli import main
from zoo.bench import BenchConfig, plan_bench, run_bench, write_report
from zoo.bench_merge import load_report, merge_reports, method_key
from zoo.errors import ConfigError

from .conftest import make_tiny_data

PNG = b"\x89PNG\r\n\x1a\n"


def _run(tiny_data, out, methods, steps=3, **grids):
    config = BenchConfig(
        datasets=("tiny",),
        networks=("small",),
        methods=methods,
        seeds=2,
        steps=steps,
        grids={"sgd": (0.1,), "adam": (1e-3, 3e-3), "sou": (0.01,), **grids},
        sou_dampings=(0.03,),
        eval_examples=64,
        test_examples=64,
        sensitivity=False,
    )
    cells = run_bench(plan_bench(config, load=lambda name, root: tiny_data))
    write_report(cells, config, out, command=f"zoo bench --methods {','.join(methods)}")
    return cells


@pytest.fixture(scope="module")
def made_runs(tmp_path_factory):
    """Two tiny bench runs sharing Adam, made once; tests get their own copies."""
    data = make_tiny_data()
    root = tmp_path_factory.mktemp("bench-runs")
    a = _run(data, root / "a", ("sgd", "adam"))
    b = _run(data, root / "b", ("adam", "sou"))
    return root, a[0], b[0]


@pytest.fixture
def two_runs(made_runs, tmp_path):
    root, a, b = made_runs
    shutil.copytree(root / "a", tmp_path / "a")
    shutil.copytree(root / "b", tmp_path / "b")
    return tmp_path / "a", tmp_path / "b", a, b


def test_merged_cell_has_every_method_once_in_bench_order(two_runs, tmp_path):
    a_dir, b_dir, a, b = two_runs
    config, cells = merge_reports([load_report(a_dir), load_report(b_dir)])
    assert config.methods == ("sgd", "adam", "sou")
    (cell,) = cells
    assert list(cell.labels) == ["sgd", "adam", "sou"]
    assert list(cell.results) == ["SGD lr=0.1", "Adam lr=0.003", "SOU α=0.01 μ=0.03"]
    assert cell.best == {"sgd": 0.1, "adam": 3e-3, "sou": 0.01}
    assert cell.sou_damping == 0.03
    # Same seeds and batches: the repeated Adam runs are identical, and the note says so.
    assert [r.train_loss for r in a.results["Adam lr=0.003"]] == [
        r.train_loss for r in b.results["Adam lr=0.003"]
    ]
    assert any("ran in both" in n and "differ by at most 0" in n for n in cell.notes)
    # b's times are rescaled so that its Adam runs at a's ms/step.
    ms = {
        run: sum(r.extra["train_seconds"][-1] / r.steps[-1] for r in c.results["Adam lr=0.003"])
        for run, c in (("a", a), ("b", b))
    }
    factor = ms["a"] / ms["b"]
    merged_sou = cell.results["SOU α=0.01 μ=0.03"]
    original_sou = b.results["SOU α=0.01 μ=0.03"]
    for m, o in zip(merged_sou, original_sou, strict=True):
        assert m.train_loss == o.train_loss
        assert m.extra["train_seconds"] == pytest.approx(
            [t * factor for t in o.extra["train_seconds"]]
        )
    assert any(f"scaled by {factor:.3f}" in n for n in cell.notes)


def test_merged_report_round_trips_and_remerges_to_the_same_table(two_runs, tmp_path):
    a_dir, b_dir, _, _ = two_runs
    config, cells = merge_reports([load_report(a_dir), load_report(b_dir)])
    text = write_report(cells, config, tmp_path / "m", "zoo bench-merge a b", sources=["x", "y"])
    for row in ("| SGD lr=0.1 |", "| Adam lr=0.003 |", "| SOU α=0.01 μ=0.03 |"):
        assert text.count(row) == 1, row
    assert "Merged from these runs:" in text
    assert (tmp_path / "m" / "tiny-small-loss.png").read_bytes()[:8] == PNG
    saved = json.loads((tmp_path / "m" / "bench.json").read_text())
    assert saved["sources"] == ["x", "y"] and saved["config"]["methods"] == ["sgd", "adam", "sou"]
    again = load_report(tmp_path / "m")
    assert again.config == config
    table = text.split("## tiny / small")[1].split("![loss]")[0]
    rewritten = write_report(
        again.cells, again.config, tmp_path / "m2", "zoo bench-merge a b", ["x", "y"]
    )
    assert table in rewritten


def test_runs_with_different_steps_are_refused_naming_the_setting(tiny_data, two_runs, tmp_path):
    a_dir = two_runs[0]
    _run(tiny_data, tmp_path / "long", ("sou",), steps=4)
    with pytest.raises(ConfigError, match=r"not comparable.*steps: 3 in .*a but 4 in .*long"):
        merge_reports([load_report(a_dir), load_report(tmp_path / "long")])


def test_legacy_files_without_a_config_are_rebuilt_from_their_command(two_runs, tmp_path):
    a_dir = two_runs[0]
    saved = json.loads((a_dir / "bench.json").read_text())
    del saved["config"]
    for cell in saved["cells"]:  # as written before labels and tuned values were saved
        del cell["labels"], cell["best"], cell["sou_damping"]
    (a_dir / "bench.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="records no configuration"):
        load_report(a_dir)
    config = BenchConfig(datasets=("tiny",), networks=("small",), methods=("sgd", "adam"),
                         seeds=2, steps=3, eval_examples=64, test_examples=64)  # fmt: skip
    run = load_report(a_dir, lambda command: config)
    (cell,) = run.cells
    assert cell.labels == {"sgd": "SGD lr=0.1", "adam": "Adam lr=0.003"}
    assert cell.best == {"sgd": 0.1, "adam": 3e-3}


def test_method_keys_are_read_back_from_labels():
    assert method_key("LSTM (second order, per layer)") == "lstm-layer"
    assert method_key("LSTM (second order)") == "lstm-gh"
    assert method_key("SOU α=0.01 μ=0.03") == "sou"
    assert method_key("joint mode") == "joint"
    with pytest.raises(ConfigError, match="not a label"):
        method_key("Adagrad lr=0.1")


def test_cli_merges_a_legacy_folder_by_reparsing_its_command(two_runs, tmp_path):
    a_dir, b_dir, _, _ = two_runs
    saved = json.loads((a_dir / "bench.json").read_text())
    del saved["config"]
    args = ("--datasets mnist --networks small --methods sgd,adam --seeds 2 --steps 3 "
            "--sgd-grid 0.1 --adam-grid 0.001,0.003 --eval-examples 64 --test-examples 64 "
            "--no-sensitivity --out somewhere")  # fmt: skip
    saved["command"] = "zoo bench " + args
    (a_dir / "bench.json").write_text(json.dumps(saved))
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["bench-merge", str(a_dir), str(b_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| SGD lr=0.1 |" in result.output and "| SOU α=0.01 μ=0.03 |" in result.output
    assert f"- `zoo bench {shlex.split(args)[0]}" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no bench.json"),
        ("{not json", "cannot read it as JSON"),
        ('{"cells": 3}', "no list of cells"),
        (
            '{"command": "zoo bench --steps 0", "cells": []}',
            "does not parse as a bench run.*must be >= 1",
        ),
        ('{"command": "zoo transfer", "cells": []}', "not a `zoo bench` command"),
    ],
)
def test_cli_names_a_bad_source_and_writes_nothing(tmp_path, content, message):
    source = tmp_path / "src"
    source.mkdir()
    if content is not None:
        (source / "bench.json").write_text(content)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["bench-merge", str(source), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "Error:" in result.output and "Traceback" not in result.output
    assert re.search(message, result.output), result.output
    assert not out.exists()


def _edit(folder, change):
    saved = json.loads((folder / "bench.json").read_text())
    change(saved)
    (folder / "bench.json").write_text(json.dumps(saved))


def test_a_method_tuned_to_different_values_is_refused(tiny_data, two_runs, tmp_path):
    a_dir = two_runs[0]
    _run(tiny_data, tmp_path / "c", ("adam",), adam=(1e-3,))  # Adam lr=0.001 here, 0.003 in a
    with pytest.raises(ConfigError, match=r"Adam is 'Adam lr=0.003' in .* but 'Adam lr=0.001'"):
        merge_reports([load_report(a_dir), load_report(tmp_path / "c")])


def test_a_tampered_grid_that_contradicts_the_tuned_value_is_refused(two_runs):
    a_dir, b_dir, _, _ = two_runs
    _edit(b_dir, lambda s: s["cells"][0]["tuning"]["adam"].update({"0.02": 1e-9}))
    with pytest.raises(ConfigError, match="tuned to 0.003, but grid point 0.02"):
        merge_reports([load_report(a_dir), load_report(b_dir)])


def test_a_method_that_diverged_in_only_one_run_is_refused(two_runs):
    a_dir, b_dir, _, _ = two_runs
    _edit(a_dir, lambda s: s["cells"][0]["runs"].update({"Adam lr=0.003": []}))
    with pytest.raises(ConfigError, match="diverged in only one"):
        merge_reports([load_report(a_dir), load_report(b_dir)])


def test_one_time_factor_per_run_applies_to_all_its_cells(two_runs):
    a_dir, b_dir, _, _ = two_runs

    def add_big(saved):
        big = copy.deepcopy(saved["cells"][0])
        big["network"] = "big"
        saved["cells"].append(big)

    _edit(b_dir, add_big)
    _, cells = merge_reports([load_report(a_dir), load_report(b_dir)])
    small, big = cells
    scaled = [n for c in cells for n in c.notes if "scaled by" in n]
    assert len(scaled) == 2 and scaled[0].split("scaled by")[1] == scaled[1].split("scaled by")[1]
    assert big.results["SOU α=0.01 μ=0.03"][0].extra == small.results["SOU α=0.01 μ=0.03"][0].extra


@pytest.mark.parametrize("setting, value", [("steps", 4), ("seeds", 3), ("target_loss", 0.5)])
def test_runs_that_differ_in_a_comparable_setting_are_refused(two_runs, setting, value):
    a_dir, b_dir, _, _ = two_runs
    _edit(b_dir, lambda s: s["config"].update({setting: value}))
    with pytest.raises(ConfigError, match=f"not comparable.*{setting}"):
        merge_reports([load_report(a_dir), load_report(b_dir)])


def test_the_same_folder_twice_or_a_doubled_cell_is_refused(two_runs):
    a_dir = two_runs[0]
    with pytest.raises(ConfigError, match="given twice"):
        merge_reports([load_report(a_dir), load_report(a_dir)])
    _edit(a_dir, lambda s: s["cells"].append(s["cells"][0]))
    with pytest.raises(ConfigError, match="same dataset/network cell twice"):
        load_report(a_dir)


def test_cli_refuses_to_write_over_a_source_and_leaves_it_intact(two_runs):
    a_dir, b_dir, _, _ = two_runs
    before = (a_dir / "bench.json").read_bytes()
    result = CliRunner().invoke(main, ["bench-merge", str(a_dir), str(b_dir), "--out", str(a_dir)])
    assert result.exit_code == 1 and "is one of the sources" in result.output
    assert (a_dir / "bench.json").read_bytes() == before


def _break(saved, what):
    cell = saved["cells"][0]
    run = next(iter(cell["runs"].values()))[0]
    if what == "runs as a list":
        cell["runs"] = []
    elif what == "labels as text":
        cell["labels"] = "adam"
    elif what == "NaN loss":
        run["train_loss"][-1] = float("nan")
    elif what == "zero clock":
        run["extra"]["train_seconds"] = [0.0] * len(run["steps"])
    elif what == "short curve":
        run["train_loss"] = run["train_loss"][:-1]
    elif what == "no cells":
        saved["cells"] = []
    elif what == "config as null":
        saved["config"] = None
    elif what == "unknown config key":
        saved["config"]["speed"] = 1
    elif what == "help command":
        del saved["config"]
        saved["command"] = "zoo bench --help"
    elif what == "unclosed quote":
        del saved["config"]
        saved["command"] = "zoo bench --out 'x"


@pytest.mark.parametrize(
    "what",
    ["runs as a list", "labels as text", "NaN loss", "zero clock", "short curve", "no cells",
     "config as null", "unknown config key", "help command", "unclosed quote"],
)  # fmt: skip
def test_cli_turns_a_damaged_source_into_one_error_and_writes_nothing(two_runs, tmp_path, what):
    a_dir, b_dir, _, _ = two_runs
    _edit(a_dir, lambda s: _break(s, what))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["bench-merge", str(a_dir), str(b_dir), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error:") and "Traceback" not in result.output, result.output
    assert not out.exists()


def test_time_factors_chain_through_the_run_a_part_shares_a_method_with(two_runs, tmp_path):
    a_dir, b_dir, a, b = two_runs
    x, y = tmp_path / "x", tmp_path / "y"
    shutil.copytree(b_dir, x)  # adam + sou, on "big"
    shutil.copytree(a_dir, y)  # sgd + adam, on "big"
    for folder in (x, y):
        _edit(folder, lambda s: s["cells"][0].update({"network": "big"}))
    _, cells = merge_reports([load_report(a_dir), load_report(x), load_report(y)])
    big = next(c for c in cells if c.network == "big")
    assert any(f"{x} shares no finished method" in n for n in big.notes)
    ms = {
        run: statistics.fmean(
            r.extra["train_seconds"][-1] / r.steps[-1] for r in c.results["Adam lr=0.003"]
        )
        for run, c in (("a", a), ("b", b))
    }
    factor = ms["b"] / ms["a"]  # y (made from a) is put on x's (made from b) clock
    assert any(f"scaled by {factor:.3f}" in n and f"ms/step in {x}" in n for n in big.notes)
    sgd_merged, sgd_original = big.results["SGD lr=0.1"][0], a.results["SGD lr=0.1"][0]
    assert sgd_merged.seconds == pytest.approx(sgd_original.seconds * factor)
