"""Critic networks for the neural mutual-information bounds (`mine.py`, `infonce.py`).

A joint critic T(x, z) -> [B] scores one pair (MINE's statistics network); a separable critic embeds x and z apart
and scores every pair of a batch at once, f(x) . g(z) -> [B, B] (InfoNCE's, so that a batch of K pairs costs two
encoder passes, not K^2 critic passes). Images (x [B, C, H, W]) get convolutional encoders; vectors (x [B, D]) and
flattened features get MLPs.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def is_image(shape: tuple[int, ...]) -> bool:
    """Per-sample shape (C, H, W) -> True; (D,) -> False."""
    return len(shape) == 3


class ConvMINE(nn.Module):
    """T(x, z) -> [B] for images x. z [B, C, h, w] is mixed to 8 channels (1x1 conv) and resized to x's size; a
    vector z [B, D] is mapped to 8 values broadcast over the image. Then strided tanh convolutions and a mean
    (SiftFunnel's ConvMINE)."""

    def __init__(self, image_channels: int, feature_shape: tuple[int, ...], *, width: int = 32):
        super().__init__()
        self.spatial = is_image(feature_shape)
        self.embed = nn.Conv2d(feature_shape[0], 8, 1) if self.spatial else nn.Linear(feature_shape[0], 8)
        self.net = nn.Sequential(
            nn.Conv2d(image_channels + 8, width, 3, stride=2, padding=1), nn.Tanh(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.Tanh(),
            nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        if self.spatial:
            z_map = F.interpolate(self.embed(z), size=size, mode="nearest")  # [B, 8, H, W]
        else:
            z_map = self.embed(z)[:, :, None, None].expand(-1, -1, *size)
        return self.net(torch.cat([x, z_map], 1)).flatten(1).mean(1)


class ConcatMLP(nn.Module):
    """T(x, z) -> [B] for vectors: an MLP on [x, z] (z flattened)."""

    def __init__(self, x_dim: int, z_dim: int, *, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(x_dim + z_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 1))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x.flatten(1), z.flatten(1)], 1)).squeeze(1)


def joint_critic(x_shape: tuple[int, ...], z_shape: tuple[int, ...]) -> nn.Module:
    """MINE's T(x, z) for per-sample shapes `x_shape` and `z_shape`."""
    if is_image(x_shape):
        return ConvMINE(x_shape[0], z_shape)
    return ConcatMLP(x_shape[0], int(torch.tensor(z_shape).prod()))


def encoder(shape: tuple[int, ...], dim: int, *, width: int = 32) -> nn.Module:
    """[B, *shape] -> [B, dim]: two strided convolutions and a linear map for a map (C, H, W), an MLP otherwise."""
    if is_image(shape):
        return nn.Sequential(nn.Conv2d(shape[0], width, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(width * 16, dim))
    flat = int(torch.tensor(shape).prod())
    return nn.Sequential(nn.Flatten(), nn.Linear(flat, 4 * width), nn.ReLU(), nn.Linear(4 * width, 4 * width),
                         nn.ReLU(), nn.Linear(4 * width, dim))


class SeparableCritic(nn.Module):
    """scores(x, z) -> [B, B]: entry (i, j) = f(x_i) . g(z_j) / sqrt(dim); the diagonal holds the true pairs."""

    def __init__(self, x_shape: tuple[int, ...], z_shape: tuple[int, ...], *, dim: int = 32):
        super().__init__()
        self.f, self.g, self.scale = encoder(x_shape, dim), encoder(z_shape, dim), dim ** -0.5

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.f(x) @ self.g(z).T * self.scale
