import pytest
import torch

from zoo.data import batch_sampler, load_dataset
from zoo.errors import DataError, UnknownNameError


def test_real_mnist_loads_in_torchvision_layout(mnist_root):
    data = load_dataset("mnist", mnist_root)
    assert data.train_x.shape == (10_000, 1, 28, 28)
    assert data.test_x.shape == (10_000, 1, 28, 28)
    assert data.train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert data.test_y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert abs(data.train_x.mean().item()) < 0.05  # normalised
    assert "10,000 train" in data.source


def test_offline_fallback_is_real_labelled_digits(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    monkeypatch.delenv("ZOO_DATA", raising=False)
    data = load_dataset("mnist")
    assert "offline fallback" in data.source
    assert len(data.train_y) == 4000 and len(data.test_y) == 1000
    assert torch.bincount(data.test_y).tolist() == [100] * 10


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        load_dataset("mnist", tmp_path / "missing")
    with pytest.raises(DataError, match="no MNIST under"):
        load_dataset("mnist", tmp_path)


def test_truncated_idx_file_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    header = bytes([0, 0, 8, 3]) + (100).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (raw / "train-images-idx3-ubyte").write_bytes(header + bytes(10))
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(header)
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", tmp_path)


def test_unknown_dataset_lists_known():
    with pytest.raises(UnknownNameError, match="known datasets: mnist, cifar10"):
        load_dataset("svhn")


def test_batches_depend_only_on_seed_and_step(tiny_data):
    a, b = batch_sampler(tiny_data, 16, seed=3), batch_sampler(tiny_data, 16, seed=3)
    xa, ya = a(5)
    b(7)
    xb, yb = b(5)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a(6)[0], xa)


def _idx_bytes(*dims: int, body: bytes | None = None) -> bytes:
    header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    size = 1
    for d in dims:
        size *= d
    return header + (body if body is not None else bytes(size))


def test_out_of_range_mnist_labels_name_the_file(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(_idx_bytes(4, 28, 28))
    (raw / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(2, 28, 28))
    (raw / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(4, body=bytes([1, 2, 3, 4])))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(2, body=bytes([7, 200])))
    with pytest.raises(
        DataError,
        match=r"t10k-labels-idx1-ubyte is not an MNIST label file: "
        r"labels must be digits 0..9, found \[200\]",
    ):
        load_dataset("mnist", tmp_path)
