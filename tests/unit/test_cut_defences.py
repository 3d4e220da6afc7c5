"""Cut defences: strength 0 is the identity; the adaptive exact attack is measured through them."""

import pytest
import torch

from splitveil.attack.text.attacks import ExactInversion
from splitveil.edge.generate import SplitCausalLM
from splitveil.experiments.text_privacy import observe
from splitveil.metrics.text import token_recovery
from splitveil.plan.plan import SplitPlan
from splitveil.protect.cut import GaussianNoise, hkdf_seed


class _Ids:
    eos_token_id = None

    def decode(self, ids, **kwargs):
        return " ".join(map(str, ids))


def _prompt(seed, length=10):
    return torch.randint(3, 101, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_noise_at_strength_zero_is_the_identity(tiny_models):
    model = tiny_models["llama"]
    plan = SplitPlan.lambda_split(1, 3)
    plain = SplitCausalLM(model, plan).generate(_prompt(1), max_new_tokens=20, eos_token_ids=())
    defended = SplitCausalLM(model, plan, defence=GaussianNoise(0.0)).generate(_prompt(1), max_new_tokens=20, eos_token_ids=())
    assert defended.token_ids == plain.token_ids


def test_noise_changes_what_is_sent_and_is_keyed():
    hidden = torch.randn(1, 4, 32)
    a, b = GaussianNoise(0.5, key=b"k" * 32), GaussianNoise(0.5, key=b"k" * 32)
    assert torch.equal(a.apply(hidden), b.apply(hidden))  # same key, same noise
    assert not torch.equal(GaussianNoise(0.5).apply(hidden), GaussianNoise(0.5).apply(hidden))  # fresh keys differ
    sent = a.apply(hidden)
    ratio = float((sent - hidden).pow(2).mean().sqrt() / hidden.pow(2).mean().sqrt())
    assert 0.4 < ratio < 0.6
    assert hkdf_seed(b"key", b"x") != hkdf_seed(b"key", b"y")


def test_adaptive_exact_attack_sees_through_small_noise(tiny_models):
    """The attacker knows the noise scale; the true token's state stays the closest."""
    prompt = _prompt(5)
    lm = SplitCausalLM(tiny_models["llama"], SplitPlan.lambda_split(1, 3), defence=GaussianNoise(0.1))
    lm.tokenizer = _Ids()
    seen = observe(lm, prompt, 4)
    attack = ExactInversion(lm.stages[0].stage, candidates=16, tolerance=0.15)
    assert token_recovery(prompt, attack.reconstruct(seen.uplink[: len(prompt)])) >= 0.8


def test_permutation_round_trips_exactly():
    from splitveil.protect.cut import HiddenPermutation

    hidden = torch.randn(2, 5, 32)
    defence = HiddenPermutation(1.0)
    sent = defence.apply(hidden)
    assert not torch.equal(sent, hidden)
    assert torch.equal(defence.unapply(sent), hidden)
    assert torch.equal(HiddenPermutation(0.0).apply(hidden), hidden)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_permuted_trunk_gives_the_unsplit_tokens(tiny_models, family):
    from splitveil.protect.cut import HiddenPermutation

    model = tiny_models[family]
    plan = SplitPlan.lambda_split(1, 3)
    plain = SplitCausalLM(model).generate(_prompt(2), max_new_tokens=20, eos_token_ids=())
    defence = HiddenPermutation(1.0)
    lm = SplitCausalLM(model, plan, defence=defence)
    assert lm.generate(_prompt(2), max_new_tokens=20, eos_token_ids=()).token_ids == plain.token_ids
    assert lm.service.parts[1].owner.model is not model  # the cloud got a permuted copy, not the public weights


def test_adaptive_attacker_recovers_the_permutation_from_the_cloud_weights(tiny_models):
    from splitveil.protect.cut import HiddenPermutation, recover_permutation

    model = tiny_models["llama"]
    defence = HiddenPermutation(1.0)
    lm = SplitCausalLM(model, SplitPlan.lambda_split(1, 3), defence=defence)
    cloud = lm.service.parts[1]
    guess = recover_permutation(lm.splittable.layers[1], cloud.owner.layers[1])
    assert torch.equal(guess, defence.permutation)
    lm.tokenizer = _Ids()
    prompt = _prompt(9)
    seen = observe(lm, prompt, 4)
    unpermuted = seen.uplink[: len(prompt)][..., torch.argsort(guess)]
    assert ExactInversion(lm.stages[0].stage, candidates=16).reconstruct(unpermuted) == prompt
