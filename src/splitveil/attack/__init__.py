"""Attacks: each declares its threat model; a target grants it exactly that, as private copies (`Target.grant`)."""

from splitveil.attack.base import Attack, Capabilities, Target, ThreatModel

__all__ = ["Attack", "Capabilities", "Target", "ThreatModel"]
