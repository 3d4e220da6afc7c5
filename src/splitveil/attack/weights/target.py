"""What SLIP's weights deployment offers a thief: the untrusted side's residual bundle.

The untrusted side holds W_residual of every protected matrix (it multiplies masked inputs by them). A
`WeightsTarget` is that bundle as a model: the victim's architecture with every decomposable weight replaced by its
residual, plus (generously: in the deployment the trusted side keeps them) the embeddings and norms, and the public
secure rank of each matrix (the protocol's shapes give it away). It never holds the secure factors or the original
weights. What the attacker observes is the bundle itself, so `grant` hands out a private copy of it to any threat
model that observes "residual".
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from splitveil.attack.base import Capabilities, Target, ThreatModel

RESIDUAL_THIEF = ThreatModel(
    observes="residual", auxiliary_data=True, knows_defence=True,
    description="the untrusted side of SLIP's weights deployment: it holds every W_residual (and, generously, the "
                "embeddings, norms, biases and batch-norm statistics), knows the decomposition and each matrix's "
                "secure rank, and has data of its own (public text; for a CNN, stolen labelled images)")


@dataclass(frozen=True, eq=False)
class WeightsTarget(Target):
    """The residual bundle of a SLIP weights deployment.

    Args:
        residual_model: the victim's model with every protected weight replaced by its residual (not modified;
            attacks get copies).
        secure_ranks: module name -> rank of that matrix's secure part (public).
    """

    residual_model: nn.Module
    secure_ranks: dict[str, int] = field(default_factory=dict)

    offers = {}
    observable = ("residual",)

    def offered(self, field: str) -> bool:
        return field == "residual"

    def copy_of(self, field: str) -> nn.Module:
        return copy.deepcopy(self.residual_model)

    def public(self) -> dict:
        return {"secure_ranks": dict(self.secure_ranks)}

    def grant(self, threat: ThreatModel, attack: str) -> Capabilities:
        """The capabilities of `threat` (see `Target.grant`) plus, since it observes the residual, a private copy
        of the bundle as `residual`."""
        granted = super().grant(threat, attack)
        return Capabilities(**vars(granted), residual=self.copy_of("residual"))
