"""The attention modules of SiftFunnel's funnel edge and cloud: squeeze-and-excitation (Hu et al. 2018), CBAM (Woo et
al. 2018) and triplet attention (Misra et al. 2021). Each maps [B, C, H, W] to the same shape."""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcitation(nn.Module):
    """Channel gates from globally average-pooled features through a two-layer bottleneck (C -> C/reduction -> C)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(),
                                  nn.Conv2d(hidden, channels, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.gate(x)


class ZPool(nn.Module):
    """Max and mean over dimension 1, stacked: [B, C, H, W] -> [B, 2, H, W]."""

    def forward(self, x):
        return torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)


class SpatialGate(nn.Module):
    """A map of gates over the last two dimensions from a Z-pool, a k x k conv, BN and a sigmoid."""

    def __init__(self, kernel: int = 7):
        super().__init__()
        self.gate = nn.Sequential(ZPool(), nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(1),
                                  nn.Sigmoid())

    def forward(self, x):
        return x * self.gate(x)


class TripletAttention(nn.Module):
    """Three spatial gates, over (H, W), over (C, W) with H pooled, and over (H, C) with W pooled; the mean of the
    three gated tensors."""

    def __init__(self, kernel: int = 7):
        super().__init__()
        self.hw, self.cw, self.hc = SpatialGate(kernel), SpatialGate(kernel), SpatialGate(kernel)

    def forward(self, x):  # [B, C, H, W]
        hw = self.hw(x)
        cw = self.cw(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)  # pooled over H, gates over (C, W)
        hc = self.hc(x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)  # pooled over W, gates over (H, C)
        return (hw + cw + hc) / 3


class CBAM(nn.Module):
    """Channel attention (shared MLP on average- and max-pooled features) followed by a spatial gate."""

    def __init__(self, channels: int, ratio: int, kernel: int = 7):
        super().__init__()
        hidden = max(1, channels // ratio)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(),
                                 nn.Conv2d(hidden, channels, 1, bias=False))
        self.spatial = SpatialGate(kernel)

    def forward(self, x):
        avg = self.mlp(x.mean((2, 3), keepdim=True))
        peak = self.mlp(x.amax((2, 3), keepdim=True))
        return self.spatial(x * torch.sigmoid(avg + peak))
