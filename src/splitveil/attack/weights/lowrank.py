"""The LoRA-style attack on SLIP's residual: a free rank-q correction A B^T per matrix (q = the secure rank), fitted
on public text like the null-space attack's block; what an attacker gets without using the structure."""

from __future__ import annotations

from torch import nn

from splitveil.attack.weights.base import WEIGHTS_ATTACKS, WeightsAttack, top_singular_value
from splitveil.attack.weights.correction import FreeFactors
from splitveil.attack.weights.target import RESIDUAL_THIEF


@WEIGHTS_ATTACKS.register("lowrank")
class LowRankAttack(WeightsAttack):
    """A free rank-q correction per matrix (LoRA-style), q = the matrix's secure rank."""

    name = "lowrank"
    threat_model = RESIDUAL_THIEF

    def factors_for(self, name: str, weight, rank: int) -> nn.Module:
        m, n = weight.shape
        return FreeFactors(m, n, rank, scale=top_singular_value(weight), generator=self.generator)
