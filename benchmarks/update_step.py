"""Update-step cost per parameter next to the FLOP-bound limit, measured in the same run.

The coordinate-wise 2x20 LSTM needs ``2·(F+H)·4H + 2·2H·4H + 2·H·2`` FLOP per coordinate
(10,480 for the 5 ``gh`` features). The limit is that count divided by the rate of a
large fp32 GEMM measured here, now, on the same threads: what the step would cost if every
FLOP ran at GEMM speed. Reported: the LSTM alone (naive ``nn.LSTMCell`` over all
coordinates, the fused chunked cell at several chunk sizes, ``torch.compile``), and the
whole ``LearnedOptimizer.step`` (features + LSTM + update) one-shot vs fused.

    OMP_NUM_THREADS=1 python benchmarks/update_step.py [--coords 1000000] [--json out.json]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zoo import curvature  # noqa: E402
from zoo.fast_update import FusedUpdateNet, UpdateOptions  # noqa: E402
from zoo.features import FeatureSpec  # noqa: E402
from zoo.optimizer import LearnedOptimizer  # noqa: E402
from zoo.update_net import UpdateNet  # noqa: E402


def best_of(fn, repeat: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_rate(size: int = 2048) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / best_of(lambda: torch.mm(a, b), repeat=3)


def lstm_flops(net: UpdateNet) -> int:
    hs, flops, width = net.hidden_size, 0, net.num_features
    for _ in range(net.num_layers):
        flops += 2 * (width + hs) * 4 * hs
        width = hs
    return flops + 2 * hs * 2


def perturbed_net(features: int = 5) -> UpdateNet:
    torch.manual_seed(0)
    net = UpdateNet(features)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net.requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coords", type=int, default=1_000_000)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    n = args.coords
    net = perturbed_net()
    flops = lstm_flops(net)
    rate = gemm_rate()
    limit_ns = flops / rate * 1e9
    feats = torch.randn(n, net.num_features).clamp(-5, 5)
    state = 0.5 * torch.randn(n, net.state_size)
    rows = {}

    def per_param(seconds: float) -> float:
        return seconds / n * 1e9

    with torch.no_grad():
        rows["LSTM, naive nn.LSTMCell (one shot)"] = per_param(
            best_of(lambda: net(feats, state), 3)
        )
    for chunk in (1024, 2048, 4096, 16384, 65536):
        fused = FusedUpdateNet(net, chunk)
        s = state.clone()
        rows[f"LSTM, fused, chunk {chunk}"] = per_param(best_of(lambda f=fused, s=s: f(feats, s)))
    s16 = state.to(torch.bfloat16)
    fused = FusedUpdateNet(net, 2048)
    rows["LSTM, fused, chunk 2048, bf16 state"] = per_param(best_of(lambda: fused(feats, s16)))
    if args.compile:
        compiled = FusedUpdateNet(net, 2048, compile=True)
        s = state.clone()
        start = time.perf_counter()
        compiled(feats, s)
        warm = time.perf_counter() - start
        label = "LSTM, torch.compile cell, chunk 2048"
        if compiled._compiled:
            rows[label] = per_param(best_of(lambda: compiled(feats, s)))
            rows[label + " (first call, s)"] = warm
        else:
            rows[label] = "fell back (compile failed)"

    # The whole optimizer step on one fc layer of n coordinates.
    model = torch.nn.Sequential(torch.nn.Linear(n // 1000, 1000, bias=False))
    for name, options in (
        ("optimizer step, one-shot (default)", UpdateOptions()),
        ("optimizer step, fused chunk 2048", UpdateOptions(chunk_size=2048)),
        (
            "optimizer step, fused chunk 2048, bf16 state",
            UpdateOptions(chunk_size=2048, state_dtype=torch.bfloat16),
        ),
    ):
        opt = LearnedOptimizer(model, {"fc": perturbed_net()}, FeatureSpec("gh"), options=options)
        opt.zero_grad()
        curvature.backward(model, torch.randn(4, n // 1000), torch.randint(0, 1000, (4,)))
        rows[name] = per_param(best_of(opt.step, 3))
        del opt

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "coords": n,
        "lstm_flop_per_coord": flops,
        "gemm_gflops": rate / 1e9,
        "flop_bound_ns_per_param": limit_ns,
        "ns_per_param": rows,
    }
    print(f"{result['machine']}; {n:,} coordinates; GEMM 2048^3 {rate / 1e9:.1f} GFLOP/s")
    print(f"FLOP-bound limit: {flops} FLOP / GEMM rate = {limit_ns:.1f} ns/param\n")
    print(f"| {'what':<48} | ns/param | x limit |")
    print(f"|{'-' * 50}|---------:|--------:|")
    for name, value in rows.items():
        if isinstance(value, float) and "(first call" not in name:
            print(f"| {name:<48} | {value:8.1f} | {value / limit_ns:7.2f} |")
        else:
            print(f"| {name:<48} | {value} | |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
