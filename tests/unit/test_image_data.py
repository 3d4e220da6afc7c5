"""Offline image data sets: shapes, ranges, labels, disjoint splits, and the one-line hint when one is missing."""

import pytest
import torch

from splitveil.core.errors import ConfigError
from splitveil.data.images import DATASETS, load_dataset, split_dataset


def test_digits_are_8x8_in_unit_range():
    data = load_dataset("digits")
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == torch.float32
    assert 0 <= float(data.images.min()) and float(data.images.max()) == 1.0
    assert data.labels.dtype == torch.int64 and data.num_classes == 10


def test_lfw_subset_is_labelled_face_or_not():
    data = load_dataset("lfw")
    assert data.images.shape == (200, 1, 25, 25) and data.num_classes == 2
    assert int(data.labels.sum()) == 100


def test_splits_are_disjoint_and_seeded():
    data = load_dataset("digits")
    data = type(data)(data.name, torch.arange(len(data), dtype=torch.float32).view(-1, 1, 1, 1), data.labels, 10)
    splits = split_dataset(data, train=800, aux=700, test=200, seed=3)
    ids = [set(part.images.flatten().tolist()) for part in (splits.train, splits.aux, splits.test)]
    assert [len(i) for i in ids] == [800, 700, 200]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    again = split_dataset(data, train=800, aux=700, test=200, seed=3)
    assert torch.equal(again.test.images, splits.test.images)
    with pytest.raises(ConfigError, match="cannot take"):
        split_dataset(data, train=1500, aux=500, test=10)


def test_missing_fashion_mnist_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("SPLITVEIL_FASHION_MNIST", str(tmp_path))
    with pytest.raises(ConfigError, match="make data.*dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known: digits, fashion-mnist, lfw, mnist"):
        DATASETS.get("cifar")
