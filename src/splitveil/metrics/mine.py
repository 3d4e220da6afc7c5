"""MINE: a lower bound on the mutual information I(x; z) between inputs and the features that cross a cut.

A statistics network T(x, z) is trained to maximise the Donsker-Varadhan bound
    I(x; z) >= E_joint[T(x, z)] - log E_marginal[exp T(x, z')],
with the marginal sampled by shuffling z across the batch. Training stops when the bound on validation pairs stops
rising (`bound_training.fit_bound`); the estimate (nats) is the bound on test pairs that took no part in training
or stopping, with the marginal averaged over several shuffles. The gradient of the log term uses MINE's moving-average
correction (Belghazi et al. 2018), which keeps small batches from biasing it. Images get SiftFunnel's ConvMINE (z
brought to the image's size and concatenated on channels), vectors an MLP on [x, z].
"""

from __future__ import annotations

import math

import torch

from splitveil.metrics.bound_training import MIBudget, MIEstimate, fit_bound, split_pairs
from splitveil.metrics.critics import ConvMINE, joint_critic  # noqa: F401  (ConvMINE: its historical home)

#: shuffles of z whose pairs make the marginal sample of a held-out estimate
MARGINAL_SHUFFLES = 8


def dv_bound(t_joint: torch.Tensor, t_marginal: torch.Tensor) -> torch.Tensor:
    """Donsker-Varadhan: mean T on joint pairs minus log mean exp T on shuffled pairs (nats)."""
    return t_joint.mean() - (torch.logsumexp(t_marginal, 0) - math.log(len(t_marginal)))


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of range(n) with no fixed point (a shuffled pair is never a true pair)."""
    return (torch.arange(n) + torch.randint(1, n, (1,), generator=generator)) % n if n < 3 else _derange(n, generator)


def _derange(n: int, generator: torch.Generator) -> torch.Tensor:
    order = torch.randperm(n, generator=generator)
    shifted = torch.empty_like(order)
    shifted[order] = order.roll(1)  # i -> the next element of a random cycle through all n
    return shifted


def held_out_dv(critic, x: torch.Tensor, z: torch.Tensor, index: torch.Tensor, generator: torch.Generator, *,
                shuffles: int = MARGINAL_SHUFFLES, chunk: int = 512) -> float:
    """The DV bound on the pairs `index`, the marginal term over `shuffles` derangements of their z."""
    def scores(xs, zs):
        return torch.cat([critic(xs[i:i + chunk], zs[i:i + chunk]) for i in range(0, len(xs), chunk)])

    xs, zs = x[index], z[index]
    joint = scores(xs, zs)
    marginal = torch.cat([scores(xs, zs[derangement(len(index), generator)]) for _ in range(shuffles)])
    return float(dv_bound(joint, marginal))


def mine(x: torch.Tensor, z: torch.Tensor, *, budget: MIBudget = MIBudget(), seed: int = 0,
         ema_rate: float = 0.01) -> MIEstimate:
    """Trains a statistics network on pairs (x [N, ...], z [N, ...]) and returns the DV bound on held-out pairs.

    The estimate is a lower bound of I(x; z), limited by the network, the sample size and the training; compare
    estimates made with the same budget and the same number of pairs, and over several seeds.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, z = x.detach().float(), z.detach().float()
    train, val, test = split_pairs(len(x), budget, generator)
    z = z / z[train].std().clamp_min(1e-6)  # features of any magnitude -> unit scale
    if x.dim() == 2:
        x = (x - x[train].mean(0)) / x[train].std(0).clamp_min(1e-6)
    critic = joint_critic(tuple(x.shape[1:]), tuple(z.shape[1:]))
    moving = {"mean_exp": None}

    def train_loss(batch: torch.Tensor) -> torch.Tensor:
        shuffled = batch[derangement(len(batch), generator)]
        joint, marginal = critic(x[batch], z[batch]), critic(x[batch], z[shuffled])
        log_mean_exp = torch.logsumexp(marginal, 0) - math.log(len(marginal))
        mean_exp = log_mean_exp.detach().exp()
        moving["mean_exp"] = mean_exp if moving["mean_exp"] is None else \
            (1 - ema_rate) * moving["mean_exp"] + ema_rate * mean_exp
        # d/dθ log E[e^T] ~ E[e^T dT] / (moving average of E[e^T]): the bias-corrected gradient
        corrected = log_mean_exp.exp() / moving["mean_exp"]
        return -(joint.mean() - corrected)

    steps, best_step, converged, val_nats = fit_bound(
        critic, train_loss, lambda index: held_out_dv(critic, x, z, index, generator), train, val, budget, generator)
    critic.eval()
    with torch.no_grad():
        nats = held_out_dv(critic, x, z, test, generator)
    return MIEstimate("mine", nats, steps=steps, best_step=best_step, converged=converged, val_nats=val_nats,
                      pairs=len(test))


def mine_estimate(x: torch.Tensor, z: torch.Tensor, *, steps: int = 3000, batch_size: int = 256, lr: float = 5e-4,
                  seed: int = 0, **budget) -> float:
    """`mine(...)`'s estimate in nats; `steps` is the cap of the early-stopped training (see `MIBudget`)."""
    return mine(x, z, budget=MIBudget(max_steps=steps, batch_size=batch_size, lr=lr, **budget), seed=seed).nats
