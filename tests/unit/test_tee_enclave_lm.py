"""The Λ-split trunk behind the sealed channel (in process, loopback frames, tiny Llama): greedy tokens identical to
unsplit; what the host relays holds no hidden state, and the exact attack on it recovers nothing, while the same
attack on the clear uplink recovers the prompt."""

from __future__ import annotations

import pytest
import torch

from splitveil.edge.generate import GenerationConfig, SplitCausalLM
from splitveil.models.causal_lm import CausalLMSplittable
from splitveil.models.tiny import tiny_causal_lm
from splitveil.plan.plan import SplitPlan, apply
from splitveil.serve.service import PartService
from splitveil.tee.channel import AttestationKey, SealError
from splitveil.experiments.tee_partition import attack_observed
from splitveil.tee.enclave_lm import trunk_measurement
from splitveil.tee.executor import SealedFrameService, SealedTransport
from splitveil.transport.loopback import LoopbackTransport

CUTS = (1, 3)


@pytest.fixture(scope="module")
def deployment():
    torch.manual_seed(0)
    model = tiny_causal_lm("llama")
    splittable = CausalLMSplittable(model)
    parts = apply(splittable, SplitPlan.lambda_split(*CUTS))
    for part in parts:
        part.last_logits_only = True
    inner = PartService({1: parts[1]}, hidden_size=splittable.hidden_size, info={"cuts": list(CUTS)})
    key = AttestationKey.generate()
    measurement = trunk_measurement(splittable, "tiny", CUTS)
    observed: list[bytes] = []
    service = SealedFrameService(inner, attestation=key, measurement=measurement, observed=observed)
    return model, key, measurement, service, observed


def sealed_lm(deployment, measurement=None):
    model, key, expected, service, _ = deployment
    public = AttestationKey.from_public_bytes(key.public_bytes())
    transport = SealedTransport(LoopbackTransport(service.handle), attestation=public,
                                expected_measurement=measurement or expected)
    return SplitCausalLM(model, SplitPlan.lambda_split(*CUTS), transport=transport)


def test_sealed_trunk_gives_the_unsplit_tokens_and_the_host_sees_ciphertext(deployment):
    model, _, _, _, observed = deployment
    prompt = torch.tensor([[1, 5, 9, 23, 4, 17, 30, 2]])
    config = GenerationConfig(max_new_tokens=10)
    lm = sealed_lm(deployment)
    sealed = lm.generate(prompt, config)
    assert sealed.token_ids == SplitCausalLM(model).generate(prompt, config).token_ids
    relayed = b"".join(observed)
    with torch.no_grad():
        uplink = lm.stages[0].forward(prompt)[0]  # [T, H]: what a plain Λ-split would send
    assert uplink[0].numpy().tobytes()[:32] not in relayed
    seen = attack_observed(lm, relayed, prompt[0].tolist(), rows=8, budget=64)
    assert seen["token_recovery_clear_control"] == 1.0
    assert seen["plausible_rows"] == 0 and seen["token_recovery_observed"] <= 0.25


def test_trunk_of_other_weights_is_refused(deployment):
    with pytest.raises(SealError, match="expected"):
        sealed_lm(deployment, measurement=b"x" * 32).generate(torch.tensor([[1, 2, 3]]), GenerationConfig(max_new_tokens=1))
