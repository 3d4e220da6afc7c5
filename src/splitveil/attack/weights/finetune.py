"""Fine-tuning a weights attacker's corrections on its own data, with its learning rate swept and a plateau stop.

The attacker's data is a tensor of examples (text: sequences of `seq_len` tokens, `lm_loss`) or a tuple of tensors
(images and labels, `classifier_loss`); the held-out part (its own, never the victim's) chooses the learning rate
and says when to stop. Each learning rate of the sweep trains `sweep_steps` steps from the
residual-only start (when the best is the sweep's largest or smallest, the sweep goes on beyond it by factors of 3,
at most `extend_sweep` more rates, so that the chosen rate is never an edge the sweep did not look past); the best
one (lowest held-out loss) keeps its state and trains on in rounds of
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
    extend_sweep: int = 2  # more rates (x3 or /3) tried while the best is at the sweep's edge
    steps_per_round: int = 20  # steps between held-out evaluations (one epoch of the stop rule)
    stop: StopRule = field(default_factory=lambda: StopRule(max_epochs=20, patience=3, lr_patience=2, min_delta=1e-3))
    seed: int = 0

    def __post_init__(self):
        if (self.seq_len < 2 or self.batch < 1 or self.sweep_steps < 1 or self.steps_per_round < 1
                or not self.learning_rates or self.extend_sweep < 0):
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


def classifier_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of a classifier on a batch (images [B, C, H, W], labels [B])."""
    images, labels = batch
    return nn.functional.cross_entropy(model(images), labels)


def _rows(data, index):
    """Rows `index` of a tensor, or of each tensor of a tuple."""
    return tuple(part[index] for part in data) if isinstance(data, tuple) else data[index]


def _count(data) -> int:
    return len(data[0]) if isinstance(data, tuple) else len(data)


@torch.no_grad()
def mean_loss(model: nn.Module, data, *, batch: int, loss=lm_loss) -> float:
    """The mean of `loss` over `data` (a tensor of examples or a tuple of tensors), in chunks of `batch`."""
    total, count = 0.0, _count(data)
    for start in range(0, count, batch):
        chunk = _rows(data, slice(start, start + batch))
        total += float(loss(model, chunk)) * _count(chunk)
    return total / max(1, count)


class _Stream:
    """Batches of examples in a fresh seeded order each pass; counts steps and passes."""

    def __init__(self, data, batch: int, seed: int):
        self.data, self.batch = data, batch
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position, self.passes, self.steps = torch.empty(0, dtype=torch.long), 0, 0, 0

    def next(self):
        if self.position + self.batch > len(self.order):
            self.order, self.position = torch.randperm(_count(self.data), generator=self.generator), 0
            self.passes += 1
        index = self.order[self.position:self.position + self.batch]
        self.position += self.batch
        self.steps += 1
        return _rows(self.data, index)


def finetune(model: nn.Module, trainable: nn.Module, train, held_out, spec: FineTuneSpec, *, quiet: bool = True,
             desc: str = "attacker", report=None, loss=lm_loss) -> dict:
    """Trains the parameters of `trainable` (inside `model`; everything else frozen) on `train` (text: [N, T] token
    ids; or a tuple of tensors whose first dimension is the example, fed to `loss(model, batch)`); returns the
    record: learning rate chosen and the sweep, steps, examples (and, for text, tokens) seen, passes over the data,
    and the stop rule's `attacker_*` fields. `model` is left with the best round's parameters, in eval mode.
    `report(message)`, if given, is told every step (progress bars are drawn only when `quiet` is False)."""
    from splitveil.attack.training import combined_record
    from splitveil.train.classifier import progress

    if _count(train) < spec.batch or _count(held_out) == 0:
        raise ConfigError(f"the attacker needs at least {spec.batch} training examples and 1 held-out one "
                          f"(got {_count(train)} and {_count(held_out)}): give it more data")
    parameters = [p for p in trainable.parameters() if p.requires_grad]
    start = copy.deepcopy(trainable.state_dict())
    stream = _Stream(train, spec.batch, spec.seed)
    model.eval()  # no dropout: the frozen model is the victim's, in inference mode

    cap = spec.sweep_steps * (len(spec.learning_rates) + spec.extend_sweep) + spec.stop.max_epochs * spec.steps_per_round

    def step(optimiser) -> None:
        if report is not None:
            report(f"{desc}: step {stream.steps + 1}/{cap} (at most), learning rate {optimiser.param_groups[0]['lr']:g}")
        value = loss(model, stream.next())
        optimiser.zero_grad(set_to_none=True)
        value.backward()
        optimiser.step()

    sweep, best = {}, None

    def try_rate(lr: float) -> None:
        nonlocal best
        trainable.load_state_dict(start)
        optimiser = torch.optim.Adam(parameters, lr=lr)
        for _ in range(spec.sweep_steps):
            step(optimiser)
        held = mean_loss(model, held_out, batch=spec.batch, loss=loss)
        sweep[lr] = held
        if math.isfinite(held) and (best is None or held < best[0]):
            best = (held, lr, copy.deepcopy(trainable.state_dict()), copy.deepcopy(optimiser.state_dict()))

    for lr in progress(spec.learning_rates, total=len(spec.learning_rates), desc=f"{desc}: learning-rate sweep", quiet=quiet):
        try_rate(lr)
    for _ in range(spec.extend_sweep):  # the best at an edge: look one factor of 3 beyond it
        if best is None or min(sweep) < best[1] < max(sweep):
            break
        try_rate(best[1] * 3 if best[1] == max(sweep) else best[1] / 3)
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

    convergence = train_until_plateau(run_round, lambda: mean_loss(model, held_out, batch=spec.batch, loss=loss),
                                      modules=[trainable], optimisers=[optimiser], rule=spec.stop, desc=desc, quiet=quiet)
    model.eval()
    sweep_steps = spec.sweep_steps * len(sweep)
    steps = sweep_steps + convergence.epochs * spec.steps_per_round
    return {"learning_rate": lr, "learning_rate_sweep": {f"{k:g}": v for k, v in sorted(sweep.items())},
            "sweep_steps": sweep_steps, "steps": steps, "best_steps": sweep_steps + convergence.best_epoch * spec.steps_per_round,
            "examples_seen": steps * spec.batch, "data_passes": stream.passes,
            **({} if isinstance(train, tuple) else {"tokens_seen": steps * spec.batch * spec.seq_len}),
            "held_out_loss_history": list(convergence.history), **combined_record({"finetune": convergence}),
            "seconds": convergence.seconds}
