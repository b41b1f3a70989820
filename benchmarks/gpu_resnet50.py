"""ResNet-50 on one GPU: the learned optimizer against AdamW (step time, peak memory, state).

Synthetic 224x224 batches (the cost does not depend on the pixels), bf16 autocast, the
fused chunked update (``UpdateOptions(chunk_size=...)``), LSTM state in fp32 and bf16.
Each variant: ``--warmup`` steps, then the median of ``--steps`` timed steps
(``torch.cuda.synchronize`` around each), ``torch.cuda.max_memory_allocated`` over the
timed steps, and optimizer-state bytes per parameter. Sized to finish in well under 10
minutes on one recent GPU (about 4 x 50 ResNet-50 steps at batch 64).

    python benchmarks/gpu_resnet50.py [--batch 64] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zoo import curvature  # noqa: E402
from zoo.fast_update import UpdateOptions  # noqa: E402
from zoo.features import FeatureSpec  # noqa: E402
from zoo.networks import build_network  # noqa: E402
from zoo.optimizer import LearnedOptimizer  # noqa: E402
from zoo.update_net import UpdateNet  # noqa: E402


def state_bytes(opt) -> int:
    if isinstance(opt, LearnedOptimizer):
        total = sum(
            t.numel() * t.element_size()
            for ks in opt._kinds.values()
            for t in (*ks.features, ks.lstm)
        )
        return total + sum(state_bytes(b) for b in opt._baselines.values())
    return sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    )


def run(variant: str, options, batch: int, warmup: int, steps: int) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_network("resnet50", (3, 224, 224), 1000).to(device)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    if options is None:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        nets = {k: UpdateNet(5).to(device) for k in ("conv", "fc")}
        opt = LearnedOptimizer(model, nets, FeatureSpec("gh"), options=options)

    def step():
        opt.zero_grad(set_to_none=True)
        curvature_step = options is not None and opt.wants_curvature()
        with torch.autocast("cuda", torch.bfloat16):
            if curvature_step:
                curvature.backward(model, x, y)
            else:
                loss = F.cross_entropy(model(x), y)
        if not curvature_step:
            loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    row = {
        "variant": variant,
        "batch": batch,
        "parameters": params,
        "step_ms_median": 1e3 * statistics.median(times),
        "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30,
        "state_bytes_per_param": state_bytes(opt) / params,
    }
    opt.state.clear()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--chunk", type=int, default=1 << 20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_resnet50.py needs a CUDA GPU (none found)")
    variants = {
        "AdamW": None,
        "zoo fused": UpdateOptions(chunk_size=args.chunk),
        "zoo fused, bf16 state": UpdateOptions(chunk_size=args.chunk, state_dtype=torch.bfloat16),
        "zoo fused, bf16 state, h every 10": UpdateOptions(
            chunk_size=args.chunk, state_dtype=torch.bfloat16, hessian_every=10
        ),
    }
    rows = [run(name, o, args.batch, args.warmup, args.steps) for name, o in variants.items()]
    base = rows[0]["step_ms_median"]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}")
    print("| variant | step ms | x AdamW | peak GiB | state B/param |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['step_ms_median']:.1f} | {r['step_ms_median'] / base:.2f} | "
            f"{r['peak_memory_GiB']:.2f} | {r['state_bytes_per_param']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
