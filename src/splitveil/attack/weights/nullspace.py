"""The null-space attack on SLIP's residual: per matrix, the subspaces where the secret part hides are read off the
residual's smallest singular directions (`subspace.recover`); only the block M of W = W_res + Q_L M Q_R^T is then
fitted on public text (0.9% of SmolLM2's decoder weights at k = 11)."""

from __future__ import annotations

import torch
from torch import nn

from splitveil.attack.weights.base import WEIGHTS_ATTACKS, WeightsAttack
from splitveil.attack.weights.correction import SubspaceFactors
from splitveil.attack.weights.subspace import Recovered, recover
from splitveil.attack.weights.target import RESIDUAL_THIEF


@WEIGHTS_ATTACKS.register("nullspace")
class NullspaceAttack(WeightsAttack):
    """Recovers Q_L, Q_R per matrix from the residual alone, then fits only M on public text."""

    name = "nullspace"
    threat_model = RESIDUAL_THIEF

    def __init__(self, target, *, seed: int = 0):
        super().__init__(target, seed=seed)
        self.recovered: dict[str, Recovered] = {}

    def factors_for(self, name: str, weight: torch.Tensor, rank: int) -> nn.Module:
        found = recover(weight, rank)
        self.recovered[name] = found
        return SubspaceFactors(found, scale=float(found.singular_values[0]) or 1.0)
