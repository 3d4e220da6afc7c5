"""A k-nearest-neighbour estimate of I(x; z) (Kraskov, Stögbauer and Grassberger 2004, their first estimator) on
features reduced by PCA: a second opinion that trains nothing.

KSG counts, for each pair, how many points fall within its k-th nearest neighbour's distance in the joint space
(max-norm) when only x or only z is looked at:
    I = psi(k) + psi(N) - mean_i[ psi(n_x(i) + 1) + psi(n_z(i) + 1) ].
It is consistent in low dimension and biased low in high dimension, so images and feature maps are first reduced to a
few principal components each (`pca`). By data processing, I(P x; Q z) <= I(x; z) for the reductions P, Q: the figure
is the information carried by the leading components, an estimate of a lower bound, comparable between problems only
at the same `dims`, `k` and sample size.
"""

from __future__ import annotations

import torch

from splitveil.metrics.bound_training import MIEstimate


def pca(values: torch.Tensor, dims: int) -> torch.Tensor:
    """[N, ...] -> [N, dims]: the projections on the leading principal components, each scaled to unit variance."""
    flat = values.detach().double().flatten(1)
    flat = flat - flat.mean(0)
    dims = min(dims, flat.shape[1], flat.shape[0] - 1)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    projected = flat @ vh[:dims].T  # [N, dims]
    return projected / projected.std(0).clamp_min(1e-12)


def ksg(x: torch.Tensor, z: torch.Tensor, *, k: int = 5, seed: int = 0, jitter: float = 1e-10) -> float:
    """KSG estimator 1 on x [N, dx], z [N, dz] (low-dimensional; standardised), in nats. A `jitter` of noise breaks
    ties (repeated points make counts ambiguous)."""
    from scipy.special import digamma

    generator = torch.Generator().manual_seed(seed)
    x, z = x.double(), z.double()
    x = x + jitter * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    z = z + jitter * torch.randn(z.shape, generator=generator, dtype=torch.float64)
    n = len(x)
    if not 0 < k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}")
    dx, dz = torch.cdist(x, x, p=float("inf")), torch.cdist(z, z, p=float("inf"))  # [N, N] max-norm distances
    joint = torch.maximum(dx, dz)
    joint.fill_diagonal_(float("inf"))
    eps = joint.kthvalue(k, dim=1).values[:, None]  # [N, 1]: distance to the k-th neighbour in the joint space
    n_x = (dx < eps).sum(1) - 1  # strictly closer in x alone, the point itself excluded
    n_z = (dz < eps).sum(1) - 1
    value = digamma(k) + digamma(n) - (digamma(n_x.numpy() + 1) + digamma(n_z.numpy() + 1)).mean()
    return float(value)


def knn_mutual_information(x: torch.Tensor, z: torch.Tensor, *, dims: int = 4, k: int = 5, samples: int | None = None,
                           seed: int = 0) -> MIEstimate:
    """KSG on the leading `dims` principal components of x [N, ...] and of z [N, ...]; with `samples`, on a random
    subset of that many pairs (a different subset per seed: the spread over seeds is the estimator's sampling spread).
    """
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(x), generator=generator)[:samples] if samples else torch.arange(len(x))
    value = ksg(pca(x[index], dims), pca(z[index], dims), k=k, seed=seed)
    return MIEstimate("knn", value, pairs=len(index))
