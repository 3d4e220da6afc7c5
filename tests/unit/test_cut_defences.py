"""Cut defences: strength 0 is the identity; the adaptive exact attack is measured through them."""

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
