"""Attacks: each declares its threat model, checked at construction, and reconstructs what a split leaks."""

from splitveil.attack.base import Attack, ThreatModel

__all__ = ["Attack", "ThreatModel"]
