"""Exactness of the causal-LM adapter on tiny random models of several families (split == unsplit)."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitveil.edge.generate import SplitCausalLM
from splitveil.models.causal_lm import CausalLMSplittable
from splitveil.models.tiny import TINY_FAMILIES
from splitveil.plan.plan import Placement, SplitPlan, apply

FAMILIES = TINY_FAMILIES.names()
NEW_TOKENS = 40


def _prompt(seed: int, length: int = 7) -> torch.Tensor:
    return torch.randint(3, 101, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def _reference_tokens(model, prompt: torch.Tensor) -> list[int]:
    """Greedy decoding by the plain model recomputing the whole sequence at every step (no KV cache at all)."""
    ids = prompt
    for _ in range(NEW_TOKENS):
        next_token = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


_reference_cache: dict = {}


def _reference(models, family, seed):
    key = (family, seed)
    if key not in _reference_cache:
        _reference_cache[key] = _reference_tokens(models[family], _prompt(seed))
    return _reference_cache[key]


@st.composite
def cut_plans(draw):
    cuts = sorted(draw(st.sets(st.integers(0, 4), min_size=1, max_size=2)))
    return SplitPlan.from_cuts(tuple(cuts))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(family=st.sampled_from(FAMILIES), plan=cut_plans(), seed=st.integers(0, 3))
def test_greedy_tokens_and_logits_equal_unsplit_for_every_cut(tiny_models, family, plan, seed):
    model = tiny_models[family]
    prompt = _prompt(seed)
    split = SplitCausalLM(model, plan, wire="fp32")
    result = split.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_ids=())
    assert result.token_ids == _reference(tiny_models, family, seed)
    logits = split.forward_logits(prompt) if plan.placement[-1] == Placement.EDGE else None
    if logits is not None:
        torch.testing.assert_close(logits, model(prompt).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_lambda_cut_pair_is_exact(tiny_models, family):
    """All valid (A, B) pairs, not only the ones hypothesis draws."""
    model = tiny_models[family]
    reference = _reference(tiny_models, family, 0)
    for head_end in range(0, 5):
        for tail_start in range(head_end + 1, 5):
            result = SplitCausalLM(model, SplitPlan.lambda_split(head_end, tail_start)).generate(
                _prompt(0), max_new_tokens=NEW_TOKENS, eos_token_ids=())
            assert result.token_ids == reference, (head_end, tail_start)


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_is_not_degenerate(tiny_models, family):
    """The tiny models must make varied choices, or the equivalence tests would prove little."""
    assert len(set(_reference(tiny_models, family, 0))) >= 10


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_with_a_seed_matches_unsplit(tiny_models, family):
    model = tiny_models[family]
    kwargs = dict(max_new_tokens=24, do_sample=True, temperature=1.3, top_k=20, top_p=0.9, seed=7, eos_token_ids=())
    unsplit = SplitCausalLM(model).generate(_prompt(1), **kwargs)
    split = SplitCausalLM(model, SplitPlan.lambda_split(1, 3)).generate(_prompt(1), **kwargs)
    assert split.token_ids == unsplit.token_ids
    greedy = SplitCausalLM(model).generate(_prompt(1), max_new_tokens=24, eos_token_ids=())
    assert unsplit.token_ids != greedy.token_ids  # sampling really sampled


def test_only_new_positions_cross_each_cut(tiny_models):
    model = tiny_models["llama"]
    hidden = CausalLMSplittable(model).hidden_size
    split = SplitCausalLM(model, SplitPlan.lambda_split(1, 3), wire="fp32")
    result = split.generate(_prompt(2, length=9), max_new_tokens=10, eos_token_ids=())
    up, down = result.bytes_per_decode_step
    assert up == down == hidden * 4 + 28 + 4 * 3  # one position, fp32, header of a 3-D tensor
    prefill_up = result.bytes_up - result.decode_bytes_up - 2 * 28  # minus OPEN and CLOSE frames
    assert prefill_up == 9 * hidden * 4 + 40
    assert result.round_trips == 2 + 10  # open, prefill + 9 decode steps, close


def test_fp16_and_bf16_wires_halve_the_bytes(tiny_models):
    model = tiny_models["llama"]
    sizes = {}
    for wire in ("fp32", "fp16", "bf16"):
        result = SplitCausalLM(model, SplitPlan.lambda_split(1, 3), wire=wire).generate(_prompt(0), max_new_tokens=6, eos_token_ids=())
        sizes[wire] = result.bytes_per_decode_step[0]
    assert sizes["fp16"] == sizes["bf16"] == 32 * 2 + 40
    assert sizes["fp32"] == 32 * 4 + 40


def test_parts_keep_only_their_own_kv_cache(tiny_models):
    splittable = CausalLMSplittable(tiny_models["llama"])
    head, trunk, tail = apply(splittable, SplitPlan.lambda_split(1, 3))
    prompt = _prompt(3)
    tail(trunk(head(prompt)))
    assert [p.num_layers for p in (head, trunk, tail)] == [1, 2, 1]
    for part in (head, trunk, tail):
        assert len(part.cache.layers) == part.num_layers
        assert part.cache.get_seq_length() == prompt.shape[1] == part.seq_len
    clone = trunk.clone()
    assert clone.seq_len == 0 and clone.cache.get_seq_length() == 0
    assert clone.owner is trunk.owner  # shares weights, not state


def test_edge_parts_hold_no_cloud_layers_and_segment_names(tiny_models):
    splittable = CausalLMSplittable(tiny_models["gpt2"])
    assert splittable.segment_names == ["embed", "layer.0", "layer.1", "layer.2", "layer.3", "head"]
    head, trunk, tail = apply(splittable, SplitPlan.lambda_split(0, 4))
    assert head.name == "embed..embed" and head.num_layers == 0
    assert trunk.name == "layer.0..layer.3"
    assert tail.name == "head..head" and tail.num_layers == 0 and tail.cache is None


def test_first_part_must_stay_on_the_device(tiny_models):
    from splitveil.core.errors import PlanError

    with pytest.raises(PlanError, match="first part must run on the edge"):
        SplitCausalLM(tiny_models["llama"], SplitPlan((2,), ("cloud", "edge")))


def test_generation_restarts_cleanly(tiny_models):
    split = SplitCausalLM(tiny_models["qwen2"], SplitPlan.lambda_split(2, 3))
    first = split.generate(_prompt(0), max_new_tokens=12, eos_token_ids=())
    second = split.generate(_prompt(0), max_new_tokens=12, eos_token_ids=())
    assert first.token_ids == second.token_ids
    assert split.service is not None and not split.service.sessions  # each generation closed its session


def test_few_row_products_agree_with_linear_and_leave_other_shapes_alone():
    from splitveil.models.few_rows import FewRowsLinear, use_few_rows_products

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 1 << 16, bias=False), torch.nn.Linear(1 << 16, 32),
                                torch.nn.Linear(64, 32))
    reference = [copy.deepcopy(layer) for layer in model]
    use_few_rows_products(model)
    large, biased, small = model
    assert type(large) is FewRowsLinear and type(biased) is FewRowsLinear
    with torch.inference_mode():
        for rows in range(1, 10):
            for layer, plain in zip(model, reference):
                x = torch.randn(1, rows, layer.in_features)
                out = layer(x)
                assert out.shape == (1, rows, layer.out_features) and out.is_contiguous()
                torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-4)  # the kernel changes, not the rows
                if rows == 1 or rows > 8 or layer is small:
                    assert torch.equal(out, plain(x))  # one row, many rows, a small matrix: F.linear itself
        half = torch.nn.Linear(64, 1 << 16, bias=False).to(torch.bfloat16)
        plain_half = copy.deepcopy(half)
        use_few_rows_products(half)
        x = torch.randn(3, 64, dtype=torch.bfloat16)
        assert torch.equal(half(x), plain_half(x))  # only float32 takes the transposed product

