"""Training a neural mutual-information bound until its held-out estimate stops improving.

MINE (`mine.py`) and InfoNCE (`infonce.py`) both train a critic to maximise a lower bound of I(x; z). A fixed, small
number of steps leaves the bound loose and seed-dependent, so both use one rule here: the pairs are split three ways
(train / validation / test); every `eval_every` steps the bound is evaluated on the validation pairs; training stops
when it has not risen by `min_delta` nats for `patience` evaluations (a plateau) or at the cap `max_steps`; the best
validation step's weights are restored and the estimate is the bound on the **test** pairs, which chose nothing.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from splitveil.core.errors import ConfigError


@dataclass(frozen=True)
class MIBudget:
    """How long a neural bound trains and on which pairs. Recorded with every estimate."""

    max_steps: int = 3000  # the cap (Adam steps); reaching it means "not converged"
    eval_every: int = 50  # steps between validation estimates
    patience: int = 8  # validation estimates without a rise of min_delta that make a plateau
    min_delta: float = 0.01  # nats
    batch_size: int = 256  # pairs per step (InfoNCE: also the negatives per positive while training)
    lr: float = 5e-4
    val_fraction: float = 0.15  # of the pairs, judge the plateau
    test_fraction: float = 0.25  # of the pairs, give the reported estimate

    def __post_init__(self):
        if self.max_steps < 1 or self.eval_every < 1 or self.patience < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ConfigError(f"bad MI budget: need max_steps, eval_every, patience >= 1, batch_size >= 2, lr > 0; "
                              f"got {self}")
        if not (0 < self.val_fraction and 0 < self.test_fraction and self.val_fraction + self.test_fraction < 0.9):
            raise ConfigError(f"bad MI budget: need positive val and test fractions summing below 0.9, got {self}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MIEstimate:
    """One estimate of I(x; z) in nats, and how it was obtained."""

    estimator: str  # "mine", "infonce", "knn"
    nats: float  # the estimate on the test pairs
    steps: int = 0  # training steps run (neural bounds)
    best_step: int = 0  # the step whose weights gave the estimate
    converged: bool = True  # False: the step cap stopped training while the validation estimate still rose
    val_nats: float = float("nan")  # the best validation estimate
    cap: float = float("inf")  # the largest value the estimator can return (InfoNCE: log of its batch)
    pairs: int = 0  # pairs the estimate was computed on (test pairs; k-NN: all pairs used)

    def to_dict(self) -> dict:
        return asdict(self)


def split_pairs(n: int, budget: MIBudget, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random disjoint (train, validation, test) indices of `n` pairs."""
    order = torch.randperm(n, generator=generator)
    n_val, n_test = max(2, int(n * budget.val_fraction)), max(2, int(n * budget.test_fraction))
    if n - n_val - n_test < 2:
        raise ConfigError(f"{n} pairs are too few to train and test a mutual-information bound")
    return order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test]


def fit_bound(critic: nn.Module, train_loss: Callable[[torch.Tensor], torch.Tensor],
              evaluate: Callable[[torch.Tensor], float], train: torch.Tensor, val: torch.Tensor, budget: MIBudget,
              generator: torch.Generator) -> tuple[int, int, bool, float]:
    """Adam on `train_loss(batch indices)` until the validation bound `evaluate(val)` plateaus or the cap; the best
    weights are loaded back into `critic`.

    Returns:
        (steps run, best step, converged, best validation estimate).
    """
    optimiser = torch.optim.Adam(critic.parameters(), lr=budget.lr)
    best, best_step, best_state, since = -float("inf"), 0, copy.deepcopy(critic.state_dict()), 0
    batch = min(budget.batch_size, len(train))
    step = 0
    while step < budget.max_steps:
        step += 1
        critic.train()
        loss = train_loss(train[torch.randperm(len(train), generator=generator)[:batch]])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % budget.eval_every and step != budget.max_steps:
            continue
        critic.eval()
        with torch.no_grad():
            value = evaluate(val)
        if value > best + budget.min_delta:
            best, best_step, since = value, step, 0
            best_state = copy.deepcopy(critic.state_dict())
        else:
            since += 1
            if since >= budget.patience:
                critic.load_state_dict(best_state)
                return step, best_step, True, best
    critic.load_state_dict(best_state)
    return step, best_step, False, best
