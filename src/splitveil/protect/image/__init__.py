"""Defences of a split image classifier's input: what crosses the cut is transformed (noise, dropout), or the edge is
trained (NoPeek, VIB, CEM) or rebuilt and trained (SiftFunnel) so that it carries less about the image.

Importing this package registers every defence in `IMAGE_DEFENCES`; each has one strength knob, 0 being the identity
(the undefended model, trained and cached as the undefended victim).
"""

from splitveil.protect.image.base import IMAGE_DEFENCES, ImageDefence, defended_model, make_defence
from splitveil.protect.image import cem, nopeek, obfuscate, siftfunnel, vib  # noqa: F401  (register the defences)

__all__ = ["IMAGE_DEFENCES", "ImageDefence", "defended_model", "make_defence"]
