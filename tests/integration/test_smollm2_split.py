"""The real SmolLM2-135M-Instruct: split == unsplit, over several cuts, and what crosses each cut."""

import pytest
import torch

from splitveil.edge.generate import SplitCausalLM
from splitveil.plan.plan import SplitPlan

pytestmark = pytest.mark.model

PROMPT = "Write a long, detailed note to my doctor about my blood pressure readings this week:"
NEW_TOKENS = 32
CUTS = [(2, 28), (1, 29), (8, 22), (15, 16), (0, 30), (4,)]


@pytest.fixture(scope="module")
def reference(smollm2):
    model, tokenizer = smollm2
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def test_reference_generates_all_tokens(reference):
    assert len(reference) == NEW_TOKENS  # no early end-of-sequence: every comparison covers 32 tokens


@pytest.mark.parametrize("cuts", CUTS, ids=lambda c: ",".join(map(str, c)))
def test_split_greedy_tokens_equal_transformers_generate(smollm2, reference, cuts):
    model, tokenizer = smollm2
    result = SplitCausalLM(model, SplitPlan.from_cuts(cuts), tokenizer=tokenizer).generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == reference


def test_unsplit_runner_equals_transformers_generate(smollm2, reference):
    model, tokenizer = smollm2
    assert SplitCausalLM(model, tokenizer=tokenizer).generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids == reference


def test_split_logits_equal_unsplit_logits(smollm2):
    model, tokenizer = smollm2
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.inference_mode():
        unsplit = model(ids).logits
    for cuts in [(2, 28), (8, 22)]:
        split = SplitCausalLM(model, SplitPlan.from_cuts(cuts)).forward_logits(ids)
        torch.testing.assert_close(split, unsplit, rtol=0, atol=1e-5)


def test_fp16_and_bf16_wire_logit_error_is_small_and_reported(smollm2, record_property):
    model, tokenizer = smollm2
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.inference_mode():
        unsplit = model(ids).logits
    errors = {}
    for wire in ("fp16", "bf16"):
        split = SplitCausalLM(model, SplitPlan.lambda_split(2, 28), wire=wire).forward_logits(ids)
        errors[wire] = float((split - unsplit).abs().max())
        record_property(f"max_logit_diff_{wire}", errors[wire])
    print(f"max |logit difference| vs unsplit at cuts 2,28: fp16 {errors['fp16']:.4f}, bf16 {errors['bf16']:.4f}")
    assert 0 < errors["fp16"] < 0.1  # nonzero: the codec really rounds; small: hidden states survive fp16
    assert errors["fp16"] < errors["bf16"]  # bf16 keeps fewer mantissa bits


def test_bytes_per_decode_step_are_hidden_size_times_element_size_plus_header(smollm2):
    model, tokenizer = smollm2
    for wire, element in (("fp32", 4), ("fp16", 2)):
        result = SplitCausalLM(model, SplitPlan.lambda_split(2, 28), tokenizer=tokenizer, wire=wire).generate(PROMPT, max_new_tokens=8)
        up, down = result.bytes_per_decode_step
        assert up == down == 576 * element + 40  # header: 28 fixed + 3 x 4 shape bytes


def test_chat_template_and_stop_strings(smollm2):
    model, tokenizer = smollm2
    lm = SplitCausalLM(model, SplitPlan.lambda_split(2, 28), tokenizer=tokenizer)
    answer = lm.generate("What is the capital of France?", chat=True, max_new_tokens=30)
    assert "Paris" in answer.text and answer.finish_reason == "eos"
    stopped = lm.generate("What is the capital of France?", chat=True, max_new_tokens=30, stop=("Paris",))
    assert stopped.finish_reason == "stop" and "Paris" not in stopped.text
    assert len(stopped.token_ids) < len(answer.token_ids)


BATCH_PROMPTS = [PROMPT, "What is the capital of France?", "1, 2, 3, 4, 5,", "Once upon a time, in a small village by the sea, there lived"]


@torch.inference_mode()
@pytest.mark.parametrize("padded_row_bytes", [0, 2**40], ids=["per-row-attention", "padded-attention"])
def test_batched_steps_equal_single_steps_and_unsplit_greedy_tokens(smollm2, padded_row_bytes, monkeypatch):
    """Four sessions of different lengths: trunk and tail steps batched (as the service runs them) against single
    steps (states) and against greedy decoding of the unsplit model (tokens; past end-of-sequence too)."""
    from splitveil.models import kv_cache
    from splitveil.models.causal_lm import CausalLMSplittable, forward_batched_step
    from splitveil.plan.plan import apply

    monkeypatch.setattr(kv_cache, "PADDED_ROW_BYTES", padded_row_bytes)
    model, tokenizer = smollm2
    steps = 10
    splittable = CausalLMSplittable(model)
    single = [apply(splittable, SplitPlan.from_cuts((2, 28))) for _ in BATCH_PROMPTS]
    batched = [apply(splittable, SplitPlan.from_cuts((2, 28))) for _ in BATCH_PROMPTS]
    prompts = [torch.tensor([tokenizer(p)["input_ids"]]) for p in BATCH_PROMPTS]
    tokens = []
    for ids, s_parts, b_parts in zip(prompts, single, batched):
        s_parts[2](s_parts[1](s_parts[0](ids)))
        tokens.append([int(b_parts[2](b_parts[1](b_parts[0](ids)))[0, -1].argmax())])
    for _ in range(steps):
        heads = torch.cat([parts[0](torch.tensor([[t[-1]]])) for parts, t in zip(batched, tokens)])
        trunk_out = forward_batched_step([parts[1] for parts in batched], heads)
        logits = forward_batched_step([parts[2] for parts in batched], trunk_out)
        for row, (parts, t) in enumerate(zip(single, tokens)):
            single_trunk = parts[1](parts[0](torch.tensor([[t[-1]]])))
            torch.testing.assert_close(trunk_out[row : row + 1], single_trunk, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(logits[row : row + 1], parts[2](single_trunk), rtol=1e-4, atol=1e-4)
            t.append(int(logits[row, -1].argmax()))
    for ids, t in zip(prompts, tokens):
        reference = ids
        for _ in range(steps + 1):
            reference = torch.cat([reference, model(reference).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert t == reference[0, ids.shape[1]:].tolist()
    assert len({tuple(t) for t in tokens}) == len(tokens)


def test_trunk_state_bytes_count_its_own_positions(smollm2):
    from splitveil.models.causal_lm import CausalLMSplittable
    from splitveil.plan.plan import apply

    model, tokenizer = smollm2
    trunk = apply(CausalLMSplittable(model), SplitPlan.from_cuts((2, 28)))[1]
    assert trunk.state_bytes() == 0
    trunk(torch.randn(1, 100, 576))
    per_position = 26 * 2 * 3 * 64 * 4  # layers x (keys, values) x kv heads x head dim x fp32
    assert per_position * 100 <= trunk.state_bytes() <= per_position * 150
