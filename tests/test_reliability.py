"""Faults and awkward inputs: saves killed mid-write, full disks, resume, NaN, odd parameters.

The fault tests count what they injected into ``FAULTS`` (written to
``$ZOO_RELIABILITY_COUNTS`` when set, for docs/reliability.md).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo import curvature, safe_io
from zoo.checkpoint import (
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    save_training_state,
)
from zoo.errors import CheckpointError, ConfigError, NonFiniteError
from zoo.features import FeatureSpec, init_state
from zoo.layer_kinds import report
from zoo.meta import meta_train, parse_recipe
from zoo.optimizer import KindLayout, LearnedOptimizer, learned_step
from zoo.safe_io import file_digest, folder_digest

from .conftest import make_nets

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"name": "fault", "source_network": {"name": "small", "dataset": "mnist"}}
FAULTS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _write_counts():
    yield
    target = os.environ.get("ZOO_RELIABILITY_COUNTS")
    if target:
        path = Path(target)
        old = json.loads(path.read_text()) if path.is_file() else {}
        old.update(FAULTS)
        path.write_text(json.dumps(old, indent=2, sort_keys=True))


def _variant(i: int) -> dict:
    return make_nets("gh", seed=i % 4, perturb=0.05)


def _save(path: Path, i: int) -> None:
    save_checkpoint(path, _variant(i), FeatureSpec("gh"), {**CONFIG, "variant": i % 4}, "# c\n")


@pytest.fixture(scope="module")
def digests(tmp_path_factory) -> dict[int, str]:
    """The digest of a complete checkpoint of each content variant."""
    root = tmp_path_factory.mktemp("variants")
    result = {}
    for i in range(4):
        _save(root / f"v{i}", i)
        result[i] = folder_digest(root / f"v{i}")
    return result


def _leftovers(parent: Path, name: str = "ck") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ---------------------------------------------------------------------- killed saves


def _killed_child(target: Path, variant: int, kill_at: int) -> bool:
    """Fork a child that saves ``variant`` over ``target`` and SIGKILLs itself at the
    ``kill_at``-th file-system step; True when it was killed (False: it finished)."""
    pid = os.fork()
    if pid == 0:  # child: no pytest teardown, no buffered output, just die or exit
        counter = [0]

        def hook(label):
            counter[0] += 1
            if counter[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        safe_io.fault_hook = hook
        try:
            _save(target, variant)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_save_killed_at_every_step_leaves_the_last_good_checkpoint(
    tmp_path, digests, monkeypatch, exchange
):
    if not exchange:
        monkeypatch.setenv("ZOO_NO_RENAME_EXCHANGE", "1")
    target = tmp_path / "ck"
    _save(target, 0)
    good = 0
    for kill_at in range(1, 200):
        new = good + 1
        killed = _killed_child(target, new, kill_at)
        FAULTS["sigkill at a save step"] += killed
        loaded = load_checkpoint(target)  # repairs what the kill left, then loads strictly
        digest = folder_digest(target)
        # Killed before the swap: the old checkpoint; after it: the new one. Never a mix.
        assert digest in (digests[good % 4], digests[new % 4]), kill_at
        assert loaded.config["variant"] == (good if digest == digests[good % 4] else new) % 4
        good = loaded.config["variant"]
        if not killed:
            break
    else:
        pytest.fail("the save never finished")
    assert kill_at > 8  # the hook saw every step: mkdir, open/write/fsync x3, swap, ...
    _save(target, good + 1)  # the next save cleans up every leftover of the killed ones
    assert _leftovers(tmp_path) == []


def test_saves_killed_at_random_moments_by_another_process(tmp_path, digests):
    """A child saves in a loop; the parent SIGKILLs it at random times, again and again."""
    target = tmp_path / "ck"
    _save(target, 0)
    log = tmp_path / "log"
    rng = random.Random(7)
    good = 0
    for _ in range(25):
        pid = os.fork()
        if pid == 0:
            try:
                i = good
                while True:
                    i += 1
                    with open(log, "a") as handle:
                        handle.write(f"begin {i}\n")
                    _save(target, i)
                    with open(log, "a") as handle:
                        handle.write(f"done {i}\n")
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        FAULTS["sigkill at a random moment"] += 1
        lines = log.read_text().split() if log.exists() else []
        done = [int(n) for w, n in zip(lines[::2], lines[1::2], strict=True) if w == "done"]
        last_done = done[-1] if done else good
        loaded = load_checkpoint(target)
        digest = folder_digest(target)
        assert digest in (digests[last_done % 4], digests[(last_done + 1) % 4])
        good = loaded.config["variant"] if digest != digests[last_done % 4] else last_done % 4
        good = last_done + (digest != digests[last_done % 4])
        log.unlink(missing_ok=True)
    _save(target, good + 1)
    assert _leftovers(tmp_path) == []


def test_a_fresh_interpreter_killed_while_saving_in_a_loop(tmp_path, digests):
    target = tmp_path / "ck"
    _save(target, 0)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_reliability import _save
        from pathlib import Path
        i = 0
        print("ready", flush=True)
        while True:
            i += 1
            _save(Path({str(target)!r}), i)
            print("done", i, flush=True)
        """
    )
    for attempt in range(2):
        child = subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert child.stdout.readline().strip() == "ready"
        child.stdout.readline()  # at least one save done, then kill mid-loop
        time.sleep(0.013 * (attempt + 1))
        child.send_signal(signal.SIGKILL)
        child.wait()
        FAULTS["sigkill of a separate interpreter"] += 1
        load_checkpoint(target)
        assert folder_digest(target) in digests.values()
    _save(target, 1)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_full_disk_at_every_step_keeps_the_old_checkpoint(
    tmp_path, digests, monkeypatch, exchange
):
    if not exchange:
        monkeypatch.setenv("ZOO_NO_RENAME_EXCHANGE", "1")
    target = tmp_path / "ck"
    _save(target, 0)
    for fail_at in range(1, 200):
        counter = [0]

        def hook(label, fail_at=fail_at, counter=counter):
            counter[0] += 1
            if counter[0] == fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(safe_io, "fault_hook", hook)
        try:
            _save(target, 1)
        except CheckpointError as error:
            FAULTS["disk full (ENOSPC) at a save step"] += 1
            assert "the disk is full" in str(error)
            assert folder_digest(target) == digests[0]
            assert _leftovers(tmp_path) == []
            continue
        finally:
            monkeypatch.setattr(safe_io, "fault_hook", None)
        # No error: the fault fell after the commit (a warning) or past the last step.
        assert folder_digest(target) == digests[1]
        if counter[0] < fail_at:
            break  # the save finished before the fault point: every point was covered
        FAULTS["disk full (ENOSPC) after the commit"] += 1
        _save(target, 0)
    assert fail_at > 8


def test_atomic_file_write_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    safe_io.atomic_write_text(path, '{"old": true}')

    def full(label):
        if label == "write":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safe_io, "fault_hook", full)
    with pytest.raises(CheckpointError, match="disk is full"):
        safe_io.atomic_write_text(path, '{"new": true}')
    FAULTS["disk full (ENOSPC) at a results write"] += 1
    assert path.read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_leftovers_of_dead_processes_are_repaired_and_cleaned(tmp_path, digests):
    target = tmp_path / "ck"
    _save(target, 2)
    dead = 2**22 + 12345  # above the default pid_max of most systems: never alive
    os.rename(target, tmp_path / f".ck.old-{dead}-00ab")  # killed between the two renames
    (tmp_path / f".ck.tmp-{dead}-00cd").mkdir()  # a half-written staging folder
    (tmp_path / f".ck.tmp-{dead}-00cd" / "model.safetensors").write_bytes(b"\0" * 10)
    assert load_checkpoint(target).config["variant"] == 2
    assert folder_digest(target) == digests[2]
    assert _leftovers(tmp_path) == []
    mine = tmp_path / f".ck.tmp-{os.getpid()}-00ef"  # a live process's: left alone
    mine.mkdir()
    _save(target, 3)
    assert _leftovers(tmp_path) == [mine.name]


def test_saving_nan_weights_is_refused_and_the_old_checkpoint_kept(tmp_path, digests):
    _save(tmp_path / "ck", 1)
    nets = make_nets()
    with torch.no_grad():
        nets["fc"].head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        save_checkpoint(tmp_path / "ck", nets, FeatureSpec("gh"), CONFIG, "")
    assert folder_digest(tmp_path / "ck") == digests[1]


def test_an_unwritable_folder_is_a_checkpoint_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="no permission"):
            _save(locked / "ck", 0)
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------------- resume


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 6),
        nn.BatchNorm1d(6),
        nn.Linear(6, 4),
    )


def _batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 1, 12, 12, generator=g), torch.randint(0, 4, (8,), generator=g)


def _train(model, opt, start, steps):
    for step in range(start, start + steps):
        opt.zero_grad()
        curvature.backward(model, *_batch(step))
        opt.step()


@pytest.mark.parametrize("policy", ["adam", {"norm": "sgd"}], ids=["adam", "sgd"])
def test_training_resumes_bitwise_from_its_own_checkpoint(tmp_path, policy):
    nets = make_nets(perturb=0.1)
    spec = FeatureSpec("gh")
    a = _model()
    opt_a = LearnedOptimizer(a, copy.deepcopy(nets), spec, other=policy)
    _train(a, opt_a, 0, 6)

    b = _model()
    opt_b = LearnedOptimizer(b, copy.deepcopy(nets), spec, other=policy)
    _train(b, opt_b, 0, 3)
    save_training_state(tmp_path / "run", b, opt_b, step=3, extra={"note": "half"})
    c = _model()
    opt_c = LearnedOptimizer(c, copy.deepcopy(nets), spec, other=policy)
    resumed = load_training_state(tmp_path / "run", c, opt_c)
    assert resumed == {"step": 3, "extra": {"note": "half"}}
    _train(c, opt_c, 3, 3)
    for (name, pa), pc in zip(a.named_parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pc), name
    for name, entry in opt_a.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, opt_c.state_dict()["state"][name][key]), (name, key)


def test_training_state_for_another_model_is_refused_by_name(tmp_path):
    model = _model()
    opt = LearnedOptimizer(model, make_nets(), FeatureSpec("gh"))
    save_training_state(tmp_path / "run", model, opt, step=1)
    other = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(300, 4))
    other_opt = LearnedOptimizer(other, make_nets(), FeatureSpec("gh"))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(CheckpointError, match=r"missing \['3.bias', '3.weight'\]"):
        load_training_state(tmp_path / "run", other, other_opt)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


TINY = {
    "name": "tiny",
    "task": {"network": "small", "batch_size": 16, "widths": [0.5, 1.0], "init_scale": [0.7, 1.4]},
    "update_net": {"features": "gh", "init_lr": 0.002},
    "meta": {"iterations": 4, "horizon": 2, "unroll": 1, "meta_lr": 0.01, "validate_every": 2},
    "validation": [{"network": "small", "steps": 1, "seeds": [7]}],
}


def _recipe(**meta):
    raw = copy.deepcopy(TINY)
    raw["meta"].update(meta)
    return parse_recipe(raw)


def test_meta_training_resumes_bitwise(tiny_data, tmp_path):
    full = meta_train(_recipe(), tiny_data, state_dir=tmp_path / "a", save_every=2)
    meta_train(_recipe(iterations=2), tiny_data, state_dir=tmp_path / "b", save_every=2)
    resumed = meta_train(_recipe(), tiny_data, state_dir=tmp_path / "b", save_every=2, resume=True)
    assert resumed.history == full.history and resumed.validation == full.validation
    for kind, net in full.nets.items():
        for (k, v), w in zip(
            net.state_dict().items(), resumed.nets[kind].state_dict().values(), strict=True
        ):
            assert torch.equal(v, w), (kind, k)
    # The state after iteration 4 is byte-identical, uninterrupted or resumed.
    a, b = (json.loads((tmp_path / x / "meta_state.json").read_text()) for x in "ab")
    assert a == b
    for name in ("meta_state.json", "meta_state.safetensors"):  # not sessions.json (times)
        assert file_digest(tmp_path / "a" / name) == file_digest(tmp_path / "b" / name)


def test_meta_resume_refuses_another_recipe_and_a_missing_state(tiny_data, tmp_path):
    meta_train(_recipe(iterations=3), tiny_data, state_dir=tmp_path / "s", save_every=3)
    with pytest.raises(ConfigError, match="differs in meta.meta_lr"):
        meta_train(_recipe(meta_lr=0.5), tiny_data, state_dir=tmp_path / "s", resume=True)
    with pytest.raises(CheckpointError, match="no meta-training state to resume"):
        meta_train(_recipe(), tiny_data, state_dir=tmp_path / "none", resume=True)


def test_non_finite_meta_training_stops_names_where_and_keeps_the_last_good_state(
    tiny_data, tmp_path, monkeypatch
):
    import zoo.meta

    real = zoo.meta.curvature_pass
    calls = [0]

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] > poison_after:
            name = next(n for n in result.hessian_diag if n.startswith("fc"))
            result.hessian_diag[name] = torch.full_like(result.hessian_diag[name], float("inf"))
        return result

    poison_after = 10**9
    monkeypatch.setattr(zoo.meta, "curvature_pass", poisoned)
    meta_train(_recipe(iterations=3), tiny_data, state_dir=tmp_path / "s", save_every=3)
    kept = folder_digest(tmp_path / "s")
    poison_after = calls[0] + 3  # goes bad within the first resumed iteration's unroll
    with pytest.raises(NonFiniteError) as raised:
        meta_train(
            _recipe(iterations=12), tiny_data, state_dir=tmp_path / "s", save_every=50, resume=True
        )
    message = str(raised.value)
    assert "fc net's input feature h_rel" in message and "fc1.weight" in message
    assert "the last good state (iteration 3) is kept" in message
    assert folder_digest(tmp_path / "s") == kept
    FAULTS["non-finite meta-training injected"] += 1


def test_zero_second_derivatives_give_finite_updates_and_meta_gradients():
    spec = FeatureSpec("gh")
    net = make_nets(perturb=0.3)["fc"]
    net.requires_grad_(True)
    layout = KindLayout.build(["w", "b", "dead"], [6, 3, 4])
    features, lstm = init_state(13), net.init_state(13)
    total = 0.0
    for step in range(4):
        g = torch.randn(13, generator=torch.Generator().manual_seed(step))
        g[9:] = 0.0  # a dead unit: zero gradient and zero curvature
        h = torch.zeros(13) if step % 2 == 0 else torch.rand(13) * (torch.arange(13) < 6)
        update, features, lstm = learned_step(net, spec, features, lstm, g, h, layout)
        assert torch.isfinite(update).all()
        total = total + (update**2).sum() + lstm.sum()
    total.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ---------------------------------------------------------------------- awkward parameters


def test_zero_element_parameters_are_no_ops():
    def model(extra: bool):
        torch.manual_seed(0)
        layers = [nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)]
        m = nn.Sequential(*layers)
        if extra:
            m.add_module("empty", nn.Linear(4, 0))  # weight (0, 4), bias (0,)
        return m

    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    plain, padded = model(False), model(True)
    outs = []
    for m in (plain, padded):
        opt = LearnedOptimizer(m, make_nets("g", perturb=0.1), FeatureSpec("g"))
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(m[:3](x), y)
            if len(m) > 3:
                loss = loss + m.empty(x).sum()  # gives the empty tensors (empty) gradients
            loss.backward()
            opt.step()
        outs.append([p.detach().clone() for p in m[:3].parameters()])
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_get_fp32_state_and_keep_their_dtype(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(dtype)
    opt = LearnedOptimizer(model, make_nets("g", perturb=0.1), FeatureSpec("g"))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(6, 4).to(dtype), torch.randint(0, 2, (6,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()
    assert all(p.dtype == dtype for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    state = opt.state_dict()["state"]
    assert all(t.dtype == torch.float32 for entry in state.values() for t in entry.values())
    assert opt.skipped_steps == 0


def test_sparse_gradients_are_refused_before_anything_moves():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 2))
    opt = LearnedOptimizer(model, make_nets("g"), FeatureSpec("g"))
    before = copy.deepcopy(model.state_dict())
    F.cross_entropy(model(torch.tensor([[1, 2], [3, 4]])), torch.tensor([0, 1])).backward()
    with pytest.raises(ConfigError, match=r"0.weight has a sparse gradient.*sparse=False"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_one_net_over_several_devices_is_refused_clearly():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2, device="meta"))
    with pytest.raises(ConfigError, match=r"fc update net's parameters are on several devices"):
        LearnedOptimizer(model, make_nets("g"), FeatureSpec("g"))
    # Route the odd one to a baseline instead: Adam takes any device.
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3, device="meta"))
    LearnedOptimizer(model, make_nets("g"), FeatureSpec("g"))


def test_frozen_parameters_are_skipped_under_every_policy():
    model = _model()
    opt = LearnedOptimizer(model, make_nets(), FeatureSpec("gh"), other={"norm": "sgd"})
    model[0].bias.requires_grad_(False)  # frozen after attach: skipped, state kept
    model[5].bias.requires_grad_(False)  # a baseline's frozen parameter: SGD skips it too
    frozen = (model[0].bias.clone(), model[5].bias.clone())
    _train(model, opt, 0, 2)
    assert torch.equal(model[0].bias, frozen[0]) and torch.equal(model[5].bias, frozen[1])
    assert opt.state_dict()["state"]["0.bias"]["step"].eq(0).all()


class _Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.seq = nn.Conv1d(4, 4, 3)
        self.up = nn.ConvTranspose2d(1, 1, 2)
        self.norm = nn.BatchNorm2d(1)
        self.conv = nn.Conv2d(1, 1, 3)
        self.head = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(1))


def test_layer_kinds_beyond_conv_and_fc_follow_a_documented_policy():
    opt = LearnedOptimizer(_Zoo(), make_nets("g"), FeatureSpec("g"))
    routes = {a.name: (a.family, a.route) for a in opt.assignments}
    assert routes["embed.weight"] == ("embedding", "adam")
    assert routes["seq.weight"] == ("conv1d", "conv")
    assert routes["up.weight"] == ("conv_transpose", "adam")
    assert routes["norm.weight"] == ("norm", "adam")
    assert routes["conv.weight"] == ("conv", "conv") and routes["head.bias"] == ("fc", "fc")
    assert routes["scale"] == ("parameter", "adam")
    policy = {"embedding": "sgd", "conv_transpose": "conv", "norm": "fc", "conv1d": "adam"}
    opt = LearnedOptimizer(_Zoo(), make_nets("g"), FeatureSpec("g"), other=policy)
    routes = {a.name: a.route for a in opt.assignments}
    assert routes["embed.weight"] == "sgd" and routes["up.bias"] == "conv"
    assert (
        routes["norm.bias"] == "fc" and routes["seq.bias"] == "adam" and routes["scale"] == "adam"
    )
    text = report(opt.assignments)
    assert "embed.weight" in text and "embedding" in text and "sgd (baseline)" in text
    with pytest.raises(ConfigError, match=r"unknown layer family attention in other="):
        LearnedOptimizer(_Zoo(), make_nets("g"), FeatureSpec("g"), other={"attention": "adam"})
    with pytest.raises(ConfigError, match=r"unknown policy other\['norm'\]='lbfgs'"):
        LearnedOptimizer(_Zoo(), make_nets("g"), FeatureSpec("g"), other={"norm": "lbfgs"})
    with pytest.raises(ConfigError, match=r"no update net for 1 parameter\(s\) \(scale\)"):
        LearnedOptimizer(
            _Zoo(),
            make_nets("g"),
            FeatureSpec("g"),
            other={
                "default": "error",
                "norm": "adam",
                "embedding": "adam",
                "conv_transpose": "adam",
            },
        )


def test_non_finite_steps_are_skipped_and_counted():
    model = _model()
    opt = LearnedOptimizer(model, make_nets(), FeatureSpec("gh"))
    _train(model, opt, 0, 1)
    params = {k: v.clone() for k, v in model.named_parameters()}
    state = copy.deepcopy(opt.state_dict())
    x, y = _batch(1)
    x[0, 0, 0, 0] = float("nan")
    opt.zero_grad()
    curvature.backward(model, x, y)
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    for name, entry in opt.state_dict()["state"].items():
        assert all(torch.equal(v, state["state"][name][k]) for k, v in entry.items())


# ---------------------------------------------------------------------- CLI edge


def test_meta_train_cli_resumes_and_validates_its_new_options(mnist_root, tmp_path):
    from click.testing import CliRunner

    from cli import main

    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'name = "cli-tiny"\n[task]\nbatch_size = 16\n'
        "[meta]\niterations = 2\nhorizon = 4\nunroll = 1\nvalidate_every = 2\n"
        '[[validation]]\nnetwork = "small"\nsteps = 1\nseeds = [5]\n'
    )
    out = tmp_path / "ck"
    args = ["meta-train", str(recipe), "--out", str(out), "--data-root", str(mnist_root)]
    first = CliRunner().invoke(main, [*args, "--save-every", "2"])
    assert first.exit_code == 0, first.output
    assert "skipped non-finite meta-iterations: 0" in first.output
    assert (tmp_path / "ck.meta-state" / "meta_state.json").is_file()
    again = CliRunner().invoke(main, [*args, "--resume", "--iterations", "3"])
    assert again.exit_code == 0, again.output
    bad = CliRunner().invoke(main, [*args, "--save-every", "-1"])
    assert bad.exit_code == 2 and "-1 is not in the range x>=0" in bad.output
    missing = CliRunner().invoke(main, [*args, "--resume", "--state-dir", str(tmp_path / "no")])
    assert missing.exit_code == 1 and "no meta-training state to resume" in missing.output
