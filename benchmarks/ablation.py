"""Ablations of the second-order LSTM: which of its parts earn their place.

Each variant is a checkpoint meta-trained by a recipe that differs from
``recipes/mnist-small.toml`` in one respect only (``recipes/ablations/*.toml``; the
gradient-only ``recipes/g-mnist-small.toml`` is "G versus G + H"), all with the same
160-iteration budget. Every variant and a tuned Adam train `big` by transfer (one net per
layer kind; ``--networks small,big`` adds the meta-training network) from the same
initialisations and batches per seed, with zoo's benchmark machinery
(:func:`zoo.train.compare`). Adam's learning rate is tuned on the grid below on seed
10000, never a reported seed; reported seeds are 20000, 20001, ...

    OMP_NUM_THREADS=1 python benchmarks/ablation.py --data-root ../shared/data/mnist \\
        --steps 300 --seeds 5 --out benchmarks/ablation

Writes ``ablation.json`` (every run) and ``ablation.md`` (the table for RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zoo  # noqa: E402
from zoo.bench import _fmt, _interval  # noqa: E402
from zoo.data import load_dataset  # noqa: E402
from zoo.safe_io import write_file  # noqa: E402
from zoo.train import Method, adam, compare, report_seeds, steps_to_reach, tune_lr  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = {  # label -> checkpoint reference
    # The 160-iteration versions of lstm2-gh-mnist-small and lstm2-g-mnist-small: every
    # ablation has the same budget (the shipped ones were meta-trained for 480 iterations).
    "G + H (all features, one net per kind)": str(HERE / "ablation/checkpoints/gh-160-iterations"),
    "G only (no curvature inputs)": str(HERE / "ablation/checkpoints/g-160-iterations"),
    "G + H without the momenta": str(
        HERE / "ablation/checkpoints/ablation-gh-no-momenta-mnist-small"
    ),
    "G + H without h_rel": str(HERE / "ablation/checkpoints/ablation-gh-no-h-rel-mnist-small"),
    "G + H without h_trend": str(HERE / "ablation/checkpoints/ablation-gh-no-h-trend-mnist-small"),
    "G + H, one net shared by conv and fc": str(
        HERE / "ablation/checkpoints/ablation-gh-shared-mnist-small"
    ),
}
ADAM_GRID = (5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2)
TUNING_SEED = 10000


def _method(label: str, pretrained) -> Method:
    return Method(label, pretrained.attach, needs_curvature=pretrained.features.uses_curvature)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--networks", default="big")
    parser.add_argument("--eval-examples", type=int, default=2048)
    parser.add_argument("--test-examples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=HERE / "ablation")
    args = parser.parse_args()

    data = load_dataset("mnist", args.data_root)
    variants = {label: zoo.load(ref) for label, ref in VARIANTS.items()}
    options = dict(eval_examples=args.eval_examples, test_examples=args.test_examples)
    report: dict = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)",
        "date": time.strftime("%Y-%m-%d"),
        "data": data.source,
        "steps": args.steps,
        "seeds": args.seeds,
        "variants": {
            label: {
                "checkpoint": ref,
                "features": variants[label].features.name,
                "shared_net": variants[label].config.get("shared_net", False),
                "validation_best": variants[label]
                .config.get("metrics", {})
                .get("validation_score_best"),
                "validation_untrained": variants[label]
                .config.get("metrics", {})
                .get("validation_score_untrained"),
            }
            for label, ref in VARIANTS.items()
        },
        "networks": {},
    }
    for network in args.networks.split(","):
        best_lr, scores = tune_lr(
            network, data, adam, ADAM_GRID, steps=args.steps, seed=TUNING_SEED, **options
        )
        methods = [adam(best_lr)] + [_method(label, p) for label, p in variants.items()]
        results = compare(
            network, data, methods, steps=args.steps, seeds=report_seeds(args.seeds), **options
        )
        adam_final = statistics.fmean(r.train_loss[-1] for r in results[methods[0].name])
        cell = {"adam_lr": best_lr, "adam_grid": scores, "adam_final": adam_final, "runs": {}}
        for name, records in results.items():
            reach = [steps_to_reach(r.steps, r.train_loss, adam_final) for r in records]
            cell["runs"][name] = {
                "final_loss": [r.train_loss[-1] for r in records],
                "test_accuracy": [r.test_accuracy for r in records],
                "steps_to_adam_final": reach,
                "seconds": [r.seconds for r in records],
                "steps": records[0].steps,
                "curves": [r.train_loss for r in records],
            }
        report["networks"][network] = cell
        print(f"{network}: done (Adam lr {best_lr:g})", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    write_file(args.out / "ablation.json", (json.dumps(report, indent=1) + "\n").encode())
    write_file(args.out / "ablation.md", _table(report).encode())
    print(_table(report))


def _table(report: dict) -> str:
    nets = list(report["networks"])
    head = ["variant", "features", "validation (best / Adam start)"]
    for n in nets:
        head += [f"{n}: loss@{report['steps']}", f"{n}: test acc %", f"{n}: steps to Adam's loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    adam_name = next(iter(report["networks"][nets[0]]["runs"]))
    rows = [(adam_name, None)] + [(label, info) for label, info in report["variants"].items()]
    for label, info in rows:
        if info is None:
            lr = ", ".join(f"{n} {report['networks'][n]['adam_lr']:g}" for n in nets)
            row = [f"Adam, tuned (lr {lr})", "-", "-"]
        else:
            val = f"{info['validation_best']:.4f} / {info['validation_untrained']:.4f}"
            row = [label, info["features"] + (" (shared)" if info["shared_net"] else ""), val]
        for n in nets:
            runs = report["networks"][n]["runs"][adam_name if info is None else label]
            reach = [s for s in runs["steps_to_adam_final"] if s is not None]
            reached = f"{len(reach)}/{len(runs['steps_to_adam_final'])}"
            if reach:
                mean, half = _interval([float(s) for s in reach])
                reach_text = f"{mean:.0f} ± {half:.0f} ({reached})"
            else:
                reach_text = f"- ({reached})"
            acc = [100 * a for a in runs["test_accuracy"]]
            row += [_fmt(runs["final_loss"]), _fmt(acc, 2), reach_text]
        lines.append("| " + " | ".join(row) + " |")
    seeds = report_seeds(report["seeds"])
    foot = (
        f"\n{report['seeds']} seeds ({seeds[0]}..{seeds[-1]}), {report['steps']} steps, batch "
        f"128; mean ± 95 % t-interval; loss on {report['data']} (training subset); "
        f"Adam tuned on seed {TUNING_SEED} over {list(ADAM_GRID)}. Validation: the "
        "meta-training selection score (mean log training loss over 300-step runs of "
        "`small` and `big` on held-out seed 1000; lower is better).\n"
    )
    return "\n".join(lines) + "\n" + foot


if __name__ == "__main__":
    main()
