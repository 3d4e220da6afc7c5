"""What an output attack may use of a salted split classifier, and the OutputAttack base class.

The cloud of an edge | cloud split computes the classifier's output from the features it receives, so it reads the
answer unless the client salts it (`protect/salt.py`). An `OutputTarget` lists what a scenario offers the cloud: the
salted model's edge and cloud parts (a public model: the cloud may know every weight), auxiliary data of its own,
and the public facts (feature shape, the label map `table` of every salt). Each attack declares its `ThreatModel`;
its constructor has the target grant exactly that (`Target.grant`, as for the image attacks) and keeps only the
resulting capabilities: parts rebuilt from copies of the granted segments' weights, the auxiliary data. The salts of
the victim's requests are never offered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitveil.attack.base import Attack, Target
from splitveil.attack.image.base import isolated_part
from splitveil.core.registry import Registry
from splitveil.data.images import ImageData

OUTPUT_ATTACKS: Registry = Registry("output attack")


@dataclass(frozen=True)
class OutputTarget(Target):
    """What the attacked salted split offers. `None` means the attacker cannot have it."""

    feature_shape: tuple[int, ...]  # what crosses the cut, per example
    table: torch.Tensor  # [S, C] the public label map: salt s answers class y with table[s, y]
    edge: object | None = None  # the salted edge part (takes (images, salts)); its weights
    cloud: object | None = None  # the cloud part; its weights (the cloud runs it, so it always has them)
    aux: ImageData | None = None  # the attacker's own labelled data, disjoint from the victim's

    offers = {"knows_head_weights": ("edge", "the salted edge part's weights"),
              "knows_cloud_weights": ("cloud", "the cloud part's weights"),
              "auxiliary_data": ("aux", "auxiliary data")}

    @classmethod
    def from_parts(cls, edge, cloud, *, image_shape, table: torch.Tensor, aux: ImageData | None = None) -> "OutputTarget":
        with torch.no_grad():
            features = edge((torch.zeros(1, *image_shape), torch.zeros(1, dtype=torch.int64)))
        return cls(tuple(features.shape[1:]), table.clone(), edge=edge, cloud=cloud, aux=aux)

    def offered(self, field: str) -> bool:
        return getattr(self, field) is not None

    def copy_of(self, field: str):
        if field in ("edge", "cloud"):
            return isolated_part(getattr(self, field))
        return self.aux  # the attacker's own data

    def public(self) -> dict:
        return {"feature_shape": self.feature_shape, "table": self.table.clone(),
                "num_classes": int(self.table.shape[1]), "salt_values": int(self.table.shape[0])}


class OutputAttack(Attack):
    """Reads what the cloud can of the salted output. `reconstruct(features)` returns the attacker's guess of the
    salt of each request ([N] int64); the cloud then decodes its own output with that guess.

    Subclasses set `name` and `threat_model`, implement `reconstruct`, and `fit` when they train something.
    """

    def __init__(self, target: OutputTarget, *, seed: int = 0, quiet: bool = True):
        self.target = target.grant(self.threat_model, self.name)
        self.seed, self.quiet = seed, quiet

    def fit(self) -> "OutputAttack":
        return self

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:  # [N, *feature_shape] -> salts [N]
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, **self.threat_model.to_dict()}
