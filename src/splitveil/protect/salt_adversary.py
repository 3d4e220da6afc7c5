"""A countermeasure to salt recovery: adversarial training of the salted model's client part.

While the salted model trains, an adversary network reads the salt and the true class from the features at the cut
(what the cloud will see) and learns to predict both; a gradient-reversal layer between the features and the
adversary pushes the client's blocks to make both unreadable, while the cloud part still has to answer the salted
class (DANN-style, Ganin & Lempitsky 2015). Whether a *fresh* attacker, trained after the model is fixed, is
stopped too is what `attack output --adversary-weight W` measures.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.weight * grad, None


def reader_trunk(feature_shape: tuple[int, ...], *, width: int = 64, convs: int = 1, hidden_layers: int = 1) -> nn.Module:
    """Features at a cut -> [N, 256]: `convs` conv-BN-ReLU layers then pooling to 4x4 (an image's maps) or 16 positions
    (a series), or `hidden_layers` linear-ReLU layers for vectors. What both salt readers (this adversary and the
    cloud's `recovery` attack) put in front of their salt and class heads."""
    if len(feature_shape) in (2, 3):
        conv, norm, pool = (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d(4)) if len(feature_shape) == 3 else \
            (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d(16))
        layers, channels = [], feature_shape[0]
        for index in range(convs):
            stride = 2 if index > 0 and feature_shape[1] >= 8 else 1
            layers += [conv(channels, width, 3, stride=stride, padding=1), norm(width), nn.ReLU()]
            channels = width
        return nn.Sequential(*layers, pool, nn.Flatten(), nn.Linear(width * 16, 256), nn.ReLU())
    layers, features = [], math.prod(feature_shape)
    for _ in range(hidden_layers):
        layers += [nn.Linear(features, 256), nn.ReLU()]
        features = 256
    return nn.Sequential(*layers)


def reverse_gradient(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Identity forward; the gradient flowing back is multiplied by -weight."""
    return _Reverse.apply(x, weight)


class SaltAdversary(nn.Module):
    """Reads (salt, class) from the features at `cut`; trained jointly through a gradient reversal of `weight`.

    Args:
        feature_shape: the features' shape per example at the cut.
        values: salts; classes: C.
        cut: where the cloud's view begins.
        weight: how strongly the client's blocks are pushed against the adversary.
    """

    def __init__(self, feature_shape: tuple[int, ...], values: int, classes: int, *, cut: int, weight: float = 1.0,
                 width: int = 64):
        super().__init__()
        self.cut, self.weight = cut, weight
        self.trunk = reader_trunk(feature_shape, width=width, convs=1, hidden_layers=1)
        self.salt_head, self.class_head = nn.Linear(256, values), nn.Linear(256, classes)

    def loss(self, features: torch.Tensor, salts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(reverse_gradient(features, self.weight))
        return nn.functional.cross_entropy(self.salt_head(hidden), salts) + \
            nn.functional.cross_entropy(self.class_head(hidden), labels)
