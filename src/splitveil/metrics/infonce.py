"""InfoNCE: a contrastive lower bound on I(x; z), a second estimator beside MINE.

A separable critic s(x, z) = f(x) . g(z) is trained so that, in a batch of K pairs, each x picks its own z among the K:
    I(x; z) >= log K + E_i[ s(x_i, z_i) - log sum_j exp s(x_i, z_j) ]   (van den Oord et al. 2018; Poole et al. 2019).
The bound can never exceed log K, however much information there is: with K = 1,250 test pairs in a batch it saturates
at 7.1 nats, so near its cap it says "at least this much", not how much. With enough pairs its seeds agree more closely
than MINE's; its separable critic finds what a dot product of embeddings can, so it may rank problems differently. Training stops on a plateau of the validation bound (`bound_training.fit_bound`); the
estimate is the bound on test pairs, in batches of `eval_batch` (the cap is log of that batch).
"""

from __future__ import annotations

import math

import torch

from splitveil.metrics.bound_training import MIBudget, MIEstimate, fit_bound, split_pairs
from splitveil.metrics.critics import SeparableCritic


def infonce_bound(scores: torch.Tensor) -> torch.Tensor:
    """scores [K, K] (row i: x_i against every z_j; the diagonal holds the true pairs) -> the InfoNCE bound (nats)."""
    k = scores.shape[0]
    return math.log(k) + (scores.diagonal() - torch.logsumexp(scores, 1)).mean()


def held_out_infonce(critic, x: torch.Tensor, z: torch.Tensor, index: torch.Tensor, batch: int) -> tuple[float, int]:
    """The bound on the pairs `index` in consecutive batches of (about) `batch` pairs, weighted by size; returns the
    estimate and the largest batch used (its log is the cap)."""
    count = max(1, len(index) // batch)  # equal-size batches, none smaller than `batch`
    parts = torch.tensor_split(index, count)
    values = [float(infonce_bound(critic(x[part], z[part]))) * len(part) for part in parts]
    return sum(values) / len(index), max(len(part) for part in parts)


def infonce(x: torch.Tensor, z: torch.Tensor, *, budget: MIBudget = MIBudget(), eval_batch: int = 1024,
            seed: int = 0) -> MIEstimate:
    """Trains a separable critic contrastively on pairs (x [N, ...], z [N, ...]) and returns the InfoNCE bound on
    held-out pairs (nats), with `cap` = log of the test batch: an estimate near the cap is saturated."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, z = x.detach().float(), z.detach().float()
    train, val, test = split_pairs(len(x), budget, generator)
    z = z / z[train].std().clamp_min(1e-6)
    if x.dim() == 2:
        x = (x - x[train].mean(0)) / x[train].std(0).clamp_min(1e-6)
    critic = SeparableCritic(tuple(x.shape[1:]), tuple(z.shape[1:]))

    def train_loss(batch: torch.Tensor) -> torch.Tensor:
        return -infonce_bound(critic(x[batch], z[batch]))

    steps, best_step, converged, val_nats = fit_bound(
        critic, train_loss, lambda index: held_out_infonce(critic, x, z, index, eval_batch)[0], train, val, budget,
        generator)
    critic.eval()
    with torch.no_grad():
        nats, largest = held_out_infonce(critic, x, z, test, eval_batch)
    return MIEstimate("infonce", nats, steps=steps, best_step=best_step, converged=converged, val_nats=val_nats,
                      cap=math.log(largest), pairs=len(test))
