"""Diffusion Λ-split: every placement and valid cut gives the unsplit picture exactly on an fp32 wire (tiny random
pipelines, pixel and latent space), classifier-free guidance batched through the cut, traffic counted by the
transport, and bad cuts and frames refused."""

from __future__ import annotations

import pytest
import torch

from splitveil.core.errors import ConfigError, PlanError
from splitveil.diffusion.cloud import build_diffusion_service
from splitveil.diffusion.generate import GenerationSpec, generate_image, loopback_transport, run_generation
from splitveil.diffusion.models import load_diffusion
from splitveil.diffusion.unet_split import UNetCarry, UNetSplittable
from splitveil.plan.plan import SplitPlan, apply

MODELS = ("tiny-diffusion", "tiny-latent-diffusion")


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return load_diffusion(request.param)


def test_segments_compose_to_the_unet_bit_for_bit(model):
    splittable = UNetSplittable(model.unet)
    sample = torch.randn(2, *model.latent_shape)
    context = model.encode_prompt(["a photo of a bag", ""])
    t = torch.tensor(700)
    expected = model.unet(sample, t, encoder_hidden_states=context).sample
    for head_blocks in range(1, splittable.n + 1):
        carry = UNetCarry(sample, t, context)
        for part in apply(splittable, SplitPlan.lambda_split(*splittable.cuts_for(head_blocks))):
            carry = part(carry)
        assert torch.equal(carry.sample, expected)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_every_placement_and_cut_equals_unsplit_on_fp32(model, guidance):
    spec = dict(prompt="a photo of a sneaker", steps=3, seed=3, guidance=guidance)
    base = generate_image(model, GenerationSpec(placement="none", **spec))
    runs = [("reference", 1)] + [("unet-split", a) for a in range(1, UNetSplittable(model.unet).n + 1)]
    for placement, head_blocks in runs:
        result = run_generation(model, GenerationSpec(placement=placement, head_blocks=head_blocks, wire="fp32", **spec))
        assert result.image_sha256 == base.image_sha256, (placement, head_blocks)
        assert torch.equal(result.picture, base.picture)
        assert result.bytes_up > 0 and result.bytes_down > 0 and result.round_trips > 0


def test_guidance_rows_cross_the_cut_together(model):
    log: list = []
    transport = loopback_transport(model, "unet-split", 1, log=log)
    generate_image(model, GenerationSpec("a photo of a bag", steps=2, guidance=3.0), transport=transport)
    uplinks = [entry["tensor"] for entry in log if entry["kind"] == "uplink"]
    assert len(uplinks) == 2 and all(u.shape[0] == 2 for u in uplinks)  # [unconditional; conditional] in one frame
    context = next(entry["tensor"] for entry in log if entry["kind"] == "context")
    assert torch.equal(context, model.encode_prompt(["", "a photo of a bag"]))


def test_lossy_wires_stay_close(model):
    base = generate_image(model, GenerationSpec("a photo of a coat", placement="none", steps=3))
    for wire, tolerance in (("fp16", 0.02), ("bf16", 0.05), ("int8", 0.2)):
        for placement in ("reference", "unet-split"):
            result = run_generation(model, GenerationSpec("a photo of a coat", placement=placement, steps=3, wire=wire))
            assert float((result.picture - base.picture).abs().max()) < tolerance, (wire, placement)


def test_traffic_per_step_scales_with_the_wire(model):
    sizes = {}
    for wire in ("fp32", "fp16", "int8"):
        sizes[wire] = run_generation(model, GenerationSpec("a bag", steps=4, wire=wire)).bytes_up
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]
    steps4 = run_generation(model, GenerationSpec("a bag", steps=4)).round_trips
    steps6 = run_generation(model, GenerationSpec("a bag", steps=6)).round_trips
    assert steps6 - steps4 == 2  # one round trip per step, plus a fixed open/schedule/context/close


def test_bad_cuts_are_refused(model):
    splittable = UNetSplittable(model.unet)
    with pytest.raises(PlanError):
        splittable.cuts_for(0)
    with pytest.raises(PlanError):
        splittable.cuts_for(splittable.n + 1)
    with pytest.raises(PlanError):
        splittable.check_cuts((1, 3))  # not symmetric: the tail would lack skip tensors


def test_the_service_refuses_out_of_protocol_frames(model):
    from splitveil.wire.frame import Frame, FrameKind, decode_frame, encode_frame

    service = build_diffusion_service(model, "unet-split", 1)
    reply = decode_frame(service.handle(encode_frame(Frame(FrameKind.OPEN))))
    session = reply.session
    wrong = Frame(FrameKind.FORWARD, torch.zeros(2, 3, 4), session=session, seq=0, part=1)  # not a schedule
    answer = decode_frame(service.handle(encode_frame(wrong)))
    assert answer.kind == FrameKind.ERROR and "schedule" in answer.message
    bad_steps = Frame(FrameKind.FORWARD, torch.tensor([[3.0, 17.0, 3.0]]), session=session, seq=0, part=1)
    answer = decode_frame(service.handle(encode_frame(bad_steps)))
    assert answer.kind == FrameKind.ERROR


def test_a_split_placement_needs_a_transport(model):
    with pytest.raises(ConfigError):
        generate_image(model, GenerationSpec("x", placement="unet-split"))


def test_a_local_diffusers_directory_loads_and_draws_the_same(model, tmp_path):
    model.save(tmp_path / "pipeline")
    loaded = load_diffusion(str(tmp_path / "pipeline"))
    spec = GenerationSpec("a photo of a bag", placement="none", steps=2, seed=1)
    assert generate_image(loaded, spec).image_sha256 == generate_image(model, spec).image_sha256
