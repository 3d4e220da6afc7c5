"""The attack base class and threat models."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ThreatModel:
    """What an attacker holds. Attacks state theirs; a target that cannot give it fails at construction."""

    observes: str  # what the attacker sees: "uplink" (states after the head), "downlink" (states before the tail)
    knows_head_weights: bool = False  # the layers before the cut (a cloud serving a public model knows them)
    knows_tail_weights: bool = False  # the layers after the trunk
    auxiliary_data: bool = False  # data of its own, disjoint from the victim's
    knows_defence: bool = False  # the defence's mechanism and public parameters (adaptive attacker)
    queries_edge: bool = False  # may run chosen inputs through the edge part and read the features (black box)
    knows_cloud_weights: bool = False  # the part after the cut of a two-way edge|cloud split
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class Attack(ABC):
    """One verb: `reconstruct` what the observed tensors leak."""

    name: str = "attack"
    threat_model: ThreatModel

    @abstractmethod
    def reconstruct(self, observed):
        """Returns the attacker's reconstruction of the private input (or output) behind `observed`."""
