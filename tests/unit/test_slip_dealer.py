"""SLIP's mask dealer: the PRG masks, the dealer service, and the device that holds no linear weight (in process,
over loopback transports; `tests/network/test_slip_dealer_network.py` runs the processes over TLS)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from splitveil.edge.generate import GenerationConfig, SplitCausalLM
from splitveil.models.footprint import resident_weight_bytes
from splitveil.models.loading import load_causal_lm
from splitveil.protect.slip.client import SlipClient
from splitveil.protect.slip.dealer import SEED_BYTES, DealerClient, DealerService, MaskStream, max_rows
from splitveil.plan.parts import Checkpoint
from splitveil.protect.slip.dealt import DealtGroups, DealtSlipModel, load_dealt_model
from splitveil.protect.slip.decompose import causal_lm_groups, weight_matrix
from splitveil.protect.slip.errors import VerificationError
from splitveil.protect.slip.executor import SlipExecutorService
from splitveil.protect.slip.fixedpoint import FixedPoint, RingWeight, high_bits
from splitveil.protect.slip.fused import FusedDealtStage, fuse_refusal, fused_groups
from splitveil.protect.slip.keys import SessionKeys, load_or_build_keys, member_sources
from splitveil.protect.slip.trusted import SlipConfig
from splitveil.transport.loopback import LoopbackTransport
from splitveil.wire.frame import NO_SESSION, Frame, FrameKind, decode_frame, encode_frame

PROMPT = "My social security number is 078-05-1120 and my doctor is Dr. Alvarez."


# -- masks ---------------------------------------------------------------------------------------------------------


def test_masks_are_a_function_of_seed_group_and_row_only():
    seed = bytes(range(SEED_BYTES))
    stream = MaskStream(seed)
    window = stream.rows(3, 576, 10, 8)
    assert window.shape == (8, 576) and window.dtype == np.int64
    rows = np.concatenate([MaskStream(seed).rows(3, 576, 10 + i, 1) for i in range(8)])
    assert np.array_equal(window, rows)  # one window or row by row: the same masks
    assert not np.array_equal(stream.rows(4, 576, 10, 8), window)  # another group
    assert not np.array_equal(stream.rows(3, 576, 11, 8)[:7], window[:7])  # rows never shift into each other
    assert not np.array_equal(MaskStream(bytes(SEED_BYTES)).rows(3, 576, 10, 8), window)  # another seed


def test_masks_are_uniform_over_the_ring():
    masks = torch.from_numpy(MaskStream(bytes(range(32))).rows(0, 1000, 0, 64).copy())
    counts = torch.bincount(high_bits(masks, 4).flatten(), minlength=16).double()
    expected = masks.numel() / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 45  # 15 degrees of freedom: p < 1e-4 beyond this
    assert float((masks < 0).double().mean()) == pytest.approx(0.5, abs=0.02)


def test_a_seed_masks_a_bounded_number_of_rows():
    with pytest.raises(ValueError, match="exceed"):
        MaskStream(bytes(SEED_BYTES)).rows(0, 576, max_rows(576), 1)


# -- the dealer service ----------------------------------------------------------------------------------------------


def _weights(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    fixed_point = FixedPoint()
    return {0: fixed_point.encode_w(torch.randn(12, 8, generator=generator) * 0.1),
            1: fixed_point.encode_w(torch.randn(8, 12, generator=generator) * 0.1)}


def _open(service: DealerService, seed: bytes) -> bytes:
    reply = decode_frame(service.handle(encode_frame(Frame(FrameKind.OPEN, torch.frombuffer(bytearray(seed), dtype=torch.uint8),
                                                           codec="uint8"))))
    assert reply.kind == FrameKind.OK
    return reply.session


def _ask(service: DealerService, session: bytes, seq: int, spans) -> Frame:
    return decode_frame(service.handle(encode_frame(Frame(FrameKind.FORWARD, torch.tensor(spans, dtype=torch.int64),
                                                          codec="int64", session=session, seq=seq))), finite=False)


def test_the_dealer_deals_r_w_for_the_rows_asked_each_once_in_order():
    weights = _weights()
    service = DealerService(weights)
    seed = bytes(range(1, SEED_BYTES + 1))
    session = _open(service, seed)
    reply = _ask(service, session, 0, [[0, 3], [0, 2]])
    assert reply.kind == FrameKind.RESULT
    terms = reply.tensor.numpy()
    stream = MaskStream(seed)
    expected0 = RingWeight(weights[0]).matmul(torch.from_numpy(stream.rows(0, 8, 0, 3).copy())).numpy()
    expected1 = RingWeight(weights[1]).matmul(torch.from_numpy(stream.rows(1, 12, 0, 2).copy())).numpy()
    assert np.array_equal(terms, np.concatenate([expected0.ravel(), expected1.ravel()]))
    for spans, why in (([[0, 1], [2, 1]], "in order"), ([[3, 5000], [2, 0]], "rows in one request"),
                       ([[3, 0], [2, 0]], "no rows"), ([[3, 1]], "int64 \\[2, 2\\]")):
        refused = _ask(service, session, 1, spans)
        assert refused.kind == FrameKind.ERROR and re.search(why, refused.message), refused.message
    assert _ask(service, session, 1, [[3, 1], [2, 1]]).kind == FrameKind.RESULT  # the refusals changed nothing


def test_a_dealer_session_needs_a_seed():
    service = DealerService(_weights())
    for frame in (Frame(FrameKind.OPEN), Frame(FrameKind.OPEN, torch.zeros(16, dtype=torch.uint8), codec="uint8")):
        reply = decode_frame(service.handle(encode_frame(frame)))
        assert reply.kind == FrameKind.ERROR and "seed" in reply.message
    assert not service.sessions


# -- the device ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm():
    return load_causal_lm("smollm2-135m")


def _cloud_weights(full, config: SlipConfig) -> dict:
    found = causal_lm_groups(full, layers=range(*config.layers), include_head=config.include_head)
    return {group.group_id: config.fixed_point.encode_w(torch.cat([weight_matrix(m) for m in modules]))
            for group, modules in found}


def _device(config: SlipConfig, weights: dict, *, executor_tamper=None, dealer_tamper=None, observe=None):
    model, found, model_dir = load_dealt_model("smollm2-135m", config)
    keys, _ = load_or_build_keys(model, model_dir, [g for g, _ in found], member_sources(model, found), config.fixed_point)
    slip = DealtSlipModel(model, found, keys, config)
    executor = SlipExecutorService(weights, mode="fixed", tamper=executor_tamper)
    dealer_service = DealerService(weights, tamper=dealer_tamper)
    if observe is not None:
        dealer_service.observers.append(observe)
    client = SlipClient(LoopbackTransport(executor.handle))
    dealer = DealerClient(LoopbackTransport(dealer_service.handle),
                          widths=[(g.in_features, g.total_out) for g in slip.groups])
    slip.attach(client, dealer)
    return slip, client


@pytest.mark.parametrize("head", [False, True])
def test_the_dealt_device_gives_the_unsplit_models_tokens(smollm, head):
    full, tokenizer = smollm
    config = SlipConfig(mode="fixed", rank=0, layers=(0, 3), include_head=head)
    slip, client = _device(config, _cloud_weights(full, config))
    settings = GenerationConfig(max_new_tokens=8, eos_token_ids=())
    got = SplitCausalLM(slip.model, None, tokenizer=tokenizer, transport=client.transport).generate(PROMPT, settings)
    want = SplitCausalLM(full, None, tokenizer=tokenizer).generate(PROMPT, settings)
    assert got.token_ids == want.token_ids
    assert slip.soundness_bits() >= 40
    assert slip.cost.dealer_flops == slip.cost.untrusted_flops > 0


def test_the_device_holds_no_offloaded_linear_weight(smollm):
    full, _ = smollm
    every_layer = SlipConfig(mode="fixed", rank=0, layers=(0, full.config.num_hidden_layers), include_head=True)
    model, found, _ = load_dealt_model("smollm2-135m", every_layer)
    assert all(p.device.type == "meta" for _, modules in found for m in modules for p in m.parameters(recurse=False)
               if m is not model.get_output_embeddings())
    share = resident_weight_bytes(model) / resident_weight_bytes(full)
    assert share < 0.25  # the tied embedding (21%) and the norms


@pytest.mark.parametrize("who", ["executor", "dealer"])
def test_a_wrong_product_from_either_party_is_caught_and_named(smollm, who):
    full, tokenizer = smollm
    config = SlipConfig(mode="fixed", rank=0, layers=(0, 2))

    def shift(group_id, values):
        values = values.clone()
        if group_id == 1:
            values[0, 0] += 1 << 40
        return values

    tampering = {"executor_tamper": shift} if who == "executor" else {"dealer_tamper": shift}
    slip, client = _device(config, _cloud_weights(full, config), **tampering)
    runner = SplitCausalLM(slip.model, None, tokenizer=tokenizer, transport=client.transport)
    with pytest.raises(VerificationError, match=who):
        runner.generate(PROMPT, GenerationConfig(max_new_tokens=2))
    assert client.failed is not None and client.session == NO_SESSION


def test_the_dealer_receives_nothing_that_depends_on_the_prompt(smollm):
    """Two prompts of the same length: the dealer's received frames are the same bytes once the seed (random) and
    the session id (the dealer's own) are blanked."""
    full, tokenizer = smollm
    config = SlipConfig(mode="fixed", rank=0, layers=(0, 2))
    weights = _cloud_weights(full, config)
    views = []
    prompts = ["My HIV test came back positive today.", "I owe the bank forty thousand dollars."]
    lengths = {len(tokenizer(p)["input_ids"]) for p in prompts}
    assert len(lengths) == 1, "the two prompts must have the same length in tokens"
    for prompt in prompts:
        frames: list[bytes] = []
        slip, client = _device(config, weights, observe=frames.append)
        SplitCausalLM(slip.model, None, tokenizer=tokenizer, transport=client.transport).generate(
            prompt, GenerationConfig(max_new_tokens=12, eos_token_ids=()))
        slip.dealer.close()
        blanked = []
        for data in frames:
            frame = decode_frame(data, finite=False)
            blanked.append((frame.kind, frame.seq, frame.codec, None if frame.kind == FrameKind.OPEN else
                            (frame.tensor.numpy().tobytes() if frame.tensor is not None else None)))
        views.append(blanked)
    assert views[0] == views[1]
    assert sum(kind == FrameKind.FORWARD for kind, *_ in views[0]) >= 2


def test_session_keys_are_fresh_and_catch_wrong_products():
    rng = np.random.default_rng(0)
    weight = FixedPoint().encode_w(torch.from_numpy(rng.standard_normal((40, 24)) * 0.05).float())
    ring = RingWeight(weight)
    from splitveil.protect.slip.fixedpoint import uniform_ring
    from splitveil.protect.slip.keys import GroupKeys

    base = uniform_ring((8, 40))
    keys = GroupKeys(base.numpy(), ring.left_matmul(base).numpy(), ring.row_norm(), ring.largest, 1.0)
    x = rng.integers(-(2**20), 2**20, size=(3, 24))
    y = ring.matmul(torch.from_numpy(x)).numpy()
    first, second = SessionKeys(keys, 4), SessionKeys(keys, 4)
    assert not np.array_equal(first.s, second.s)
    assert first.passes(y, x, 4)
    for bit in (0, 17, 40, 62):
        wrong = y.copy()
        wrong[1, 5] += np.int64(1) << bit
        assert not first.passes(wrong, x, 4)


def test_the_dealer_refuses_a_request_that_would_overrun_a_reply():
    service = DealerService(_weights(), max_reply_bytes=1000)
    session = _open(service, bytes(SEED_BYTES))
    reply = _ask(service, session, 0, [[0, 100], [0, 0]])
    assert reply.kind == FrameKind.ERROR and "bytes" in reply.message
    assert service.sessions[session].next_rows == [0, 0]  # nothing was dealt


def test_sampling_stop_strings_and_chat_work_as_in_every_generate(smollm):
    full, tokenizer = smollm
    config = SlipConfig(mode="fixed", rank=0, layers=(0, 2), include_head=True)
    slip, client = _device(config, _cloud_weights(full, config))
    dealt = SplitCausalLM(slip.model, None, tokenizer=tokenizer, transport=client.transport)
    plain = SplitCausalLM(full, None, tokenizer=tokenizer)
    sampled = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9, seed=7, eos_token_ids=())
    assert dealt.generate(PROMPT, sampled, chat=True).token_ids == plain.generate(PROMPT, sampled, chat=True).token_ids
    stopped = dealt.generate("Count: 1, 2, 3,", GenerationConfig(max_new_tokens=16, stop=(" 6",), eos_token_ids=()))
    assert stopped.finish_reason == "stop" and " 6" not in stopped.text


# -- fused groups: two round trips per layer -----------------------------------------------------------------------


def _fused_device(config: SlipConfig, *, executor_tamper=None):
    """The fused dealt device over loopback: its groups' matrices built from the checkpoint (as the bundle is)."""
    model, _, model_dir = load_dealt_model("smollm2-135m", config)
    layers = range(*config.layers)
    found = fused_groups(model, layers, config.include_head)
    checkpoint = Checkpoint(model_dir, model)
    weights = {group.group_id: config.fixed_point.encode_w(source(checkpoint)) for group, source in found}
    keys, _ = load_or_build_keys(model, model_dir, [g for g, _ in found], [s for _, s in found], config.fixed_point)
    dealt = DealtGroups([(group, [None] * len(group.members)) for group, _ in found], keys, config)
    client = SlipClient(LoopbackTransport(SlipExecutorService(weights, mode="fixed", tamper=executor_tamper).handle))
    dealer = DealerClient(LoopbackTransport(DealerService(weights).handle),
                          widths=[(g.in_features, g.total_out) for g in dealt.groups])
    dealt.attach(client, dealer)
    stage = FusedDealtStage(model, dealt, layers, config.include_head)
    return stage, client, model


def _fused_runner(stage, client, model, tokenizer):
    runner = SplitCausalLM(model, None, tokenizer=tokenizer, transport=client.transport)
    runner.stages = [stage]
    return runner


@pytest.mark.parametrize("layers, head", [((0, 3), True), ((2, 5), False)])
def test_the_fused_device_gives_the_unsplit_models_tokens_in_two_round_trips_per_layer(smollm, layers, head):
    full, tokenizer = smollm
    config = SlipConfig(mode="fixed", rank=0, layers=layers, include_head=head, fuse=True)
    stage, client, model = _fused_device(config)
    runner = _fused_runner(stage, client, model, tokenizer)
    settings = GenerationConfig(max_new_tokens=10, eos_token_ids=())
    got = runner.generate(PROMPT, settings)
    assert got.token_ids == SplitCausalLM(full, None, tokenizer=tokenizer).generate(PROMPT, settings).token_ids
    offloaded = layers[1] - layers[0]
    assert len(stage.dealt.groups) == 1 + 2 * offloaded + head
    forwards = 1 + len(got.token_ids) - 1  # the prefill and one forward per later token
    assert client.transport.stats.round_trips == forwards * len(stage.dealt.groups) + 1  # + the session's OPEN
    assert stage.dealt.soundness_bits() >= 40


def test_the_fused_device_rolls_back_for_speculation_and_samples_like_every_generate(smollm):
    full, tokenizer = smollm
    config = SlipConfig(mode="fixed", rank=0, layers=(0, 2), include_head=True, fuse=True)
    runner = _fused_runner(*_fused_device(config), tokenizer)
    plain = SplitCausalLM(full, None, tokenizer=tokenizer)
    text = "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox jumps"
    settings = GenerationConfig(max_new_tokens=12, eos_token_ids=(), speculate="prompt-lookup", draft_tokens=3,
                                draft_policy="fixed")
    speculated = runner.generate(text, settings)
    assert speculated.token_ids == plain.generate(text, GenerationConfig(max_new_tokens=12, eos_token_ids=())).token_ids
    assert speculated.speculation["accepted"] > 0  # drafts were verified in one pass, rejected ones rolled back
    assert speculated.speculation["drafted"] > speculated.speculation["accepted"]
    sampled = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, seed=7, eos_token_ids=())
    assert runner.generate(PROMPT, sampled, chat=True).token_ids == plain.generate(PROMPT, sampled, chat=True).token_ids


def test_a_wrong_fused_product_is_caught_before_a_token_is_chosen(smollm):
    _, tokenizer = smollm

    def shift(group_id, values):
        values = values.clone()
        if group_id == 2:  # the first layer's round trip B: down and the next layer's q, k, v
            values[0, -1] += 1 << 40
        return values

    config = SlipConfig(mode="fixed", rank=0, layers=(0, 2), fuse=True)
    stage, client, model = _fused_device(config, executor_tamper=shift)
    with pytest.raises(VerificationError, match="executor"):
        _fused_runner(stage, client, model, tokenizer).generate(PROMPT, GenerationConfig(max_new_tokens=2))
    assert client.failed is not None


def test_fused_groups_are_refused_for_models_they_do_not_describe(smollm):
    full, _ = smollm
    assert fuse_refusal(full) is None
    for field, value, says in (("model_type", "qwen2", "Llama-family"), ("attention_bias", True, "biases"),
                               ("hidden_act", "gelu", "SiLU")):
        original = getattr(full.config, field, None)
        setattr(full.config, field, value)
        try:
            assert says in fuse_refusal(full)
        finally:
            setattr(full.config, field, original)


def test_the_fused_device_scores_text_like_the_unsplit_model(smollm):
    """Perplexity goes through the fused stage (every position's logits), not the model's meta-weight modules."""
    full, tokenizer = smollm
    config = SlipConfig(mode="fixed", rank=0, layers=(0, 2), include_head=True, fuse=True)
    runner = _fused_runner(*_fused_device(config), tokenizer)
    ids = tokenizer("The quick brown fox jumps over the lazy dog, and then it rests in the shade.")["input_ids"]
    got, want = runner.score(ids), SplitCausalLM(full, None, tokenizer=tokenizer).score(ids)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert torch.allclose(got, want, atol=1e-2)
