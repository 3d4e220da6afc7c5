"""The two reference points of an extraction curve on SLIP's residual: fine-tuning every weight of each protected
matrix from the residual (`full`), and training each protected matrix from scratch with the residual thrown away
(`scratch`: what the architecture and the unprotected weights alone are worth). The structured attacks
(`nullspace`, `lowrank`) are judged between them."""

from __future__ import annotations

from torch import nn

from splitveil.attack.weights.base import WEIGHTS_ATTACKS, WeightsAttack, top_singular_value
from splitveil.attack.weights.correction import DenseFactors
from splitveil.attack.weights.target import RESIDUAL_THIEF


class DenseAttack(WeightsAttack):
    """A dense correction of every protected matrix (`DenseFactors`); `replaces_residual` says whether it starts at
    the residual or replaces it."""

    threat_model = RESIDUAL_THIEF
    replaces_residual = False

    def factors_for(self, name: str, weight, rank: int) -> nn.Module:
        m, n = weight.shape
        return DenseFactors(m, n, scale=top_singular_value(weight), replaces_residual=self.replaces_residual,
                            generator=self.generator)


@WEIGHTS_ATTACKS.register("full")
class FullResidualAttack(DenseAttack):
    """Every weight of every protected matrix fine-tuned, starting at the residual."""

    name = "full"


@WEIGHTS_ATTACKS.register("scratch")
class ScratchAttack(DenseAttack):
    """Every protected matrix trained from a fresh initialisation (the residual unused): the no-theft baseline."""

    name, replaces_residual = "scratch", True
