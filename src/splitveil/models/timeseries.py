"""A small 1-D CNN for multivariate sensor series, as a Splittable stack (the wearable-sensor model of Salted DNNs'
second modality, sized for BasicMotions: 6 channels x 100 steps).

Blocks are the cut points: a cut `c` sends the output of block `c`. 6x100 input: 32x100, 32x50, 64x50, 64x25.
"""

from __future__ import annotations

import torch
from torch import nn

from splitveil.core.registry import Registry
from splitveil.models.sequential import SequentialSplittable

TIME_SERIES_MODELS: Registry = Registry("time-series model")


def conv1d_bn_relu(c_in: int, c_out: int, *, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv1d(c_in, c_out, 5, padding=2, bias=False), nn.BatchNorm1d(c_out), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool1d(2, ceil_mode=True))
    return nn.Sequential(*layers)


@TIME_SERIES_MODELS.register("sensor-cnn")
def sensor_cnn(series_shape=(6, 100), num_classes: int = 4, *, width: int = 32) -> SequentialSplittable:
    """Four conv1d-BN-ReLU blocks (max-pooling after the second and fourth), global average pooling, a linear head."""
    w = width
    blocks = [conv1d_bn_relu(series_shape[0], w), conv1d_bn_relu(w, w, pool=True), conv1d_bn_relu(w, 2 * w),
              conv1d_bn_relu(2 * w, 2 * w, pool=True)]
    head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2 * w, num_classes))
    return SequentialSplittable(blocks=blocks, epilogue=[head], name="sensor-cnn")


def build_time_series_model(name: str, series_shape, num_classes: int) -> SequentialSplittable:
    return TIME_SERIES_MODELS.get(name)(tuple(series_shape), num_classes)


def augment_series(series: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training-time augmentation of a batch [B, channels, steps] of z-normalised sensor series: a random circular
    time shift (up to a fifth of the length), a random gain per series and channel (x N(1, 0.1)) and jitter
    (N(0, 0.05)). 40 training series are too few for a salted model to learn four label maps without it."""
    batch, channels, steps = series.shape
    shifts = torch.randint(-(steps // 5), steps // 5 + 1, (batch,), generator=generator)
    index = (torch.arange(steps)[None, :] - shifts[:, None]) % steps  # [B, T]
    shifted = series.gather(2, index[:, None, :].expand(-1, channels, -1))
    gain = 1 + 0.1 * torch.randn(batch, channels, 1, generator=generator)
    return shifted * gain + 0.05 * torch.randn(series.shape, generator=generator)
