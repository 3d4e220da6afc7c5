"""SLIP on the real SmolLM2 (slow: loads the model twice): exactness of both variants on a few layers."""

import numpy as np
import pytest
import torch

from splitveil.protect.slip.client import SlipClient
from splitveil.protect.slip.executor import SlipExecutorService
from splitveil.protect.slip.trusted import SlipConfig, SlipModel
from splitveil.transport.loopback import LoopbackTransport

pytestmark = [pytest.mark.slow, pytest.mark.model]


@pytest.mark.parametrize("mode", ["fixed", "float"])
def test_smollm2_protected_layers_are_exact(smollm2, mode):
    from splitveil.models.loading import load_causal_lm

    plain, tokenizer = smollm2
    model, _ = load_causal_lm("smollm2-135m", with_tokenizer=False)
    slip = SlipModel(model, SlipConfig(mode=mode, rank=0, layers=(2, 5)), generator=np.random.default_rng(0))
    slip.attach(SlipClient(LoopbackTransport(SlipExecutorService(slip.executor_weights(), mode=mode).handle)))
    ids = torch.tensor([tokenizer("My blood test came back with an LDL of 190.")["input_ids"]])
    with torch.no_grad():
        masked = slip.model(ids).logits
        reference = plain(ids).logits
        with slip.reference():
            clear = slip.model(ids).logits
    relative = float((masked - reference).abs().max() / reference.abs().max())
    if mode == "fixed":
        assert torch.equal(masked, clear)
        assert relative < 1e-3
    else:
        assert relative < 1e-4


def test_text_attacks_on_the_prompt_deployment_view_read_nothing():
    from splitveil.experiments.slip_eval import slip_text_attack

    prompt = "My social security number is 512-44-9087; can you check whether this form is filled in correctly?"
    for attack, options in (("nearest", {}), ("exact", {"max_verified": 512})):
        result = slip_text_attack("smollm2-135m", (2, 28), attack, [prompt], max_new_tokens=2, **options)
        assert result["token_recovery"] <= 0.05
