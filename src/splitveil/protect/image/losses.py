"""Pure, differentiable loss terms of the image defences (tensors in, scalar tensor out)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _double_centred_distances(t: torch.Tensor) -> torch.Tensor:
    """[n, ...] -> [n, n] double-centred Euclidean distances (eps inside the square root, as SiftFunnel's code)."""
    flat = t.flatten(1)
    squared = (flat * flat).sum(1)
    gram = squared.unsqueeze(1) + squared.unsqueeze(0) - 2 * flat @ flat.T
    d = torch.sqrt(gram.clamp_min(0) + 1e-10)
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation_loss(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Squared distance correlation dCor²(x, z) of a batch (NoPeek's statistic; the same as
    `metrics.image.distance_correlation`, but differentiable and in the inputs' precision)."""
    a, b = _double_centred_distances(x), _double_centred_distances(z)
    dcov_xz, dcov_xx, dcov_zz = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return dcov_xz / torch.sqrt(dcov_xx * dcov_zz + 1e-12)


def channel_correlation_loss(z: torch.Tensor) -> torch.Tensor:
    """Mean squared Pearson correlation between the channels of each sample's feature map [B, C, H, W] (spatial
    positions are the observations; the diagonal, a constant 1, is included as in SiftFunnel's code)."""
    flat = z.flatten(2)  # [B, C, HW]
    centred = flat - flat.mean(2, keepdim=True)
    cov = centred @ centred.transpose(1, 2) / flat.shape[2]  # [B, C, C]
    std = cov.diagonal(dim1=1, dim2=2).clamp_min(1e-8).sqrt()  # [B, C]
    corr = cov / (std.unsqueeze(2) * std.unsqueeze(1))
    return corr.pow(2).mean()


def label_smoothed_kl(logits: torch.Tensor, labels: torch.Tensor, *, smoothing: float) -> torch.Tensor:
    """KL(y_ls || softmax(logits)) averaged over the batch, with y_ls = 1 - smoothing on the true class and
    smoothing / (C - 1) on each other class (SiftFunnel's label smoothing)."""
    classes = logits.shape[-1]
    target = torch.full_like(logits, smoothing / max(1, classes - 1))
    target.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing)
    return F.kl_div(F.log_softmax(logits, -1), target, reduction="batchmean")


def gaussian_kl(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std²) || N(0, 1)) summed over the feature dimensions, averaged over the batch (a VIB's rate)."""
    kl = 0.5 * (mean.pow(2) + std.pow(2) - 2 * torch.log(std.clamp_min(1e-8)) - 1)
    return kl.flatten(1).sum(1).mean()


def mixture_entropy_bound(features: torch.Tensor, labels: torch.Tensor, noise_std: float) -> torch.Tensor:
    """CEM's bound on the entropy of noisy features z = f + N(0, noise_std² I), in nats per dimension.

    The clean features f are modelled as a Gaussian mixture with one component per class in the batch (diagonal
    covariance); then H(z) <= sum_k pi_k * 0.5 * mean_j log(2 pi e (var_kj + noise_std²)) + H(pi). Features are
    measured in units of their batch RMS, so the bound cannot be lowered by shrinking them. H(x | z) = H(x) + H(z | x)
    - H(z) with H(z | x) fixed by the noise: minimising this bound maximises the conditional entropy that lower-bounds
    any inversion's MSE.
    """
    flat = features.flatten(1)
    flat = flat / flat.pow(2).mean().sqrt().clamp_min(1e-8)
    total, weights = flat.new_zeros(()), []
    for label in labels.unique():
        members = flat[labels == label]
        pi = len(members) / len(flat)
        var = members.var(0, unbiased=False) if len(members) > 1 else torch.zeros_like(members[0])
        total = total + pi * 0.5 * torch.log(2 * math.pi * math.e * (var + noise_std**2)).mean()
        weights.append(pi)
    pis = torch.tensor(weights)
    return total - (pis * pis.log()).sum() / flat.shape[1]
