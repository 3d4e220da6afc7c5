"""The sizes where offloading matters (slow: they generate gigabytes of dummy weights on first use; run with
`pytest -m slow tests/integration/test_large_dummy.py`): the 1B-shaped dummy Llama splits exactly in bf16, and the
8B-shaped one's trunk loads alone in bf16 (about 12 GB, nothing else of the model) and steps."""

import pytest
import torch

from splitveil.edge.generate import GenerationConfig, SplitCausalLM
from splitveil.plan.plan import SplitPlan

pytestmark = [pytest.mark.slow, pytest.mark.model]


def test_the_1b_shape_splits_exactly_in_bf16():
    from splitveil.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm("llama-1b", load_format="dummy", dtype="bfloat16")
    config = GenerationConfig(max_new_tokens=6)
    prompt = "The three most common causes of a headache are"
    unsplit = SplitCausalLM(model, None, tokenizer=tokenizer).generate(prompt, config).token_ids
    assert SplitCausalLM(model, SplitPlan.lambda_split(2, 14), tokenizer=tokenizer).generate(prompt, config).token_ids == unsplit


def test_the_8b_trunk_alone_loads_in_bf16_and_steps():
    from splitveil.plan.parts import load_causal_lm_parts
    from splitveil.plan.plan import apply

    splittable, plan = load_causal_lm_parts("llama-8b", (2, 30), (1,), load_format="dummy", dtype="bfloat16")
    held = {id(p): p for p in splittable.model.parameters() if p.device.type != "meta"}
    assert all(p.dtype == torch.bfloat16 for p in held.values())
    held_bytes = sum(p.numel() * p.element_size() for p in held.values())
    assert 11.5e9 < held_bytes < 12.5e9  # 28 of 32 layers; no embedding, no LM head
    trunk = apply(splittable, plan)[1]
    out = trunk(torch.randn(1, 5, splittable.hidden_size))
    for _ in range(2):
        out = trunk(torch.randn(1, 1, splittable.hidden_size))
    assert out.shape == (1, 1, 4096) and out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    assert trunk.positions == 7
