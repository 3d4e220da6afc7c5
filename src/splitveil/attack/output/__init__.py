"""Attacks on the output of a split classifier (Salted DNNs); importing this package registers all of them."""

from splitveil.attack.output.base import OUTPUT_ATTACKS, OutputAttack, OutputTarget
from splitveil.attack.output import cluster, recovery, unsalted  # noqa: F401  (register the attacks)

__all__ = ["OUTPUT_ATTACKS", "OutputAttack", "OutputTarget"]
