"""Fine-tuning a weights attacker's corrections on public text, with its learning rate swept and a plateau stop.

The attacker's text is packed into sequences of `seq_len` tokens; the held-out part (its own, never the victim's)
chooses the learning rate and says when to stop. Each learning rate of the sweep trains `sweep_steps` steps from the
residual-only start; the best one (lowest held-out loss) keeps its state and trains on in rounds of
`steps_per_round` steps, one round being one "epoch" of `attack.training.train_until_plateau` (its stop rule,
learning-rate decay on plateaus and restoring of the best round).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from splitveil.attack.training import StopRule, train_until_plateau
from splitveil.core.errors import ConfigError


@dataclass(frozen=True)
class FineTuneSpec:
    """How a weights attacker trains (recorded with its results)."""

    seq_len: int = 64  # tokens per training sequence
    batch: int = 4  # sequences per step
    learning_rates: tuple[float, ...] = (1e-2, 3e-2, 1e-1)  # Adam; parameters are in units of the residual's top singular value
    sweep_steps: int = 10  # steps each learning rate trains before the best is kept
    steps_per_round: int = 20  # steps between held-out evaluations (one epoch of the stop rule)
    stop: StopRule = field(default_factory=lambda: StopRule(max_epochs=20, patience=3, lr_patience=2, min_delta=1e-3))
    seed: int = 0

    def __post_init__(self):
        if self.seq_len < 2 or self.batch < 1 or self.sweep_steps < 1 or self.steps_per_round < 1 or not self.learning_rates:
            raise ConfigError(f"bad fine-tuning spec: {self}")

    def to_dict(self) -> dict:
        return {**asdict(self), "learning_rates": list(self.learning_rates), "stop": self.stop.to_dict()}


def pack(token_lists: list[list[int]], seq_len: int, *, separator: int) -> torch.Tensor:
    """Pure: texts (token ids) joined by `separator` and cut into sequences [N, seq_len] (the remainder dropped)."""
    stream: list[int] = []
    for ids in token_lists:
        stream += list(ids) + [separator]
    count = len(stream) // seq_len
    return torch.tensor(stream[:count * seq_len], dtype=torch.long).reshape(count, seq_len)


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of `batch` [B, T] under a transformers causal LM."""
    logits = model(input_ids=batch).logits[:, :-1].float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def mean_loss(model: nn.Module, sequences: torch.Tensor, *, batch: int) -> float:
    total = 0.0
    for start in range(0, len(sequences), batch):
        chunk = sequences[start:start + batch]
        total += float(lm_loss(model, chunk)) * len(chunk)
    return total / max(1, len(sequences))


class _Stream:
    """Batches of sequences in a fresh seeded order each pass; counts steps and passes."""

    def __init__(self, sequences: torch.Tensor, batch: int, seed: int):
        self.sequences, self.batch = sequences, batch
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position, self.passes, self.steps = torch.empty(0, dtype=torch.long), 0, 0, 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch > len(self.order):
            self.order, self.position = torch.randperm(len(self.sequences), generator=self.generator), 0
            self.passes += 1
        index = self.order[self.position:self.position + self.batch]
        self.position += self.batch
        self.steps += 1
        return self.sequences[index]


def finetune(model: nn.Module, trainable: nn.Module, train: torch.Tensor, held_out: torch.Tensor, spec: FineTuneSpec, *,
             quiet: bool = True, desc: str = "attacker", report=None) -> dict:
    """Trains the parameters of `trainable` (inside `model`; everything else frozen) on `train` [N, T]; returns the
    record: learning rate chosen and the sweep, steps, tokens seen, passes over the text, and the stop rule's
    `attacker_*` fields. `model` is left with the best round's parameters, in eval mode. `report(message)`, if
    given, is told every step (progress bars are drawn only when `quiet` is False)."""
    from splitveil.attack.training import combined_record
    from splitveil.train.classifier import progress

    if len(train) < spec.batch or len(held_out) == 0:
        raise ConfigError(f"the attacker needs at least {spec.batch} training sequences and 1 held-out one "
                          f"(got {len(train)} and {len(held_out)}): give it more text")
    parameters = [p for p in trainable.parameters() if p.requires_grad]
    start = copy.deepcopy(trainable.state_dict())
    stream = _Stream(train, spec.batch, spec.seed)
    model.eval()  # no dropout: the frozen model is the victim's, in inference mode

    cap = spec.sweep_steps * len(spec.learning_rates) + spec.stop.max_epochs * spec.steps_per_round

    def step(optimiser) -> None:
        if report is not None:
            report(f"{desc}: step {stream.steps + 1}/{cap} (at most), learning rate {optimiser.param_groups[0]['lr']:g}")
        loss = lm_loss(model, stream.next())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    sweep, best = {}, None
    for lr in progress(spec.learning_rates, total=len(spec.learning_rates), desc=f"{desc}: learning-rate sweep", quiet=quiet):
        trainable.load_state_dict(start)
        optimiser = torch.optim.Adam(parameters, lr=lr)
        for _ in range(spec.sweep_steps):
            step(optimiser)
        loss = mean_loss(model, held_out, batch=spec.batch)
        sweep[lr] = loss
        if math.isfinite(loss) and (best is None or loss < best[0]):
            best = (loss, lr, copy.deepcopy(trainable.state_dict()), copy.deepcopy(optimiser.state_dict()))
    if best is None:
        raise ConfigError(f"every learning rate of the sweep {list(spec.learning_rates)} diverged")
    _, lr, state, optimiser_state = best
    trainable.load_state_dict(state)
    optimiser = torch.optim.Adam(parameters, lr=lr)
    optimiser.load_state_dict(optimiser_state)

    def run_round(_: int) -> None:
        model.eval()
        for _ in range(spec.steps_per_round):
            step(optimiser)

    convergence = train_until_plateau(run_round, lambda: mean_loss(model, held_out, batch=spec.batch),
                                      modules=[trainable], optimisers=[optimiser], rule=spec.stop, desc=desc, quiet=quiet)
    model.eval()
    sweep_steps = spec.sweep_steps * len(spec.learning_rates)
    steps = sweep_steps + convergence.epochs * spec.steps_per_round
    return {"learning_rate": lr, "learning_rate_sweep": {f"{k:g}": v for k, v in sweep.items()},
            "sweep_steps": sweep_steps, "steps": steps, "best_steps": sweep_steps + convergence.best_epoch * spec.steps_per_round,
            "tokens_seen": steps * spec.batch * spec.seq_len, "text_passes": stream.passes,
            "held_out_loss_history": list(convergence.history), **combined_record({"finetune": convergence}),
            "seconds": convergence.seconds}
