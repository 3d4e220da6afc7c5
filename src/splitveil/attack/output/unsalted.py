"""`unsalted`: the cloud reads the output as if it were not salted (guesses salt 0 for every request)."""

from __future__ import annotations

import torch

from splitveil.attack.base import ThreatModel
from splitveil.attack.output.base import OUTPUT_ATTACKS, OutputAttack


@OUTPUT_ATTACKS.register("unsalted")
class UnsaltedRead(OutputAttack):
    name = "unsalted"
    threat_model = ThreatModel(observes="uplink", knows_cloud_weights=True,
                               description="runs its cloud part and reads the argmax as the class, as for a standard "
                                           "model (salt 0 for every request)")

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(features), dtype=torch.int64)
