"""Scale: any destination network, ImageNet folders, devices/precision, the fast update."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from tests.conftest import make_nets
from zoo import curvature
from zoo.checkpoint import save_checkpoint
from zoo.data import ImageFolderData, load_dataset
from zoo.errors import ConfigError, UnknownNameError
from zoo.fast_update import FusedUpdateNet, UpdateOptions
from zoo.features import FeatureSpec
from zoo.layer_kinds import assign
from zoo.networks import build_network, get_network
from zoo.optimizer import LearnedOptimizer
from zoo.train import LossScaler, Method, adam, resolve_device, train_run
from zoo.update_net import UpdateNet

SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "imagenet-samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared ImageNet samples absent")


def tiny_factory(input_shape, num_classes):
    """A user factory (``tests.test_scale:tiny_factory``): conv, BatchNorm, pool, fc."""
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 4, 3, stride=4),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )


# ---------------------------------------------------------------------- networks


def test_torchvision_models_build_untrained_with_the_datasets_classes_and_route_by_kind():
    net = build_network("resnet18", (3, 224, 224), num_classes=1000)
    assert net.fc.out_features == 1000
    routes = {}
    for a in assign(net, ("conv", "fc"), "adam"):
        routes[a.kind] = routes.get(a.kind, 0) + 1
    assert routes == {"conv": 20, "fc": 2, "other": 40}  # BatchNorm weights and biases


def test_a_user_factory_is_called_with_the_arguments_it_accepts():
    net = build_network("tests.test_scale:tiny_factory", (3, 32, 32), num_classes=7)
    assert net[-1].out_features == 7


def test_unknown_networks_list_the_known_ones():
    with pytest.raises(UnknownNameError, match="known networks: big, small.*resnet18"):
        get_network("resnet1800")
    with pytest.raises(UnknownNameError, match="cannot load network factory"):
        get_network("no_such_package.mod:fn")


def test_torchvision_models_refuse_single_channel_input_with_what_to_do():
    with pytest.raises(ConfigError, match="3-channel"):
        build_network("resnet18", (1, 28, 28))


# ---------------------------------------------------------------------- ImageNet data


@needs_samples
def test_imagenet_samples_load_with_imagenet_labels_and_say_how_the_missing_split_is_used():
    data = load_dataset("imagenet", SAMPLES)
    assert isinstance(data, ImageFolderData)
    assert data.num_classes == 1000 and data.input_shape == (3, 224, 224)
    assert "no train/" in data.source and "smoke test" in data.source
    x, y = next(iter(data.loader("eval", 4, 0, workers=0)))
    assert x.shape == (4, 3, 224, 224)
    assert y.tolist() == [22, 99, 129, 243]  # the folder names are ImageNet-1k indices


@needs_samples
def test_training_batches_are_fixed_by_the_seed_and_differ_across_ranks():
    data = load_dataset("imagenet", SAMPLES)
    labels = [
        next(iter(data.loader("train", 6, seed, rank=rank, workers=0)))[1].tolist()
        for seed, rank in ((0, 0), (0, 0), (0, 1))
    ]
    assert labels[0] == labels[1] and labels[0] != labels[2]


def test_a_missing_imagenet_root_is_a_clear_error(tmp_path):
    from zoo.errors import DataError

    with pytest.raises(DataError, match="train/ and/or"):
        load_dataset("imagenet", tmp_path)


@needs_samples
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_loop_trains_from_a_multi_worker_imagefolder_loader(precision):
    data = load_dataset("imagenet", SAMPLES)
    data.workers = 2
    torch.manual_seed(0)
    model = build_network("tests.test_scale:tiny_factory", data.input_shape, data.num_classes)
    nets, spec = make_nets("gh", perturb=0.05), FeatureSpec("gh")
    method = Method("zoo", lambda m: LearnedOptimizer(m, nets, spec), needs_curvature=True)
    record = train_run(
        model, data, method, steps=2, seed=0, batch_size=4, device="cpu", precision=precision
    )
    assert record.steps == [0, 1, 2] and all(torch.isfinite(torch.tensor(record.train_loss)))


# ---------------------------------------------------------------------- devices, precision


def test_device_auto_detects_and_a_missing_cuda_is_an_error():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def _model_and_batch(seed: int = 0):
    torch.manual_seed(seed)
    model = build_network("small", (1, 12, 12), 4)
    gen = torch.Generator().manual_seed(seed)
    return (
        model,
        torch.randn(16, 1, 12, 12, generator=gen),
        torch.randint(0, 4, (16,), generator=gen),
    )


def test_a_scaled_loss_is_unscaled_in_both_the_gradient_and_the_second_derivative():
    model, x, y = _model_and_batch()
    twin = copy.deepcopy(model)
    nets = make_nets("gh", perturb=0.3)
    plain = LearnedOptimizer(model, nets, FeatureSpec("gh"))
    scaled = LearnedOptimizer(twin, copy.deepcopy(nets), FeatureSpec("gh"))
    for _ in range(3):
        plain.zero_grad()
        scaled.zero_grad()
        curvature.backward(model, x, y)
        curvature.backward(twin, x, y, loss_scale=2.0**12)
        assert torch.allclose(
            twin.conv1.weight.hessian_diag, 2.0**12 * model.conv1.weight.hessian_diag, rtol=1e-5
        )
        scaled.loss_scale = 2.0**12
        plain.step()
        scaled.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_the_loss_scaler_backs_off_on_inf_and_grows_after_clean_steps():
    scaler = LossScaler(scale=8.0, growth_interval=2)
    scaler.update(found_inf=True)
    assert scaler.scale == 4.0 and scaler.skipped == 1
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 8.0
    assert LossScaler(enabled=False).scale == 1.0


def test_fp16_training_skips_the_overflowing_steps_and_still_learns(tiny_data):
    torch.manual_seed(0)
    model = build_network("small", tiny_data.input_shape, tiny_data.num_classes)
    record = train_run(
        model, tiny_data, adam(3e-3), steps=12, seed=0, batch_size=32, precision="fp16"
    )
    assert record.train_loss[-1] < record.train_loss[0]


# ---------------------------------------------------------------------- fast update


def _perturbed(features: int = 5) -> UpdateNet:
    torch.manual_seed(1)
    net = UpdateNet(features)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_the_fused_chunked_cell_matches_the_lstm_cells(chunk):
    net = _perturbed()
    feats, state = torch.randn(100, 5), 0.5 * torch.randn(100, net.state_size)
    with torch.no_grad():
        expected_out, expected_state = net(feats, state)
    fused_state = state.clone()
    out = FusedUpdateNet(net, chunk)(feats, fused_state)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_state, expected_state, rtol=1e-5, atol=1e-6)


def _train(options: UpdateOptions, steps: int = 5) -> tuple[nn.Module, LearnedOptimizer]:
    model, _, _ = _model_and_batch()
    opt = LearnedOptimizer(model, make_nets("gh", perturb=0.3), FeatureSpec("gh"), options=options)
    for step in range(steps):
        _, x, y = _model_and_batch(step)
        opt.zero_grad()
        if opt.wants_curvature():
            curvature.backward(model, x, y)
        else:
            torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def test_the_fused_path_takes_the_same_steps_as_the_one_shot_path():
    reference, _ = _train(UpdateOptions())
    fused, _ = _train(UpdateOptions(chunk_size=37))
    for p, q in zip(reference.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bf16_lstm_state_halves_the_state_and_stays_close():
    reference, ref_opt = _train(UpdateOptions())
    model, opt = _train(UpdateOptions(chunk_size=64, state_dtype=torch.bfloat16))
    assert all(ks.lstm.dtype == torch.bfloat16 for ks in opt._kinds.values())
    assert opt.state_dict()["state"]["conv1.weight"]["lstm"].dtype == torch.bfloat16
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        assert (p - q).abs().max() < 1e-3


def test_hessian_every_k_asks_for_curvature_every_k_steps_and_reuses_it():
    model, opt = _train(UpdateOptions(hessian_every=3), steps=0)
    asked = []
    for step in range(7):
        _, x, y = _model_and_batch(step)
        opt.zero_grad()
        asked.append(opt.wants_curvature())
        if asked[-1]:
            curvature.backward(model, x, y)
        else:
            torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert asked == [True, False, False, True, False, False, True]


def test_update_options_are_validated():
    with pytest.raises(ConfigError, match="chunk_size"):
        UpdateOptions(chunk_size=0)
    with pytest.raises(ConfigError, match="hessian_every"):
        UpdateOptions(hessian_every=0)
    with pytest.raises(ConfigError, match="state_dtype"):
        UpdateOptions(state_dtype=torch.float16)


# ---------------------------------------------------------------------- CLI


@needs_samples
def test_transfer_runs_end_to_end_on_the_imagenet_samples(tmp_path):
    from cli import main

    checkpoint = tmp_path / "ck"
    config = {"name": "tiny", "source_network": {"name": "small", "dataset": "mnist"}}
    save_checkpoint(checkpoint, make_nets("gh", perturb=0.05), FeatureSpec("gh"), config, "#\n")
    args = [
        "transfer", "--src", str(checkpoint), "--dst", "tests.test_scale:tiny_factory",
        "--dataset", "imagenet", "--data-root", str(SAMPLES), "--steps", "1", "--seeds", "1",
        "--adam-grid", "1e-3", "--batch-size", "4", "--workers", "0", "--chunk-size", "64",
        "--lstm-state", "bf16", "--hessian-every", "2", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "per layer kind: conv: 2 tensors" in result.output
    assert "no train/" in result.output
