"""The weights attack base class: recover what the residual gives away, fit the rest on public text, hand back a
model.

A `WeightsAttack` is granted a private copy of the residual bundle (`WeightsTarget`) and its public secure ranks.
`prepare()` replaces every protected layer of its copy (linear or convolution) by a `CorrectedLayer` whose factors the subclass
chooses (`factors_for`); `fit()` trains them on the attacker's own text; `reconstruct()` returns the attacker's model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from splitveil.attack.base import Attack
from splitveil.attack.weights.correction import CorrectedLayer
from splitveil.attack.weights.finetune import FineTuneSpec, finetune, lm_loss
from splitveil.attack.weights.target import WeightsTarget
from splitveil.core.registry import Registry

WEIGHTS_ATTACKS: Registry = Registry("weights attack")


class WeightsAttack(Attack):
    """Subclasses set `name` and `threat_model` and implement `factors_for`."""

    def __init__(self, target: WeightsTarget, *, seed: int = 0):
        granted = target.grant(self.threat_model, self.name)
        self.model, self.secure_ranks, self.seed = granted.residual, granted.secure_ranks, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.layers: dict[str, CorrectedLayer] = {}
        self.training: dict = {}

    def factors_for(self, name: str, weight: torch.Tensor, rank: int) -> nn.Module:
        """The trainable factors of the correction of matrix `name` (its residual `weight` [m, n], secure rank)."""
        raise NotImplementedError

    def prepare(self, *, progress=None) -> "WeightsAttack":
        """Wraps every protected layer of the attacker's copy in a `CorrectedLayer` (starting at the residual)."""
        from splitveil.protect.slip.decompose import weight_matrix

        owners = {id(child): (parent, attr) for parent in self.model.modules() for attr, child in parent.named_children()}
        named = dict(self.model.named_modules())
        for index, (name, rank) in enumerate(self.secure_ranks.items()):
            module = named[name]
            for parameter in module.parameters():
                parameter.requires_grad_(False)
            corrected = CorrectedLayer(module, self.factors_for(name, weight_matrix(module), rank))
            parent, attr = owners[id(module)]
            setattr(parent, attr, corrected)
            self.layers[name] = corrected
            if progress is not None:
                progress(index + 1, len(self.secure_ranks))
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        for layer in self.layers.values():
            for parameter in layer.factors.parameters():
                parameter.requires_grad_(True)
        return self

    def unknowns(self) -> int:
        """How many numbers the attack fits (over all matrices)."""
        return sum(layer.factors.unknowns for layer in self.layers.values())

    def fit(self, train, held_out, spec: FineTuneSpec, *, quiet: bool = True, report=None, loss=lm_loss) -> dict:
        """Fine-tunes the corrections on the attacker's data `train` (text [N, T], held-out part `held_out` [V, T];
        or (images, labels) tuples with `loss=classifier_loss`); returns the training record (`finetune`).
        `report(message)` is told each step."""
        if not self.layers:
            self.prepare()
        trainable = nn.ModuleList(layer.factors for layer in self.layers.values())
        self.training = finetune(self.model, trainable, train, held_out, spec, quiet=quiet, desc=f"{self.name} attack",
                                 report=report, loss=loss)
        return self.training

    def training_record(self) -> dict:
        """The `attacker_*` fields of the last `fit` ({} before it)."""
        return {k: v for k, v in self.training.items() if k.startswith("attacker_")}

    def reconstruct(self, observed=None) -> nn.Module:
        """The attacker's model: the residual plus its fitted corrections (`observed` is unused: the attack
        was granted the residual itself)."""
        return self.model


def top_singular_value(weight: torch.Tensor) -> float:
    """The largest singular value of `weight` (what the correction's parameters are scaled by)."""
    value = float(torch.linalg.matrix_norm(weight.double(), ord=2))
    return value if math.isfinite(value) and value > 0 else 1.0
