"""Learned inversion: a readout trained on auxiliary text passed through the public head.

The attacker has the public model, not the user's prompts: it runs text of its own (offline: the Debian `fortunes`
corpus) through the head, and trains a map from each position's state to its token. The map standardises the
state (a few residual dimensions carry huge activations), applies a residual MLP, and scores tokens against the
public embedding matrix (frozen): only H x H weights are learned, so training takes seconds on a CPU.
"""

from __future__ import annotations

import glob
import os
import time

import torch

from splitveil.attack.base import Attack, ThreatModel
from splitveil.attack.text.attacks import TEXT_ATTACKS, granted
from splitveil.attack.text.target import TextTarget
from splitveil.attack.training import StopRule, holdout_split, mean_over_batches, shuffled_batches, train_until_plateau
from splitveil.core.errors import ConfigError
from splitveil.models.causal_lm import CausalLMPart

FORTUNES_DIR = "/usr/share/games/fortunes"


def fortunes_corpus(limit_chars: int = 400_000, *, from_end: bool = False) -> list[str]:
    """Fortunes (Debian package `fortunes`) as a list of texts; a clear error when the package is missing.

    The first `limit_chars` characters (the learned attack's training text), or with `from_end` the last ones
    (held-out text for measuring perplexity, disjoint from the training text).
    """
    texts: list[str] = []
    files = sorted(f for f in glob.glob(os.path.join(FORTUNES_DIR, "*")) if not f.endswith((".dat", ".u8")) and os.path.isfile(f))
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as handle:
            texts += [t.strip() for t in handle.read().split("\n%\n") if len(t.strip()) > 20]
    if not texts:
        raise ConfigError("the learned attack needs auxiliary text: install the Debian package `fortunes` "
                          "(make setup does, or: apt-get install fortunes)")
    kept, total = [], 0
    for text in reversed(texts) if from_end else texts:
        kept.append(text)
        total += len(text)
        if total >= limit_chars:
            break
    return kept


@TEXT_ATTACKS.register("learned")
class LearnedInversion(Attack):
    """Per-position readout from uplink states to tokens, trained on auxiliary sequences through the public head.

    Args:
        target: what the split offers (a `TextTarget`, or the head part itself); the attack is granted a private
            copy of the public head.
        corpus: auxiliary token-id sequences of the attacker's own (disjoint from what is attacked).
        stop: when training stops: the full-vocabulary cross-entropy on held-out sequences of the corpus (at most
            `held_out_positions` of their positions) plateaus, or the cap. An epoch is one pass over the training
            sequences' positions in batches of `batch`.
        augment: applied to every training batch of states (an adaptive attacker's copy of a defence, e.g. its own
            noise of the defence's scale), and once to the held-out states; None trains on clean states.
    """

    name = "learned"
    threat_model = ThreatModel(observes="uplink", knows_head_weights=True, auxiliary_data=True,
                               description="a cloud with the public model and text of its own, not the user's")

    def __init__(self, target: TextTarget | CausalLMPart, corpus: list[list[int]], *, stop: StopRule = StopRule(),
                 batch: int = 256, negatives: int = 2048, learning_rate: float = 3e-3, held_out_positions: int = 2048,
                 seed: int = 0, augment=None, quiet: bool = True):
        head = granted(self, target).head  # a private copy of the public head
        if len(corpus) < 2:
            raise ConfigError("the learned attack needs an auxiliary corpus of at least 2 sequences (some are held out)")
        self.embeddings = head.input_embeddings.detach()  # [V, H], frozen: the attacker knows it
        train_ids, held_ids = holdout_split(len(corpus), stop.holdout, seed=seed)
        states, tokens = self._collect(head, [corpus[i] for i in train_ids.tolist()])
        held_states, held_tokens = self._collect(head, [corpus[i] for i in held_ids.tolist()])
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(held_tokens), generator=generator)[:held_out_positions]
        held_states, held_tokens = held_states[keep], held_tokens[keep]
        if augment is not None:  # the held-out views are drawn once, so that epochs are judged alike
            held_states = augment(held_states)
        scaled = states if augment is None else augment(states)  # standardise what the readout will be fed
        self.mean, self.std = scaled.mean(0), scaled.std(0) + 1e-5
        width = states.shape[1]
        with torch.random.fork_rng():  # reproducible initialisation without touching the caller's generator
            torch.manual_seed(seed)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width))
            self.project = torch.nn.Linear(width, width)
        torch.nn.init.zeros_(self.mlp[2].weight)
        optimiser = torch.optim.Adam([*self.mlp.parameters(), *self.project.parameters()], lr=learning_rate)
        vocab = self.embeddings.shape[0]

        def run_epoch(epoch: int) -> None:
            for index in shuffled_batches(len(tokens), batch, generator):
                # sampled softmax: the batch's tokens plus random negatives (the full vocabulary at evaluation)
                sampled = torch.randint(0, vocab, (min(negatives, vocab),), generator=generator)
                classes, targets = torch.unique(torch.cat([tokens[index], sampled]), return_inverse=True)
                batch_states = states[index] if augment is None else augment(states[index])
                loss = torch.nn.functional.cross_entropy(self._logits(batch_states, classes), targets[: len(index)])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()

        def held_out_loss() -> float:
            return mean_over_batches(lambda i: torch.nn.functional.cross_entropy(self._logits(held_states[i]),
                                                                                 held_tokens[i]), len(held_tokens))

        started = time.perf_counter()
        with torch.enable_grad():
            self.phases = {"readout": train_until_plateau(run_epoch, held_out_loss, modules=[self.mlp, self.project],
                                                          optimisers=[optimiser], rule=stop, desc="learned readout",
                                                          quiet=quiet)}
        self.training_seconds = time.perf_counter() - started
        self.training_positions = len(tokens)

    @staticmethod
    @torch.inference_mode()
    def _collect(head: CausalLMPart, corpus: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        states, tokens = [], []
        for ids in corpus:
            head.reset()
            states.append(head(torch.tensor([ids]))[0].clone())
            tokens.append(torch.tensor(ids))
        return torch.cat(states).float(), torch.cat(tokens)

    def _logits(self, states: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        x = (states - self.mean) / self.std
        x = self.project(x + self.mlp(x))
        table = self.embeddings if classes is None else self.embeddings[classes]
        return x @ table.T

    @torch.inference_mode()
    def scores(self, observed: torch.Tensor) -> torch.Tensor:
        """observed: [T, H] uplink states -> [T, V] token scores (the exact attack can rank candidates with them)."""
        return self._logits(observed.float())

    def reconstruct(self, observed: torch.Tensor) -> list[int]:
        """observed: [T, H] uplink states -> T token ids (each position on its own)."""
        return self.scores(observed).argmax(-1).tolist()
