"""Attacks on SLIP's weights deployment: what a thief of the residual bundle recovers of the model.

- `NullspaceAttack` ("nullspace"): reads the secret subspaces off the residual's null spaces, fits the small block
  that is left on public text.
- `LowRankAttack` ("lowrank"): a free low-rank correction per matrix, ignoring the structure.
- `FullResidualAttack` ("full") and `ScratchAttack` ("scratch"): every weight of each protected matrix fine-tuned
  from the residual, or trained from a fresh start (the residual unused): the extraction curve's reference points.
"""

from splitveil.attack.weights.base import WEIGHTS_ATTACKS, WeightsAttack
from splitveil.attack.weights.dense import FullResidualAttack, ScratchAttack
from splitveil.attack.weights.lowrank import LowRankAttack
from splitveil.attack.weights.nullspace import NullspaceAttack
from splitveil.attack.weights.target import WeightsTarget

__all__ = ["WEIGHTS_ATTACKS", "FullResidualAttack", "LowRankAttack", "NullspaceAttack", "ScratchAttack", "WeightsAttack",
           "WeightsTarget"]
