"""Split plans: plain data (cuts + placements), validated against a model, then applied to give parts."""

from splitveil.plan.plan import Placement, SplitPlan, apply, parse_cuts

__all__ = ["Placement", "SplitPlan", "apply", "parse_cuts"]
