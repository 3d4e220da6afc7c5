"""A variational information bottleneck at the cut (MID, Wang et al. 2021, as in SiftFunnel's `mid_model_packages`):
the edge outputs a mean and a standard deviation per feature, sends one sample z = mean + std x eps, and training
adds strength x KL(N(mean, std²) || N(0, 1)) to the cross-entropy."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from splitveil.protect.image.base import IMAGE_DEFENCES, ImageDefence
from splitveil.protect.image.losses import gaussian_kl


class Bottleneck(nn.Module):
    """[B, C, H, W] (or [B, D]) -> a sample of N(mean, std²) with the same shape; keeps the last (mean, std) for the
    loss. std = softplus(raw - 5), as in MID's code. Samples in eval mode too (what is deployed)."""

    def __init__(self, channels: int, spatial: bool):
        super().__init__()
        self.stats = nn.Conv2d(channels, 2 * channels, 1) if spatial else nn.Linear(channels, 2 * channels)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mean, raw = self.stats(h).chunk(2, dim=1)
        std = F.softplus(raw - 5)
        if self.training:
            self.last = (mean, std)
        return mean + std * torch.randn_like(std)

    def __getstate__(self):  # the cached statistics are not part of the module
        state = self.__dict__.copy()
        state["last"] = None
        return state


@IMAGE_DEFENCES.register("vib")
class VariationalBottleneckDefence(ImageDefence):
    """Strength: the weight of the KL rate (summed over feature dimensions) against the cross-entropy."""

    name, stage, default_strength = "vib", "rewrite", 0.001
    frontier_strengths = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    description = "variational information bottleneck at the cut (MID-style): a sample is sent, CE + strength x KL"

    def edge_layers(self, shape):
        self._bottleneck = Bottleneck(shape.feature_shape[0], len(shape.feature_shape) == 3)
        return [self._bottleneck]

    def loss(self, images, sent, logits, labels):
        ce = F.cross_entropy(logits, labels)
        bottleneck = getattr(self, "_bottleneck", None)
        last = getattr(bottleneck, "last", None)
        if last is not None:
            bottleneck.last = None  # drop the batch's graph once used
        if self.identity or last is None:
            return ce
        return ce + self.strength * gaussian_kl(*last)
