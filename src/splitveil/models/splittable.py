"""The Splittable contract: a model as an ordered list of named segments, cut between segments into parts.

A model has a prologue (segments before its repeated blocks, e.g. an LM's `embed`), `num_blocks` repeated blocks
(decoder layers, CNN stages) and an epilogue (e.g. an LM's `head`). A *cut* `c` (0 <= c <= num_blocks) sits after
`c` blocks, so the Λ-split of a 30-layer LM with 2 head and 2 tail layers has cuts (2, 28), as in DESIGN.md.
The prologue stays with the first part and the epilogue with the last. A part runs segments [start, end) and
owns its state (an LM part: the KV cache of its own layers).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from splitveil.core.errors import ConfigError


class Part(ABC):
    """A contiguous range of segments that runs on its own and keeps its own state."""

    #: segment range [start, end) in the owner's segment list
    start: int
    end: int

    @abstractmethod
    def forward(self, x):
        """Runs this part on the output of the previous part (or on the model's input for the first part)."""

    def __call__(self, x):
        return self.forward(x)

    def reset(self) -> None:
        """Forgets any state (KV cache); the default part is stateless."""

    def state_bytes(self) -> int:
        """Bytes of memory held by this part's own state (an LM part: its KV cache); 0 for a stateless part.

        A server counts this against its memory budget, so it must include every byte the state keeps alive.
        """
        return 0

    @property
    def positions(self) -> int:
        """Positions this part's state holds (0 for a stateless part)."""
        return 0

    def truncate(self, length: int) -> None:
        """Keeps the state of the first `length` positions only (speculative decoding rolls back the positions it
        rejected). A part that cannot raises ConfigError; a stateless part has nothing to roll back."""
        if self.positions:
            raise ConfigError(f"{type(self).__name__} cannot roll back its state")

    @abstractmethod
    def clone(self) -> "Part":
        """A part over the same weights with fresh state (one per session)."""


class Splittable(ABC):
    """A model seen as named segments, with a prologue, repeated blocks and an epilogue."""

    @property
    @abstractmethod
    def segment_names(self) -> list[str]:
        """All segment names in order, e.g. ["embed", "layer.0", ..., "layer.29", "head"]."""

    @property
    def num_prologue(self) -> int:
        """How many segments come before the first block (an LM's `embed`: 1)."""
        return 0

    @property
    @abstractmethod
    def num_blocks(self) -> int:
        """How many repeated blocks can be cut between (decoder layers, CNN stages)."""

    def boundary(self, cut: int) -> int:
        """The segment index at which cut `cut` (after `cut` blocks) sits."""
        return self.num_prologue + cut

    @abstractmethod
    def make_part(self, start: int, end: int) -> Part:
        """A part running segments [start, end)."""

    def describe(self) -> str:
        return f"{type(self).__name__}({self.num_blocks} blocks, segments {self.segment_names[0]}..{self.segment_names[-1]})"
