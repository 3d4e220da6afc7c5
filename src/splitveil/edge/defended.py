"""The device side of a cut defence: a stage wrapped so that the head's outputs pass through the defence before they
leave the device (and, for a defence that changes the downlink's coordinates, the tail's inputs back through its
inverse). The defences themselves are in `protect/cut.py`; this needs only their `apply` / `unapply`."""

from __future__ import annotations


class DefendedStage:
    """Wraps a device part: the head's outputs pass through `defence.apply` before they leave the device; the
    tail's inputs through `defence.unapply` (for defences that change the downlink's coordinates)."""

    def __init__(self, stage, defence, *, incoming: bool = False):
        self.stage = stage
        self.defence = defence
        self.incoming = incoming

    def __call__(self, x):
        if self.incoming:
            return self.stage(self.defence.unapply(x))
        return self.defence.apply(self.stage(x))

    def reset(self) -> None:
        self.stage.reset()
