"""The Splittable adapter for any ordered stack of modules (CNNs, MLPs): prologue, blocks, epilogue.

`SequentialSplittable` is itself an `nn.Module` whose forward runs every segment, so it trains like any network;
its parts run contiguous ranges of the same segment modules (shared weights), so a split network computes exactly
what the unsplit one computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from splitveil.models.splittable import Part, Splittable


class SequentialSplittable(nn.Module, Splittable):
    """An ordered stack of modules seen as named segments.

    Args:
        prologue: segments before the first cut point (stay with the first part).
        blocks: the repeated blocks; cut `c` sits after `c` of them.
        epilogue: segments after the last block (stay with the last part), e.g. the classifier head.
        name: what the network is called in records.
    """

    def __init__(self, *, prologue: Sequence[nn.Module] = (), blocks: Sequence[nn.Module],
                 epilogue: Sequence[nn.Module] = (), name: str = "sequential"):
        super().__init__()
        self.segments = nn.ModuleList([*prologue, *blocks, *epilogue])
        self._num_prologue, self._num_blocks, self._num_epilogue = len(prologue), len(blocks), len(epilogue)
        self.name = name

    @property
    def segment_names(self) -> list[str]:
        return [*(f"prologue.{i}" for i in range(self._num_prologue)),
                *(f"block.{i}" for i in range(self._num_blocks)),
                *(f"epilogue.{i}" for i in range(self._num_epilogue))]

    @property
    def num_prologue(self) -> int:
        return self._num_prologue

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    def run(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Runs segments [start, end) on `x`."""
        for segment in self.segments[start:end]:
            x = segment(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, 0, len(self.segments))

    def make_part(self, start: int, end: int) -> "SequentialPart":
        return SequentialPart(self, start, end)

    def describe(self) -> str:
        return f"{self.name} ({self._num_blocks} blocks)"


class SequentialPart(Part):
    """Segments [start, end) of a `SequentialSplittable`; stateless, weights shared with the owner."""

    def __init__(self, owner: SequentialSplittable, start: int, end: int):
        self.owner, self.start, self.end = owner, start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.owner.run(x, self.start, self.end)

    def clone(self) -> "SequentialPart":
        return SequentialPart(self.owner, self.start, self.end)

    def parameters(self):
        """The weights this part uses (what an attacker holding the part's weights holds)."""
        for segment in self.owner.segments[self.start:self.end]:
            yield from segment.parameters()

    def modules(self) -> list[nn.Module]:
        return list(self.owner.segments[self.start:self.end])
