import json

import pytest
import torch

from zoo.checkpoint import load_checkpoint, save_checkpoint
from zoo.errors import CheckpointError
from zoo.features import FeatureSpec

from .conftest import make_nets

CONFIG = {"name": "tiny", "source_network": {"name": "small", "dataset": "mnist"}}


def _save(path, features="gh"):
    nets = make_nets(features, perturb=0.05)
    save_checkpoint(path, nets, FeatureSpec(features), CONFIG, "# tiny\n")
    return nets


def test_round_trip_restores_every_tensor(tmp_path):
    nets = _save(tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck")
    assert sorted(loaded.nets) == ["conv", "fc"]
    for kind, net in nets.items():
        for (k, a), (k2, b) in zip(
            net.state_dict().items(), loaded.nets[kind].state_dict().items(), strict=True
        ):
            assert k == k2 and torch.equal(a, b)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["schema_version"] == 1
    assert config["features"]["names"] == ["g_rms", "m_fast", "m_slow", "h_rel", "h_trend"]
    assert list(config) == sorted(config)


def test_save_replaces_an_existing_checkpoint_and_leaves_no_temporaries(tmp_path):
    _save(tmp_path / "ck")
    _save(tmp_path / "ck", features="g")
    assert load_checkpoint(tmp_path / "ck").features.name == "g"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder, not a shipped name"):
        load_checkpoint(tmp_path / "nothing")


def test_git_lfs_pointer_is_named(tmp_path):
    _save(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"
    )
    with pytest.raises(CheckpointError, match="Git-LFS pointer"):
        load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("keep", [0, 10, 200])
def test_truncated_weights_are_refused(tmp_path, keep):
    _save(tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "ck")


def test_config_that_disagrees_with_the_tensors_is_refused(tmp_path):
    _save(tmp_path / "ck")
    config_path = tmp_path / "ck" / "config.json"
    config = json.loads(config_path.read_text())
    config["update_net"]["hidden_size"] = 16
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor 'conv.cells.0.weight_ih' is \(80, 5\)"):
        load_checkpoint(tmp_path / "ck")


def test_extra_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _save(tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    tensors = load_file(path)
    tensors["conv.sneaky"] = torch.zeros(1)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="does not describe: conv.sneaky"):
        load_checkpoint(tmp_path / "ck")


def test_feature_set_mismatch_is_refused(tmp_path):
    _save(tmp_path / "ck")
    config_path = tmp_path / "ck" / "config.json"
    config = json.loads(config_path.read_text())
    config["features"]["names"] = ["g_rms"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="is not the one this zoo implements"):
        load_checkpoint(tmp_path / "ck")


def test_unsupported_schema_version_is_refused(tmp_path):
    _save(tmp_path / "ck")
    config_path = tmp_path / "ck" / "config.json"
    config = json.loads(config_path.read_text())
    config["schema_version"] = 99
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="schema_version 99 is not supported"):
        load_checkpoint(tmp_path / "ck")


def test_attach_gives_independent_optimizers(tmp_path):
    _save(tmp_path / "ck")
    pretrained = load_checkpoint(tmp_path / "ck")
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    a, b = pretrained.attach(model), pretrained.attach(model)
    assert a.nets["fc"] is not b.nets["fc"]
    assert torch.equal(a.nets["fc"].head.weight, pretrained.nets["fc"].head.weight)


def test_edited_feature_constants_are_refused(tmp_path):
    _save(tmp_path / "ck")
    config_path = tmp_path / "ck" / "config.json"
    config = json.loads(config_path.read_text())
    config["features"]["constants"]["eps"] = float("nan")
    config_path.write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match="records constants that differ from this zoo's \\(eps;"
    ):
        load_checkpoint(tmp_path / "ck")
