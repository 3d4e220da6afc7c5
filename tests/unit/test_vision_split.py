"""Split == unsplit for every vision model at every cut (exact, fp32), and plan validation for CNNs."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from splitveil.core.errors import PlanError
from splitveil.models.vision_zoo import VISION_MODELS, build_vision_model
from splitveil.plan.plan import SplitPlan, apply

SHAPES = [(1, 28, 28), (1, 8, 8), (1, 25, 25)]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    built = {}
    for name in VISION_MODELS:
        for shape in SHAPES:
            model = build_vision_model(name, shape, 10)
            model.train()
            with torch.no_grad():  # move the BatchNorm running statistics away from their initial values
                model(torch.rand(16, *shape))
            built[name, shape] = model.eval()
    return built


def plain_forward(model, images: torch.Tensor) -> torch.Tensor:
    """The whole network as a plain `nn.Sequential` of its modules: torch's own forward, not the splittable's
    segment loop that the parts also run."""
    return torch.nn.Sequential(*model.segments)(images)


@pytest.mark.parametrize("name", VISION_MODELS.names())
@pytest.mark.parametrize("shape", SHAPES)
def test_every_two_way_cut_gives_the_unsplit_logits(models, name, shape):
    model = models[name, shape]
    images = torch.rand(5, *shape)
    with torch.no_grad():
        expected = plain_forward(model, images)
        assert torch.equal(model(images), expected)
        for cut in range(1, model.num_blocks + 1):
            edge, cloud = apply(model, SplitPlan.two_way(cut))
            assert edge.modules() + cloud.modules() == list(model.segments)  # every module once, in order
            assert torch.equal(cloud(edge(images)), expected), (name, shape, cut)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(VISION_MODELS.names()), first=st.integers(1, 5), gap=st.integers(1, 4),
       batch=st.integers(1, 4))
def test_three_way_splits_give_the_unsplit_logits(models, name, first, gap, batch):
    model = models[name, (1, 28, 28)]
    first = min(first, model.num_blocks - 1)
    second = min(first + gap, model.num_blocks)
    images = torch.rand(batch, 1, 28, 28)
    with torch.no_grad():
        head, trunk, tail = apply(model, SplitPlan.lambda_split(first, second))
        assert torch.equal(tail(trunk(head(images))), plain_forward(model, images))


def test_parts_share_the_models_weights_and_clones_too(models):
    model = models["vgg", (1, 28, 28)]
    edge, cloud = apply(model, SplitPlan.two_way(2))
    clone = edge.clone()
    assert (clone.start, clone.end) == (edge.start, edge.end)
    first = next(edge.parameters())
    assert first is next(model.parameters()) and first is next(clone.parameters())
    assert sum(p.numel() for p in edge.parameters()) + sum(p.numel() for p in cloud.parameters()) == \
        sum(p.numel() for p in model.parameters())


def test_vgg_feature_shapes_match_the_anchor(models):
    model = models["vgg", (1, 28, 28)]
    shapes = []
    for cut in (1, 2, 4):
        edge, _ = apply(model, SplitPlan.two_way(cut))
        shapes.append(tuple(edge(torch.zeros(1, 1, 28, 28)).shape[1:]))
    assert shapes == [(32, 28, 28), (32, 14, 14), (64, 7, 7)]


@pytest.mark.parametrize("cuts, expected", [((9,), "out of range"), ((0,), "would be empty"), ((-1,), "out of range"),
                                            ((2, 9), "out of range")])
def test_bad_cuts_are_plan_errors(models, cuts, expected):
    with pytest.raises(PlanError, match=expected):
        apply(models["vgg", (1, 28, 28)], SplitPlan.from_cuts(cuts))


def test_segment_names_follow_the_contract(models):
    model = models["lenet", (1, 28, 28)]
    assert model.segment_names == ["block.0", "block.1", "block.2", "block.3", "epilogue.0"]
    assert model.boundary(2) == 2 and model.num_blocks == 4
