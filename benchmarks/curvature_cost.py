"""Time and peak memory of the curvature pass relative to a plain forward + backward.

For each network (CPU, batch 32, one thread): the median wall time of ``plain`` (forward,
cross-entropy, ``loss.backward()``) and of ``zoo.curvature.backward`` (forward, gradient
and diagonal second derivatives) over interleaved repeats, and the peak resident memory
each adds over the model and batch (measured in a fresh subprocess per method, since a
process's peak RSS only grows). The ratio ``curvature / plain`` is what the issue's
≤ 1.6× goal is about.

    OMP_NUM_THREADS=1 python benchmarks/curvature_cost.py [--repeats 15] [--modes diagonal]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from zoo import curvature
from zoo.networks import build_network

NETWORKS = {
    "small": ((1, 28, 28), lambda: build_network("small", (1, 28, 28))),
    "big": ((1, 28, 28), lambda: build_network("big", (1, 28, 28))),
    "resnet18": ((3, 32, 32), lambda: _resnet18()),
}


def _resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=10)


def _setup(name: str, batch: int):
    torch.manual_seed(0)
    shape, factory = NETWORKS[name]
    model = factory()
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    return model, x, y


def _step(method: str, model: nn.Module, x, y) -> None:
    for p in model.parameters():
        p.grad = None
    if method == "plain":
        F.cross_entropy(model(x), y).backward()
    else:
        curvature.backward(model, x, y, mode=method)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _peak_child(name: str, method: str, batch: int) -> None:
    """Subprocess body: print the peak RSS the method adds over model + batch + warm-up."""
    torch.set_num_threads(1)
    model, x, y = _setup(name, batch)
    _step(method, model, x, y)  # warm-up: lazy imports, tracing, allocator pools
    for p in model.parameters():
        p.grad = None
        p.__dict__.pop("hessian_diag", None)
    before = _rss_bytes()
    # Reset the kernel's peak-RSS mark (VmHWM) so imports and set-up do not count.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    for _ in range(2):
        _step(method, model, x, y)
    print(json.dumps({"extra_bytes": max(_peak_rss_bytes() - before, 0)}))


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak(name: str, method: str, batch: int) -> int:
    # Large blocks straight from mmap, returned on free: RSS then follows live memory
    # instead of glibc's cached heap, so the peak is the step's own.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, method, "--batch", str(batch)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_bytes"]


def _times(name: str, methods: list[str], batch: int, repeats: int) -> dict[str, float]:
    model, x, y = _setup(name, batch)
    samples = {m: [] for m in methods}
    for m in methods:  # warm-up (tracing, allocator)
        _step(m, model, x, y)
    for _ in range(repeats):
        for m in methods:  # interleaved so machine load hits all alike
            started = time.perf_counter()
            _step(m, model, x, y)
            samples[m].append(time.perf_counter() - started)
    return {m: statistics.median(s) for m, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--modes", default="diagonal", help="comma-separated curvature modes")
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--child", nargs=2, metavar=("NETWORK", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _peak_child(*args.child, args.batch)
        return
    torch.set_num_threads(1)
    modes = args.modes.split(",")
    methods = ["plain", *modes]
    print(
        f"<!-- {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"1 thread, batch {args.batch}, {args.repeats} repeats -->"
    )
    print(
        "| network | mode | plain time | curvature time | time ratio | plain peak | "
        "curvature peak | memory ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.networks.split(","):
        times = _times(name, methods, args.batch, args.repeats)
        peaks = {m: _peak(name, m, args.batch) for m in methods}
        for mode in modes:
            print(
                f"| {name} | {mode} | {times['plain'] * 1e3:.1f} ms | {times[mode] * 1e3:.1f} ms "
                f"| {times[mode] / times['plain']:.2f}× | {peaks['plain'] / 2**20:.1f} MiB "
                f"| {peaks[mode] / 2**20:.1f} MiB | {peaks[mode] / max(peaks['plain'], 1):.2f}× |"
            )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
