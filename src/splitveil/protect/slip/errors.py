"""SLIP's errors: each is a `SplitveilError` with a one-line message for the user."""

from __future__ import annotations

from splitveil.core.errors import SplitveilError


class MaskReuseError(SplitveilError):
    """A one-time mask was about to be used a second time (it would reveal the difference of two inputs)."""


class MaskPoolEmpty(SplitveilError):
    """The pool of precomputed masks ran out and refilling online was not allowed."""


class VerificationError(SplitveilError):
    """The untrusted side's reply failed the Freivalds check: it did not compute W_residual (x + r)."""


class FixedPointOverflow(SplitveilError):
    """A value does not fit the fixed-point ring encoding at the chosen scale."""
