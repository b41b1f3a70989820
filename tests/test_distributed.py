"""Two gloo ranks on CPU take identical learned steps from different batches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zoo import curvature, distributed
from zoo.errors import ConfigError
from zoo.fast_update import UpdateOptions
from zoo.features import FeatureSpec
from zoo.networks import build_network
from zoo.optimizer import LearnedOptimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_nets  # noqa: E402

STEPS = 5


def _snapshot(model, opt) -> torch.Tensor:
    """Parameters, feature state and LSTM state of every kind, as one flat tensor."""
    parts = [p.detach().reshape(-1).float() for p in model.parameters()]
    for ks in opt._kinds.values():
        parts += [t.reshape(-1).float() for t in ks.features]
        parts.append(ks.lstm.reshape(-1).float())
    return torch.cat(parts)


def _worker(rank: int, rendezvous: str, options: UpdateOptions, out: str) -> None:
    torch.set_num_threads(1)
    # A file rendezvous: no port to pick, so no race with other processes for it.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # different inits on purpose: broadcast must fix them
        model = build_network("small", (1, 12, 12), 4)
        distributed.broadcast_module(model)
        opt = LearnedOptimizer(
            model, make_nets("gh", perturb=0.3), FeatureSpec("gh"), options=options
        )
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
        report = []
        for _ in range(STEPS):
            x, y = (
                torch.randn(16, 1, 12, 12, generator=gen),
                torch.randint(0, 4, (16,), generator=gen),
            )
            opt.zero_grad()
            curvature.backward(model, x, y)
            local = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            opt.step()
            mine = _snapshot(model, opt)
            gathered = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(gathered, mine)
            grads = [torch.empty_like(local) for _ in range(2)]
            dist.all_gather(grads, local)
            report.append(
                (torch.equal(gathered[0], gathered[1]), not torch.equal(grads[0], grads[1]))
            )
        if rank == 0:
            torch.save(report, out)
        dist.barrier()  # both ranks leave together: tearing gloo down mid-peer aborted once
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "options",
    [UpdateOptions(), UpdateOptions(chunk_size=512, state_dtype=torch.bfloat16)],
    ids=["one-shot", "fused-bf16"],
)
def test_two_ranks_hold_bitwise_equal_parameters_and_lstm_state_after_every_step(tmp_path, options):
    out = tmp_path / "report.pt"
    rendezvous = str(tmp_path / "rendezvous")
    mp.spawn(_worker, args=(rendezvous, options, str(out)), nprocs=2, join=True)
    report = torch.load(out, weights_only=True)
    assert len(report) == STEPS
    for step, (equal, batches_differ) in enumerate(report, 1):
        assert batches_differ, f"step {step}: the ranks saw the same gradient"
        assert equal, f"step {step}: parameters or optimizer state differ across ranks"


def test_wrapped_and_sharded_models_are_refused_with_the_reason():
    from torch.nn.parallel import DistributedDataParallel

    model = build_network("small", (1, 12, 12), 4)
    assert distributed.refuse_wrapped(model) is model
    fake = DistributedDataParallel.__new__(DistributedDataParallel)
    with pytest.raises(ConfigError, match="bare module"):
        distributed.refuse_wrapped(fake)


def test_outside_a_process_group_averaging_is_a_no_op():
    g, h = torch.randn(5), torch.rand(5)
    assert distributed.average_gradients(g, h) == (g, h)
    assert distributed.world_size() == 1 and distributed.rank() == 0
