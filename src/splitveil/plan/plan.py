"""SplitPlan: compute (constructors), validate (against a Splittable), apply (-> parts). Three testable steps."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from splitveil.core.errors import PlanError
from splitveil.models.splittable import Part, Splittable


class Placement(str, Enum):
    """Where a part runs."""

    EDGE = "edge"  # the user's device
    CLOUD = "cloud"  # an untrusted server
    TRUSTED = "trusted"  # a trusted execution environment
    EXECUTOR = "executor"  # an untrusted server that multiplies masked inputs by public or residual weights (SLIP)
    DEALER = "dealer"  # a party, not colluding with the executor, that deals correlated randomness (mask terms)


@dataclass(frozen=True)
class SplitPlan:
    """Cut points plus a placement per part; `len(placement) == len(cuts) + 1`.

    A cut `c` sits after `c` blocks of the model (decoder layers for an LM), see `splitveil.models.splittable`.
    """

    cuts: tuple[int, ...]
    placement: tuple[Placement, ...]

    def __post_init__(self):
        try:
            object.__setattr__(self, "cuts", tuple(_as_int(c) for c in self.cuts))
        except (TypeError, ValueError):
            raise PlanError(f"cuts must be integers, got {list(self.cuts)}") from None
        try:
            object.__setattr__(self, "placement", tuple(Placement(p) for p in self.placement))
        except ValueError as error:
            raise PlanError(f"bad placement: {error}; use {', '.join(p.value for p in Placement)}") from None
        if len(self.placement) != len(self.cuts) + 1:
            raise PlanError(f"a plan with {len(self.cuts)} cut(s) needs {len(self.cuts) + 1} placements, got {len(self.placement)}")
        for a, b in zip(self.cuts, self.cuts[1:]):
            if b <= a:
                raise PlanError(f"cuts must be strictly increasing, got {','.join(map(str, self.cuts))}")

    @classmethod
    def unsplit(cls) -> "SplitPlan":
        return cls((), (Placement.EDGE,))

    @classmethod
    def two_way(cls, cut: int) -> "SplitPlan":
        """edge | cloud: the first `cut` blocks on the device, the rest in the cloud."""
        return cls((cut,), (Placement.EDGE, Placement.CLOUD))

    @classmethod
    def lambda_split(cls, head_end: int, tail_start: int) -> "SplitPlan":
        """Λ-split head | trunk | tail: head and tail on the device, the trunk in the cloud."""
        return cls((head_end, tail_start), (Placement.EDGE, Placement.CLOUD, Placement.EDGE))

    @classmethod
    def from_cuts(cls, cuts: tuple[int, ...]) -> "SplitPlan":
        """No cut: unsplit; one cut: edge | cloud; two cuts: Λ-split."""
        if len(cuts) == 0:
            return cls.unsplit()
        if len(cuts) == 1:
            return cls.two_way(cuts[0])
        if len(cuts) == 2:
            return cls.lambda_split(*cuts)
        raise PlanError(f"give one cut (edge|cloud) or two (head|trunk|tail), got {len(cuts)}")

    def validate(self, model: Splittable) -> None:
        """Raises PlanError naming the problem when the plan does not fit `model`."""
        n_segments = len(model.segment_names)
        for cut in self.cuts:
            if not 0 <= cut <= model.num_blocks:
                raise PlanError(f"cut {cut} is out of range: this model has {model.num_blocks} blocks, cuts go from 0 to {model.num_blocks}")
        bounds = self.boundaries(model)
        for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
            if end <= start:
                raise PlanError(f"part {index} of the plan {self.describe()} would be empty")
        if bounds[-1] != n_segments:
            raise PlanError(f"plan does not cover the model's {n_segments} segments")

    def boundaries(self, model: Splittable) -> list[int]:
        """Segment indices [0, b1, ..., n] delimiting the parts."""
        return [0, *(model.boundary(cut) for cut in self.cuts), len(model.segment_names)]

    def describe(self) -> str:
        parts = " | ".join(p.value for p in self.placement)
        return f"cuts={','.join(map(str, self.cuts)) or '-'} ({parts})"

    def to_dict(self) -> dict:
        return {"cuts": list(self.cuts), "placement": [p.value for p in self.placement]}

    @classmethod
    def from_dict(cls, data: dict) -> "SplitPlan":
        try:
            return cls(tuple(data["cuts"]), tuple(data["placement"]))
        except (KeyError, TypeError, ValueError) as error:
            raise PlanError(f"not a split plan: {error}") from None


def _as_int(value) -> int:
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(value)
    return int(value)


#: the Λ-split every LM command defaults to (SmolLM2's 30 layers: 2 on the device, 26 in the cloud, 2 back)
DEFAULT_LM_SPLIT = "2,28"
DEFAULT_LM_CUTS = (2, 28)


def parse_cuts(text: str) -> tuple[int, ...]:
    """Parses "2,28" (or "4") into cut indices; PlanError on anything else."""
    pieces = [piece.strip() for piece in str(text).split(",")]
    try:
        cuts = tuple(int(piece) for piece in pieces)
    except ValueError:
        raise PlanError(f"bad --split {text!r}: give one or two layer indices like 2,28") from None
    if not 1 <= len(cuts) <= 2:
        raise PlanError(f"bad --split {text!r}: give one cut (edge|cloud) or two (head|trunk|tail), like 2,28")
    for a, b in zip(cuts, cuts[1:]):
        if b <= a:
            raise PlanError(f"bad --split {text!r}: cuts must be strictly increasing")
    return cuts


def check_block_cut(cut: int, blocks: int, *, flag: str = "--split", model: str = "the model") -> int:
    """The one range check of a CNN's cut (a cut after block `cut` of `blocks`, both sides non-empty): returns `cut`,
    or raises a PlanError that names the flag and the range."""
    if not 1 <= cut <= blocks:
        raise PlanError(f"{flag} {cut} is out of range: {model} has {blocks} blocks, so a cut goes from 1 to {blocks}")
    return cut


def apply(model: Splittable, plan: SplitPlan) -> list[Part]:
    """Validates `plan` against `model` and returns one part per placement, each with its own fresh state."""
    plan.validate(model)
    bounds = plan.boundaries(model)
    return [model.make_part(start, end) for start, end in zip(bounds, bounds[1:])]
