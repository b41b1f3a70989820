"""Merging bench runs: one table per cell, comparable runs only, legacy files, bad input."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from click.testing import CliRunner

from cli import main
from zoo.bench import BenchConfig, plan_bench, run_bench, write_report
from zoo.bench_merge import load_report, merge_reports, method_key
from zoo.errors import ConfigError

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


@pytest.fixture
def two_runs(tiny_data, tmp_path):
    a = _run(tiny_data, tmp_path / "a", ("sgd", "adam"))
    b = _run(tiny_data, tmp_path / "b", ("adam", "sou"))
    return tmp_path / "a", tmp_path / "b", a[0], b[0]


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
        ('{"command": "zoo bench --steps 0", "cells": []}', "no longer parses|must be >= 1"),
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
