"""`--pad-to N`: the executor sees the prompt length rounded up to a multiple of N (dummy rows it computes on and
the trusted side drops), and the tokens are exactly those of the unpadded run."""

import numpy as np
import pytest
import torch

from splitveil.core.errors import ConfigError
from splitveil.edge.generate import SplitCausalLM
from splitveil.models.tiny import tiny_causal_lm
from splitveil.protect.slip.client import SlipClient
from splitveil.protect.slip.executor import SlipExecutorService
from splitveil.protect.slip.runtime import run_generation
from splitveil.protect.slip.trusted import SlipConfig, SlipModel
from splitveil.protect.slip.view import masked_view
from splitveil.transport.loopback import LoopbackTransport

PROMPT = [1, 5, 9, 3, 7, 2, 11]


def generate(*, pad_to: int, mode: str = "fixed", layers=(1, 3)):
    record = []
    slip = SlipModel(tiny_causal_lm("llama"), SlipConfig(mode=mode, rank=0, layers=layers, pad_to=pad_to),
                     generator=np.random.default_rng(0))
    service = SlipExecutorService(slip.executor_weights(), mode=mode)
    service.observers.append(record.append)
    transport = LoopbackTransport(service.handle)
    client = SlipClient(transport)
    client.open()
    result = run_generation(slip, None, client, transport, "", max_new_tokens=6, prompt_ids=PROMPT)
    return result, masked_view(record), slip


@pytest.mark.parametrize("mode", ["fixed", "float"])
@pytest.mark.parametrize("pad_to", [4, 16])
def test_padding_keeps_the_tokens_and_shows_the_executor_the_rounded_length(mode, pad_to):
    plain, plain_view, slip = generate(pad_to=1, mode=mode)
    padded, view, _ = generate(pad_to=pad_to, mode=mode)
    expected = SplitCausalLM(tiny_causal_lm("llama")).generate(PROMPT, max_new_tokens=6, eos_token_ids=()).token_ids
    assert padded["token_ids"] == plain["token_ids"] == expected
    rounded = -(-len(PROMPT) // pad_to) * pad_to
    assert padded["prompt_rows_seen_by_executor"] == rounded and plain["prompt_rows_seen_by_executor"] == len(PROMPT)
    for group in slip.groups:
        rows = [entry.values.shape[0] for entry in view if entry.group_id == group.group_id]
        assert rows == [rounded] + [1] * 5  # the prompt, rounded up; then one row per decode step
        assert [e.values.shape[0] for e in plain_view if e.group_id == group.group_id][0] == len(PROMPT)
    assert padded["pool_refills_during_generation"] == 0


def test_a_one_token_prompt_is_padded_too():
    slip = SlipModel(tiny_causal_lm("llama"), SlipConfig(rank=0, layers=(0, 1), pad_to=8), generator=np.random.default_rng(0))
    record = []
    service = SlipExecutorService(slip.executor_weights(), mode="fixed")
    service.observers.append(record.append)
    slip.attach(SlipClient(LoopbackTransport(service.handle)))
    with torch.no_grad():
        slip.model(torch.tensor([[5]]))
    assert {entry.values.shape[0] for entry in masked_view(record)} == {8}


def test_pad_to_must_be_positive():
    with pytest.raises(ConfigError, match="pad-to"):
        SlipConfig(pad_to=0)
