"""A full training step with the learned optimizer divided by the same step with Adam.

Per network: forward + curvature backward + ``LearnedOptimizer.step`` against forward +
``loss.backward()`` + ``torch.optim.Adam.step``, same batch, same thread count, timed
side by side in one run (best of several); plus the optimizer state in bytes per
parameter. ``small``/``big`` on MNIST-shaped batches of 128, ``resnet18`` on 224x224
batches (default 8: CPU-sized). The update nets are untrained stand-ins (their cost does
not depend on their weights).

    OMP_NUM_THREADS=1 python benchmarks/train_step.py [--networks small,big,resnet18]

``--convergence STEPS`` instead measures what each option does to training: STEPS steps of
``small`` and ``big`` on MNIST (``--data-root``) with one checkpoint's nets (``--src``, or
the stand-in nets of the tests), one run per option from the same init and batches, final
training loss (on the first 1,024 training examples) side by side. The fused fp32 path is
left out: it equals the one-shot path to float round-off (tests/test_scale.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zoo import curvature  # noqa: E402
from zoo.fast_update import DEFAULT_CHUNK, UpdateOptions  # noqa: E402
from zoo.features import FeatureSpec  # noqa: E402
from zoo.networks import build_network  # noqa: E402
from zoo.optimizer import LearnedOptimizer  # noqa: E402
from zoo.update_net import UpdateNet  # noqa: E402

SHAPES = {"small": ((1, 28, 28), 10, 128), "big": ((1, 28, 28), 10, 128)}


def timed(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def state_bytes(opt) -> int:
    if isinstance(opt, LearnedOptimizer):
        total = sum(
            t.numel() * t.element_size()
            for ks in opt._kinds.values()
            for t in (*ks.features, ks.lstm)
        )
        for baseline in opt._baselines.values():
            total += state_bytes(baseline)
        return total
    return sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    )


def measure(network: str, batch: int | None, repeat: int) -> dict:
    shape, classes, default_batch = SHAPES.get(network, ((3, 224, 224), 1000, 8))
    batch = batch or default_batch
    torch.manual_seed(0)
    model = build_network(network, shape, classes)
    params = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(batch, *shape), torch.randint(0, classes, (batch,))
    nets = {k: UpdateNet(5).requires_grad_(False) for k in ("conv", "fc")}

    adam = torch.optim.Adam(model.parameters(), lr=1e-3)

    def adam_step():
        adam.zero_grad()
        F.cross_entropy(model(x), y).backward()
        adam.step()

    row = {"network": network, "parameters": params, "batch": batch}
    row["adam_s"] = timed(adam_step, repeat)
    row["adam_state_B_per_param"] = state_bytes(adam) / params
    adam.state.clear()
    fast = UpdateOptions(chunk_size=DEFAULT_CHUNK)
    variants = {"one-shot": UpdateOptions(), "fused": fast}
    variants["fused+bf16 state"] = UpdateOptions(
        chunk_size=DEFAULT_CHUNK, state_dtype=torch.bfloat16
    )
    variants["fused, h every 10"] = UpdateOptions(chunk_size=DEFAULT_CHUNK, hessian_every=10)
    if params > 5_000_000:
        # GBs of intermediates one-shot (the fused path exists for this); h-every-10 would
        # need ten ~10 s steps per sample on this CPU.
        del variants["one-shot"], variants["fused, h every 10"]
    for name, options in variants.items():
        opt = LearnedOptimizer(model, nets, FeatureSpec("gh"), options=options)
        opt.zero_grad()
        curvature.backward(model, x, y)
        parts = {}

        def step(opt=opt, parts=parts):
            opt.zero_grad()
            t0 = time.perf_counter()
            if opt.wants_curvature():
                curvature.backward(model, x, y)
            else:
                F.cross_entropy(model(x), y).backward()
            t1 = time.perf_counter()
            opt.step()
            parts["backward"], parts["update"] = t1 - t0, time.perf_counter() - t1

        if options.hessian_every > 1:  # average over a whole refresh period
            seconds = timed(lambda k=options.hessian_every: [step() for _ in range(k)], 1)
            seconds /= options.hessian_every
        else:
            seconds = timed(step, repeat)
        row[f"zoo {name} s"] = seconds
        row[f"zoo {name} / adam"] = seconds / row["adam_s"]
        row[f"zoo {name} update s"] = parts["update"]
        row[f"zoo {name} state B/param"] = state_bytes(opt) / params
        del opt
    return row


def convergence(steps: int, data_root, src, seed: int = 0) -> list[dict]:
    from zoo.data import load_dataset
    from zoo.train import Method, initial_network, train_run

    data = load_dataset("mnist", data_root)
    if src:
        import zoo

        checkpoint = zoo.load(src)
        nets, spec, name = checkpoint.nets, checkpoint.features, checkpoint.name
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from conftest import make_nets

        nets, spec, name = make_nets("gh", perturb=0.05), FeatureSpec("gh"), "stand-in nets"
    variants = {
        "one-shot (default)": UpdateOptions(),
        "fused + bf16 state": UpdateOptions(chunk_size=DEFAULT_CHUNK, state_dtype=torch.bfloat16),
        "fused + h every 5": UpdateOptions(chunk_size=DEFAULT_CHUNK, hessian_every=5),
        "fused + h every 20": UpdateOptions(chunk_size=DEFAULT_CHUNK, hessian_every=20),
    }
    rows = []
    for network in ("small", "big"):
        start = initial_network(network, data, seed)
        for label, options in variants.items():
            import copy

            method = Method(
                label,
                lambda m, o=options: LearnedOptimizer(
                    m, {k: copy.deepcopy(v) for k, v in nets.items()}, spec, options=o
                ),
                needs_curvature=True,
            )
            record = train_run(
                copy.deepcopy(start), data, method, steps=steps, seed=seed, eval_examples=1024
            )
            rows.append(
                {
                    "network": network,
                    "option": label,
                    "nets": name,
                    "final_train_loss": record.train_loss[-1],
                    "test_accuracy": record.test_accuracy,
                    "seconds": record.seconds,
                }
            )
            print(json.dumps(rows[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="small,big,resnet18")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--convergence", type=int, default=0, metavar="STEPS")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--src", default=None)
    args = parser.parse_args()
    if args.convergence:
        rows = convergence(args.convergence, args.data_root, args.src)
    else:
        rows = []
        for network in args.networks.split(","):
            rows.append(measure(network, args.batch, args.repeat if network in SHAPES else 1))
            print(json.dumps(rows[-1]), flush=True)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(meta["machine"], meta["date"])
    if args.json:
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
