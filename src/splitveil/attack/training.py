"""Learned attackers trained to convergence: the one early-stopping loop every learned attack uses.

A privacy bench is only as good as its strongest attacker, so an attacker that learns (an inverse network, a c-GAN,
a shadow model, a text readout, a salt reader) does not train a fixed, small number of epochs. It holds out part of
its own data (`holdout_split`; never the victim's), trains epoch after epoch, and stops when the held-out loss has
not improved by `min_delta` (relative) for `patience` epochs: a plateau. Before that, after `lr_patience` epochs
without improvement, it multiplies its learning rate by `lr_factor` (reduce-on-plateau), which often resumes the
descent. The cap `max_epochs` bounds the run; the best epoch's weights are restored at the end. The `Convergence`
says how long it trained and why it stopped; records carry it as `attacker_epochs`, `attacker_val_loss` and
`attacker_converged` (false when the cap, not the plateau, stopped it).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, Sequence

import torch
from torch import nn

from splitveil.core.errors import ConfigError


@dataclass(frozen=True)
class StopRule:
    """When a learned attacker stops training. Recorded in every spec that trains one."""

    max_epochs: int = 200  # the cap (epochs over the attacker's training part); reaching it means "not converged"
    patience: int = 8  # epochs without a better held-out loss that make a plateau
    min_delta: float = 1e-3  # relative fall of the held-out loss that counts as better (1e-3: 0.1%)
    lr_patience: int = 3  # epochs without improvement before the learning rate is multiplied by lr_factor (0: never)
    lr_factor: float = 0.5
    min_epochs: int = 1  # never stop before this many epochs
    holdout: float = 0.1  # fraction of the attacker's own data held out to judge the plateau

    def __post_init__(self):
        if self.max_epochs < 1 or self.patience < 1 or not 1 <= self.min_epochs <= self.max_epochs:
            raise ConfigError(f"bad stop rule: need max_epochs >= min_epochs >= 1 and patience >= 1, got {self}")
        if not 0 < self.holdout < 1 or self.min_delta < 0 or not 0 < self.lr_factor <= 1 or self.lr_patience < 0:
            raise ConfigError(f"bad stop rule: need 0 < holdout < 1, min_delta >= 0, 0 < lr_factor <= 1, "
                              f"lr_patience >= 0; got {self}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "StopRule":
        """A rule from a dict (a spec's or a YAML file's); unknown keys fail with one line."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown stop-rule field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)


@dataclass(frozen=True)
class Convergence:
    """How a learned attacker's training went."""

    epochs: int  # epochs trained, the ones after the best included
    best_epoch: int  # the epoch whose weights were restored (1-based)
    val_loss: float  # held-out loss of the restored weights
    converged: bool  # True: stopped on a plateau; False: the cap stopped it while the loss still fell
    history: tuple[float, ...]  # held-out loss after each epoch
    seconds: float = 0.0

    def record(self) -> dict:
        """The fields a record and `--json` carry."""
        return {"attacker_epochs": self.epochs, "attacker_val_loss": self.val_loss,
                "attacker_converged": self.converged, "attacker_best_epoch": self.best_epoch}


def combined_record(phases: dict[str, Convergence]) -> dict:
    """Record fields of an attacker that trains in phases (e.g. a substitute edge, then a decoder): epochs summed,
    the last phase's held-out loss (the one that scores the output), converged only if every phase was; each phase
    listed under `attacker_phases` with its held-out loss after every epoch."""
    if not phases:
        return {}
    last = list(phases.values())[-1]
    return {"attacker_epochs": sum(c.epochs for c in phases.values()), "attacker_val_loss": last.val_loss,
            "attacker_converged": all(c.converged for c in phases.values()), "attacker_best_epoch": last.best_epoch,
            "attacker_phases": {name: {**{k.removeprefix("attacker_"): v for k, v in c.record().items()},
                                       "val_loss_history": [round(loss, 6) for loss in c.history],
                                       "seconds": c.seconds}
                                for name, c in phases.items()}}


def holdout_split(n: int, fraction: float, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure: indices of the training part and of the held-out part (`fraction` of `n`, at least 1) of an
    attacker's own data, in a seeded random order."""
    if n < 2:
        raise ConfigError(f"an attacker needs at least 2 examples of its own to hold some out, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = min(n - 1, max(1, round(fraction * n)))
    return order[held:], order[:held]


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator):
    """Index tensors of one epoch: a fresh permutation of range(n) cut into batches of `batch_size`."""
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def mean_over_batches(loss_of: Callable[[torch.Tensor], torch.Tensor], n: int, *, batch_size: int = 256) -> float:
    """The mean of `loss_of(index)` (a batch-mean loss) over range(n), weighted by batch size, without gradients."""
    total = 0.0
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(n, start + batch_size))
        total += float(loss_of(index)) * len(index)
    return total / n


def train_until_plateau(run_epoch: Callable[[int], None], held_out_loss: Callable[[], float], *,
                        modules: Sequence[nn.Module], optimisers: Sequence[torch.optim.Optimizer] = (),
                        rule: StopRule = StopRule(), desc: str = "attacker", quiet: bool = True) -> Convergence:
    """Runs `run_epoch(epoch)` (0-based; one pass over the training part) until `held_out_loss()` plateaus or the
    cap is reached; restores the best epoch's weights of `modules` and leaves them in eval mode.

    Args:
        run_epoch: trains one epoch; called with `modules` in train mode.
        held_out_loss: the loss on the attacker's held-out data; called with `modules` in eval mode.
        modules: everything whose weights the attack keeps (restored to the best epoch together).
        optimisers: their learning rates are multiplied by `rule.lr_factor` after `rule.lr_patience` epochs
            without improvement.
    """
    from splitveil.train.classifier import progress

    began = time.perf_counter()
    best, best_epoch, best_state, stale, history = math.inf, 0, None, 0, []
    converged = False
    bar = progress(range(rule.max_epochs), total=rule.max_epochs, desc=desc, quiet=quiet)
    for epoch in bar:
        for module in modules:
            module.train()
        run_epoch(epoch)
        for module in modules:
            module.eval()
        loss = float(held_out_loss())
        history.append(loss)
        improved = math.isfinite(loss) and loss < best  # a diverged epoch never counts
        if improved and loss < best * (1 - rule.min_delta):
            stale = 0
        else:
            stale += 1  # a fall smaller than min_delta keeps its weights but does not count as progress
        if improved:
            best, best_epoch = loss, epoch + 1
            best_state = [copy.deepcopy(module.state_dict()) for module in modules]
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(held_out=f"{loss:.4g}", best=best_epoch)
        if epoch + 1 >= rule.min_epochs and stale >= rule.patience:
            converged = True
            break
        if stale and rule.lr_patience and stale % rule.lr_patience == 0:
            for optimiser in optimisers:
                for group in optimiser.param_groups:
                    group["lr"] *= rule.lr_factor
    if best_state is not None:
        for module, state in zip(modules, best_state):
            module.load_state_dict(state)
    for module in modules:
        module.eval()
    return Convergence(epochs=len(history), best_epoch=best_epoch, val_loss=best if best_state is not None else math.nan,
                       converged=converged, history=tuple(history), seconds=time.perf_counter() - began)
