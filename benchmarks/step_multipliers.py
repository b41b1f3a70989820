"""What a learned optimizer does to the step: per update net, over one training run.

The update is ``-lr · exp(ln3 · tanh a) · (m̂/√v̂ + tanh(b) · ĝ)`` (zoo/update_net.py), so
an untrained net (a = b = 0) is Adam. This script trains a network with a checkpoint and
records, per net and phase of the run, the mean and median step multiplier
``exp(ln3 · tanh a)`` (bounds 1/3 and 3) and the mean gradient mix ``tanh b``. A meta-state
folder (``--state``, from ``zoo meta-train --state-dir``) replaces the checkpoint's weights
by the nets being meta-trained, to see what meta-training is doing before it is selected.

    OMP_NUM_THREADS=1 python benchmarks/step_multipliers.py CHECKPOINT --network big \\
        --data-root ../shared/data/mnist [--state DIR] [--steps 300] [--seed 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zoo import update_net  # noqa: E402
from zoo.checkpoint import load_checkpoint  # noqa: E402
from zoo.data import load_dataset  # noqa: E402
from zoo.train import Method, initial_network, markdown_table, train_run  # noqa: E402

PHASES = ((0, 20), (20, 100), (100, None))


def load_state_nets(pretrained, state: Path) -> None:
    """Put the nets of a meta-training state into ``pretrained``'s nets (same layout)."""
    from safetensors.torch import load_file

    tensors = load_file(str(state / "meta_state.safetensors"))
    for name, net in pretrained.nets.items():
        prefix = f"state.nets.{name}."
        weights = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not weights:
            raise SystemExit(f"{state}: no nets named {name!r}; give a state of this layout")
        net.load_state_dict(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--state", type=Path, help="meta-training state folder")
    parser.add_argument("--network", default="big")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-root")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args()

    pretrained = load_checkpoint(args.checkpoint)
    if args.state:
        load_state_nets(pretrained, args.state)
    records: dict[str, list[tuple[float, float, float]]] = {}
    names: dict[int, str] = {}
    original = update_net.UpdateNet.update

    def update(self, outputs, adam_dir, g_rms):
        multiplier = torch.exp(update_net.MULT_RANGE * torch.tanh(outputs[:, 0]))
        mix = torch.tanh(outputs[:, 1])
        records.setdefault(names.get(id(self), "?"), []).append(
            (multiplier.mean().item(), multiplier.median().item(), mix.mean().item())
        )
        return original(self, outputs, adam_dir, g_rms)

    def make(model):
        optimizer = pretrained.attach(model)
        names.update({id(net): name for name, net in optimizer.nets.items()})
        return optimizer

    data = load_dataset(args.dataset, args.data_root)
    model = initial_network(args.network, data, args.seed)
    method = Method(pretrained.name, make, needs_curvature=pretrained.features.uses_curvature)
    update_net.UpdateNet.update = update
    try:
        run = train_run(model, data, method, steps=args.steps, seed=args.seed)
    finally:
        update_net.UpdateNet.update = original
    if not records:
        raise SystemExit("no update was recorded (a fused update path bypasses UpdateNet)")
    rows = []
    for name, values in records.items():
        per_step = len(values) // args.steps  # one call per parameter tensor of the net
        for start, end in PHASES:
            part = values[start * per_step : None if end is None else end * per_step]
            if not part:
                continue
            means = [statistics.fmean(v[i] for v in part) for i in range(3)]
            rows.append([name, f"{start}-{end or args.steps}", *(f"{m:.3f}" for m in means)])
    source = f"{args.checkpoint}" + (f" with the nets of {args.state}" if args.state else "")
    print(f"{source}, {args.network} on {args.dataset}, seed {args.seed}")
    print(f"final training loss {run.train_loss[-1]:.4f}\n")
    header = ["net", "steps", "multiplier mean", "multiplier median", "mix mean"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
