"""MINE: a lower bound on the mutual information I(x; z) between images and the features that cross a cut.

A statistics network T(x, z) is trained to maximise the Donsker-Varadhan bound
    I(x; z) >= E_joint[T(x, z)] - log E_marginal[exp T(x, z')],
with the marginal sampled by shuffling z across the batch; the estimate (nats) is the bound on held-out pairs.
The network follows SiftFunnel's ConvMINE: z is brought to the image's size and concatenated with x on channels.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


class ConvMINE(nn.Module):
    """T(x, z) -> [B]. z [B, C, h, w] is mixed to 8 channels (1x1 conv) and resized to x's size; a vector z [B, D]
    is mapped to 8 values broadcast over the image. Then strided tanh convolutions and a mean."""

    def __init__(self, image_channels: int, feature_shape: tuple[int, ...], *, width: int = 32):
        super().__init__()
        self.spatial = len(feature_shape) == 3
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


def dv_bound(t_joint: torch.Tensor, t_marginal: torch.Tensor) -> torch.Tensor:
    """Donsker-Varadhan: mean T on joint pairs minus log mean exp T on shuffled pairs (nats)."""
    return t_joint.mean() - (torch.logsumexp(t_marginal, 0) - math.log(len(t_marginal)))


def mine_estimate(x: torch.Tensor, z: torch.Tensor, *, steps: int = 300, batch_size: int = 128, lr: float = 1e-3,
                  holdout: float = 0.3, seed: int = 0) -> float:
    """Trains a ConvMINE on pairs (x [N, C, H, W], z [N, ...]) and returns the DV bound on held-out pairs (nats).

    The estimate is a lower bound of I(x; z) limited by the network and the number of pairs, so compare estimates
    made with the same settings (one data set, one sample size), not across settings.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, z = x.detach().float(), z.detach().float()
    order = torch.randperm(len(x), generator=generator)
    n_test = max(2, int(len(x) * holdout))
    test, train = order[:n_test], order[n_test:]
    z = z / z[train].std().clamp_min(1e-6)  # features of any magnitude -> unit scale
    net = ConvMINE(x.shape[1], tuple(z.shape[1:]))
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        batch = train[torch.randint(len(train), (min(batch_size, len(train)),), generator=generator)]
        shuffled = batch[torch.randperm(len(batch), generator=generator)]
        bound = dv_bound(net(x[batch], z[batch]), net(x[batch], z[shuffled]))
        optimiser.zero_grad()
        (-bound).backward()
        optimiser.step()
    with torch.no_grad():
        t_joint = net(x[test], z[test])
        estimates = [dv_bound(t_joint, net(x[test], z[test[torch.randperm(n_test, generator=generator)]]))
                     for _ in range(5)]
    return float(torch.stack(estimates).mean())
