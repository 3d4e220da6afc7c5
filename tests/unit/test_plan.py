"""SplitPlan: constructors, serialization, validation against a tiny 4-layer llama, parse_cuts, apply, boundaries."""

from __future__ import annotations

import pytest
import torch

from splitveil.core.errors import PlanError
from splitveil.models.causal_lm import CausalLMSplittable
from splitveil.models.tiny import tiny_causal_lm
from splitveil.plan.plan import Placement, SplitPlan, apply, parse_cuts

torch.set_num_threads(1)

EDGE, CLOUD, TRUSTED = Placement.EDGE, Placement.CLOUD, Placement.TRUSTED


@pytest.fixture(scope="module")
def splittable():
    model = CausalLMSplittable(tiny_causal_lm("llama"))
    assert model.num_blocks == 4
    assert model.segment_names == ["embed", "layer.0", "layer.1", "layer.2", "layer.3", "head"]
    return model


# --------------------------------------------------------------------------------------------------- constructors


def test_unsplit():
    plan = SplitPlan.unsplit()
    assert plan.cuts == ()
    assert plan.placement == (EDGE,)


def test_two_way():
    plan = SplitPlan.two_way(2)
    assert plan.cuts == (2,)
    assert plan.placement == (EDGE, CLOUD)


def test_lambda_split():
    plan = SplitPlan.lambda_split(2, 28)
    assert plan.cuts == (2, 28)
    assert plan.placement == (EDGE, CLOUD, EDGE)


def test_from_cuts():
    assert SplitPlan.from_cuts(()) == SplitPlan.unsplit()
    assert SplitPlan.from_cuts((3,)) == SplitPlan.two_way(3)
    assert SplitPlan.from_cuts((1, 3)) == SplitPlan.lambda_split(1, 3)
    with pytest.raises(PlanError, match="got 3"):
        SplitPlan.from_cuts((1, 2, 3))


def test_placements_and_cuts_are_normalized():
    plan = SplitPlan(cuts=[1, 2], placement=["edge", "trusted", "cloud"])
    assert plan.cuts == (1, 2)
    assert all(type(c) is int for c in plan.cuts)
    assert plan.placement == (EDGE, TRUSTED, CLOUD)
    assert all(isinstance(p, Placement) for p in plan.placement)
    assert hash(plan) == hash(SplitPlan((1, 2), (EDGE, TRUSTED, CLOUD)))


def test_describe():
    assert SplitPlan.lambda_split(1, 3).describe() == "cuts=1,3 (edge | cloud | edge)"
    assert SplitPlan.unsplit().describe() == "cuts=- (edge)"


# -------------------------------------------------------------------------------------------------- serialization


@pytest.mark.parametrize(
    "plan",
    [
        SplitPlan.unsplit(),
        SplitPlan.two_way(0),
        SplitPlan.lambda_split(2, 28),
        SplitPlan((1, 2), (EDGE, TRUSTED, CLOUD)),
    ],
)
def test_to_dict_from_dict_round_trip(plan):
    data = plan.to_dict()
    assert data == {"cuts": list(plan.cuts), "placement": [p.value for p in plan.placement]}
    assert all(type(p) is str for p in data["placement"])
    back = SplitPlan.from_dict(data)
    assert back == plan


def test_to_dict_is_plain_json():
    import json

    data = SplitPlan.lambda_split(2, 28).to_dict()
    assert json.loads(json.dumps(data)) == {"cuts": [2, 28], "placement": ["edge", "cloud", "edge"]}


@pytest.mark.parametrize(
    "data",
    [{}, {"cuts": [2]}, {"placement": ["edge"]}, {"cuts": None, "placement": ["edge"]}, None, [1, 2]],
)
def test_from_dict_rejects_non_plans(data):
    with pytest.raises(PlanError, match="not a split plan"):
        SplitPlan.from_dict(data)


def test_from_dict_rejects_bad_placement_and_counts():
    with pytest.raises(PlanError, match="bad placement"):
        SplitPlan.from_dict({"cuts": [2], "placement": ["edge", "moon"]})
    with pytest.raises(PlanError, match="needs 2 placements, got 3"):
        SplitPlan.from_dict({"cuts": [2], "placement": ["edge", "cloud", "edge"]})


def test_from_dict_rejects_non_integer_cut():
    with pytest.raises(PlanError):
        SplitPlan.from_dict({"cuts": ["two"], "placement": ["edge", "cloud"]})


# ----------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("plan", [SplitPlan.unsplit(), SplitPlan.two_way(0), SplitPlan.two_way(4), SplitPlan.two_way(2),
                                  SplitPlan.lambda_split(0, 4), SplitPlan.lambda_split(1, 3), SplitPlan.lambda_split(3, 4)])
def test_valid_plans_validate(splittable, plan):
    plan.validate(splittable)  # no error


@pytest.mark.parametrize("cut", [5, 100])
def test_out_of_range_cut(splittable, cut):
    with pytest.raises(PlanError, match=rf"cut {cut} is out of range: this model has 4 blocks, cuts go from 0 to 4"):
        SplitPlan.two_way(cut).validate(splittable)
    with pytest.raises(PlanError, match=rf"cut {cut} is out of range"):
        SplitPlan.lambda_split(1, cut).validate(splittable)


def test_negative_cut(splittable):
    with pytest.raises(PlanError, match=r"cut -1 is out of range.*0 to 4"):
        SplitPlan.two_way(-1).validate(splittable)
    with pytest.raises(PlanError, match=r"cut -3 is out of range"):
        SplitPlan.lambda_split(-3, 2).validate(splittable)


@pytest.mark.parametrize("cuts", [(3, 3), (3, 1), (2, 1)])
def test_non_increasing_cuts(cuts):
    with pytest.raises(PlanError, match="strictly increasing"):
        SplitPlan.lambda_split(*cuts)
    with pytest.raises(PlanError, match="strictly increasing"):
        SplitPlan(cuts, (EDGE, CLOUD, EDGE))


@pytest.mark.parametrize(
    "cuts, placement, expected",
    [
        ((2,), (EDGE,), "a plan with 1 cut(s) needs 2 placements, got 1"),
        ((2,), (EDGE, CLOUD, EDGE), "a plan with 1 cut(s) needs 2 placements, got 3"),
        ((), (), "a plan with 0 cut(s) needs 1 placements, got 0"),
        ((1, 2), (EDGE, CLOUD), "a plan with 2 cut(s) needs 3 placements, got 2"),
    ],
)
def test_wrong_placement_count(cuts, placement, expected):
    with pytest.raises(PlanError) as info:
        SplitPlan(cuts, placement)
    assert info.value.message == expected


@pytest.mark.parametrize("bad", ["server", "Edge", "", "gpu"])
def test_bad_placement_string(bad):
    with pytest.raises(PlanError, match="bad placement") as info:
        SplitPlan((2,), ("edge", bad))
    # the message lists what is allowed
    assert "edge, cloud, trusted" in info.value.message


# ------------------------------------------------------------------------------------------------------ parse_cuts


@pytest.mark.parametrize("text, cuts", [("2,28", (2, 28)), ("4", (4,)), (" 1 , 3 ", (1, 3)), ("0", (0,))])
def test_parse_cuts_accepts(text, cuts):
    assert parse_cuts(text) == cuts


@pytest.mark.parametrize(
    "text, reason",
    [
        ("a,b", "give one or two layer indices"),
        ("", "give one or two layer indices"),
        ("2,", "give one or two layer indices"),
        ("2.5", "give one or two layer indices"),
        ("1,2,3", "give one cut"),
        ("3,3", "strictly increasing"),
        ("5,2", "strictly increasing"),
    ],
)
def test_parse_cuts_rejects(text, reason):
    with pytest.raises(PlanError, match=reason) as info:
        parse_cuts(text)
    assert repr(text) in info.value.message


def test_parse_cuts_feeds_from_cuts(splittable):
    plan = SplitPlan.from_cuts(parse_cuts("1,3"))
    assert plan == SplitPlan.lambda_split(1, 3)
    plan.validate(splittable)


# ---------------------------------------------------------------------------------------------- boundaries / apply


def test_boundaries_of_lambda_split(splittable):
    # segments: 0 embed, 1..4 layer.0..layer.3, 5 head; a cut c sits at segment 1 + c
    assert SplitPlan.lambda_split(1, 3).boundaries(splittable) == [0, 2, 4, 6]
    assert SplitPlan.lambda_split(0, 4).boundaries(splittable) == [0, 1, 5, 6]
    assert SplitPlan.two_way(2).boundaries(splittable) == [0, 3, 6]
    assert SplitPlan.unsplit().boundaries(splittable) == [0, 6]


@pytest.mark.parametrize(
    "plan, ranges",
    [
        (SplitPlan.unsplit(), [(0, 6)]),
        (SplitPlan.two_way(2), [(0, 3), (3, 6)]),
        (SplitPlan.two_way(0), [(0, 1), (1, 6)]),
        (SplitPlan.two_way(4), [(0, 5), (5, 6)]),
        (SplitPlan.lambda_split(1, 3), [(0, 2), (2, 4), (4, 6)]),
        (SplitPlan.lambda_split(0, 4), [(0, 1), (1, 5), (5, 6)]),
    ],
)
def test_apply_covers_all_segments(splittable, plan, ranges):
    parts = apply(splittable, plan)
    assert len(parts) == len(plan.placement)
    assert [(p.start, p.end) for p in parts] == ranges
    # contiguous and covering [0, n)
    assert parts[0].start == 0
    assert parts[-1].end == len(splittable.segment_names)
    assert all(a.end == b.start for a, b in zip(parts, parts[1:]))


def test_apply_lambda_split_parts(splittable):
    head, trunk, tail = apply(splittable, SplitPlan.lambda_split(1, 3))
    assert (head.name, trunk.name, tail.name) == ("embed..layer.0", "layer.1..layer.2", "layer.3..head")
    assert head.has_embed and not head.has_head
    assert not trunk.has_embed and not trunk.has_head
    assert tail.has_head and not tail.has_embed
    assert (trunk.first_layer, trunk.num_layers) == (1, 2)


def test_apply_parts_run_like_the_whole_model(splittable):
    ids = torch.tensor([[1, 5, 17, 42, 99]])
    whole = apply(splittable, SplitPlan.unsplit())[0](ids)
    x = ids
    for part in apply(splittable, SplitPlan.lambda_split(1, 3)):
        x = part(x)
    assert x.shape == (1, 5, 101)
    torch.testing.assert_close(x, whole, rtol=1e-4, atol=1e-4)


def test_apply_validates(splittable):
    with pytest.raises(PlanError, match="out of range"):
        apply(splittable, SplitPlan.two_way(7))


def test_apply_gives_fresh_parts_each_time(splittable):
    first = apply(splittable, SplitPlan.two_way(2))
    second = apply(splittable, SplitPlan.two_way(2))
    assert all(a is not b for a, b in zip(first, second))
    assert all(a.cache is not b.cache for a, b in zip(first, second))
