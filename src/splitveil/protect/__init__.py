"""Protections. `CutDefence`s transform what crosses a cut on the device, before it is sent."""

from splitveil.protect.cut import CUT_DEFENCES, CutDefence, GaussianNoise, HiddenPermutation

__all__ = ["CUT_DEFENCES", "CutDefence", "GaussianNoise", "HiddenPermutation"]
