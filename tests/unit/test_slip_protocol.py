"""SLIP's protocol on tiny models, in process (loopback transport, the executor service itself): exactness,
verification, refused frames."""

import json

import numpy as np
import pytest
import torch

from splitveil.core.errors import ConfigError, TransportError
from splitveil.edge.generate import SplitCausalLM
from splitveil.models.tiny import tiny_causal_lm
from splitveil.protect.slip.client import SlipClient
from splitveil.protect.slip.errors import VerificationError
from splitveil.protect.slip.executor import SlipExecutorService, load_residual, save_residual
from splitveil.protect.slip.cost import default_rank, other_flops
from splitveil.protect.slip.trusted import SlipConfig, SlipModel
from splitveil.transport.loopback import LoopbackTransport
from splitveil.wire.frame import Frame, FrameKind, decode_frame, encode_frame

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11]])


def protected(family="llama", *, tamper=None, record=None, **config):
    model = tiny_causal_lm(family, weight_scale=1.0)
    slip = SlipModel(model, SlipConfig(**config), generator=np.random.default_rng(0))
    service = SlipExecutorService(slip.executor_weights(), mode=slip.config.mode, tamper=tamper)
    if record is not None:
        service.observers.append(record.append)  # what the untrusted side receives
    transport = LoopbackTransport(service.handle)
    slip.attach(SlipClient(transport))
    return slip, service, transport


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_fixed_point_protected_logits_equal_the_clear_fixed_point_computation(family):
    slip, _, transport = protected(family, mode="fixed", rank=2, include_head=True)
    with torch.no_grad():
        masked = slip.model(IDS).logits
        with slip.reference():
            clear = slip.model(IDS).logits
    assert torch.equal(masked, clear)  # bit for bit
    assert transport.stats.round_trips == len(slip.groups) + 1  # OPEN, then one product per group for the prefill
    plain = tiny_causal_lm(family, weight_scale=1.0)
    with torch.no_grad():
        reference = plain(IDS).logits
    assert float((masked - reference).abs().max() / reference.abs().max()) < 1e-3  # fixed point rounds a little


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_float_variant_is_within_1e_4_of_the_unprotected_model(family):
    slip, _, _ = protected(family, mode="float", rank=3, include_head=True)
    plain = tiny_causal_lm(family, weight_scale=1.0)
    with torch.no_grad():
        masked, reference = slip.model(IDS).logits, plain(IDS).logits
    assert float((masked - reference).abs().max() / reference.abs().max()) < 1e-4


@pytest.mark.parametrize("mode", ["fixed", "float"])
def test_greedy_generation_matches_the_unprotected_model(mode):
    slip, _, transport = protected(mode=mode, rank=2, include_head=True)
    plain = tiny_causal_lm("llama", weight_scale=1.0)
    expected = SplitCausalLM(plain).generate(IDS[0].tolist(), max_new_tokens=12, eos_token_ids=()).token_ids
    result = SplitCausalLM(slip.model, None, transport=transport).generate(IDS[0].tolist(), max_new_tokens=12, eos_token_ids=())
    assert result.token_ids == expected
    # prefill: one round trip per linear group; each decode step: one per group again
    assert result.round_trips == len(slip.groups) * 12 + 1


def test_layer_range_offloads_only_those_layers():
    slip, _, transport = protected(mode="fixed", rank=0, layers=(1, 3))
    assert {g.layer for g in slip.groups} == {1, 2} and len(slip.groups) == 8
    with torch.no_grad():
        slip.model(IDS)
    assert slip.cost.local_linear_flops > 0 and slip.cost.secure_linear_flops == 0


def test_every_corrupted_reply_is_caught():
    flips = []

    def tamper(group_id, output):
        flips.append(group_id)
        bad = output.clone()
        bad.view(-1)[len(flips) % bad.numel()] += 1 << (len(flips) % 64)
        return bad

    slip, service, transport = protected(mode="fixed", rank=1, tamper=tamper)  # the default check
    for _ in range(20):  # each failed check ends its session; a new session needs a new client
        with pytest.raises(VerificationError), torch.no_grad():
            slip.model(IDS)
        slip.attach(SlipClient(transport))
    assert len(flips) == 20 and not service.sessions


def test_the_executor_sees_only_uniform_ring_elements_and_no_weights_secret():
    record = []
    slip, service, _ = protected(mode="fixed", rank=2, record=record)
    with torch.no_grad():
        slip.model(IDS)
    forwards = [decode_frame(f) for f in record if f[3] == FrameKind.FORWARD]
    assert len(forwards) == len(slip.groups)
    values = torch.cat([f.tensor[2:] for f in forwards])
    assert values.abs().float().mean() > 2.0**60  # uniform 64-bit values, nothing like fixed-point activations (~2^16)


def test_residual_bundle_round_trip(tmp_path):
    slip, _, _ = protected(mode="fixed", rank=2)
    bundle = save_residual(tmp_path, slip.groups, slip.residual_weights(), model="tiny", fixed_point=slip.config.fixed_point)
    loaded, weights = load_residual(tmp_path)
    assert loaded.sha256 == bundle.sha256 and len(weights) == len(slip.groups)
    (tmp_path / "manifest.json").write_text(json.dumps({**bundle.to_dict(), "sha256": "0" * 64}))
    with pytest.raises(ConfigError, match="digest"):
        load_residual(tmp_path)


def forward_frame(session, seq, payload, codec="int64", part=0):
    return encode_frame(Frame(FrameKind.FORWARD, payload, codec=codec, session=session, seq=seq, part=part))


@pytest.mark.parametrize("make, codec, part, message", [
    (lambda n: torch.tensor([999, 1] + [0] * n), "int64", 0, "no linear group"),
    (lambda n: torch.tensor([0, 2] + [0] * n), "int64", 0, "takes 2 x"),
    (lambda n: torch.tensor([0, 0]), "int64", 0, "header and at least one value"),
    (lambda n: torch.tensor([0, -1] + [0] * n), "int64", 0, "positions"),
    (lambda n: torch.zeros(2, n + 2, dtype=torch.int64), "int64", 0, "1-D int64"),
    (lambda n: torch.zeros(n + 2), "fp32", 0, "1-D int64"),
    (lambda n: torch.tensor([0, 1] + [0] * n), "int64", 3, "part 0 only"),
])
def test_malformed_frames_get_an_error_frame(make, codec, part, message):
    slip, service, _ = protected(mode="fixed", rank=1)
    n = slip.groups[0].in_features
    opened = decode_frame(service.handle(encode_frame(Frame(FrameKind.OPEN))))
    reply = decode_frame(service.handle(forward_frame(opened.session, 0, make(n), codec, part)))
    assert reply.kind == FrameKind.ERROR and message in reply.message
    good = decode_frame(service.handle(forward_frame(opened.session, 0, torch.tensor([0, 1] + [5] * n))))
    assert good.kind == FrameKind.RESULT and good.tensor.shape == (1, slip.groups[0].total_out)
    stale = decode_frame(service.handle(forward_frame(opened.session, 0, torch.tensor([0, 1] + [5] * n))))
    assert stale.kind == FrameKind.ERROR and "out of order" in stale.message
    assert decode_frame(service.handle(b"garbage")).kind == FrameKind.ERROR


def test_float_executor_refuses_non_finite_inputs():
    slip, service, _ = protected(mode="float", rank=1)
    opened = decode_frame(service.handle(encode_frame(Frame(FrameKind.OPEN))))
    bits = torch.full((slip.groups[0].in_features,), float("nan"), dtype=torch.float64).view(torch.int64)
    reply = decode_frame(service.handle(forward_frame(opened.session, 0, torch.cat([torch.tensor([0, 1]), bits]))))
    assert reply.kind == FrameKind.ERROR and "NaN" in reply.message


def test_client_checks_the_executor_it_reaches():
    slip, service, transport = protected(mode="fixed", rank=1)
    with pytest.raises(TransportError, match="mode"):
        SlipClient(transport, expect={"mode": "float"}).open()


def test_default_rank_meets_the_flops_target_and_counts_attention():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152)
    k = default_rank(config)
    assert 1 <= k <= 20
    assert other_flops(config, 1, 100) > other_flops(config, 1, 10)


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError):
        SlipConfig(mode="fast")
    with pytest.raises(ConfigError):
        SlipConfig(rank=2, energy=0.5)


def test_the_adaptive_attacker_reads_nothing_from_the_masked_view_but_everything_from_the_clear_one():
    from splitveil.attack.text.slip_view import adaptive_attack, candidate_ranking_attack
    from splitveil.protect.slip.view import layer_inputs, masked_view

    record = []
    slip, _, _ = protected(mode="fixed", rank=0, layers=(1, 4), record=record)
    tokens = [int(t) for t in torch.randint(3, 100, (12,), generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        slip.model(torch.tensor([tokens]))
    plain = tiny_causal_lm("llama", weight_scale=1.0)
    q_proj = plain.model.layers[1].self_attn.q_proj
    result = adaptive_attack(masked_view(record), plain, q_proj, 0, tokens, mode="fixed", candidates=32)
    assert result["inversion"]["token_recovery"] <= 0.25  # chance is 1/32
    assert result["mask_reuse_pairs"] == 0
    assert result["uniformity"]["chi2_pvalue"] > 1e-4
    clear = layer_inputs(plain, torch.tensor([tokens]), q_proj)[0]  # an unmasked offload would show this
    assert candidate_ranking_attack(clear, plain, q_proj, tokens, candidates=32)["token_recovery"] == 1.0


def test_a_long_prefill_is_cut_into_frames_that_fit():
    model = tiny_causal_lm("llama", weight_scale=1.0)
    slip = SlipModel(model, SlipConfig(rank=1), generator=np.random.default_rng(0))
    service = SlipExecutorService(slip.executor_weights(), mode="fixed", max_frame_bytes=4096)
    transport = LoopbackTransport(service.handle)
    slip.attach(SlipClient(transport))
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked = slip.model(ids).logits
        with slip.reference():
            clear = slip.model(ids).logits
    assert torch.equal(masked, clear)
    assert transport.stats.round_trips > len(slip.groups) + 1  # more than one frame per group


@pytest.mark.parametrize("name", ["lenet", "resnet"])
@pytest.mark.parametrize("mode", ["fixed", "float"])
def test_cnns_run_masked_convolutions_exactly(name, mode):
    from splitveil.models.vision_zoo import build_vision_model
    from splitveil.protect.slip.network import SlipNetwork

    torch.manual_seed(0)
    plain = build_vision_model(name, (1, 12, 12), 10).eval()
    model = build_vision_model(name, (1, 12, 12), 10).eval()
    model.load_state_dict(plain.state_dict())
    slip = SlipNetwork(model, SlipConfig(mode=mode, rank=2), generator=np.random.default_rng(0))
    slip.attach(SlipClient(LoopbackTransport(SlipExecutorService(slip.executor_weights(), mode=mode).handle)))
    images = torch.rand(2, 1, 12, 12)
    with torch.no_grad():
        masked, reference = model(images), plain(images)
        with slip.reference():
            clear = model(images)
    if mode == "fixed":
        assert torch.equal(masked, clear)
        assert torch.allclose(masked, reference, atol=1e-3)
    else:
        assert torch.allclose(masked, reference, atol=1e-4, rtol=1e-4)


def test_view_in_the_shape_of_cut_traffic():
    from splitveil.attack.text.slip_view import read_view_text
    from splitveil.protect.slip.view import masked_view, uplink_downlink

    record = []
    slip, _, _ = protected(mode="fixed", rank=0, layers=(1, 3), record=record)
    with torch.no_grad():
        slip.model(IDS)
    view = masked_view(record)
    up, down = uplink_downlink(view, slip.groups, hidden_size=32, mode="fixed")
    assert up.shape == (IDS.shape[1], 32) and down.shape == (IDS.shape[1], 32)
    assert len(read_view_text(view, tiny_causal_lm("llama"), mode="fixed")) == IDS.shape[1]


def test_rank_by_energy_keeps_more_components_for_flatter_spectra():
    slip, _, _ = protected(mode="fixed", energy=0.5)
    ranks = [p.rank for parts in slip.decompositions.values() for p in parts]
    assert all(r >= 1 for r in ranks) and len(set(ranks)) > 1
    with torch.no_grad():
        masked = slip.model(IDS).logits
        with slip.reference():
            assert torch.equal(masked, slip.model(IDS).logits)
