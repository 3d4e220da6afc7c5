"""Cut defences: strength 0 is the identity; the adaptive exact attack is measured through them."""

import pytest
import torch

from splitveil.attack.text.attacks import ExactInversion
from splitveil.edge.generate import SplitCausalLM
from splitveil.protect.text import observe
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
    """The attacker knows the noise scale; with the tolerance the experiments use (the noise adaptation's, on the
    wire's own), the true token's state stays within reach."""
    from splitveil.attack.text.adaptive import adaptation_for, noise_tolerance

    prompt = _prompt(5)
    lm = SplitCausalLM(tiny_models["llama"], SplitPlan.lambda_split(1, 3), defence=GaussianNoise(0.1))
    lm.tokenizer = _Ids()
    seen = observe(lm, prompt, 4)
    options = adaptation_for("noise", 0.1, "fp32").attack_options("exact")  # what run_text_attack passes
    assert options["tolerance"] == noise_tolerance(0.1, "fp32") < 0.15
    attack = ExactInversion(lm.stages[0].stage, candidates=16, **options)
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


def test_randomised_cut_at_strength_zero_keeps_the_plan(tiny_models):
    from splitveil.protect.cut import RandomisedCut

    plan = SplitPlan.lambda_split(1, 3)
    lm = SplitCausalLM(tiny_models["llama"], plan, defence=RandomisedCut(0))
    assert lm.plan == plan
    assert lm.generate(_prompt(3), max_new_tokens=12, eos_token_ids=()).token_ids == \
        SplitCausalLM(tiny_models["llama"], plan).generate(_prompt(3), max_new_tokens=12, eos_token_ids=()).token_ids


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_randomised_cut_gives_the_unsplit_tokens_at_every_drawn_depth(tiny_models, family):
    from splitveil.protect.cut import RandomisedCut

    model = tiny_models[family]
    plain = SplitCausalLM(model).generate(_prompt(4), max_new_tokens=16, eos_token_ids=()).token_ids
    depths = set()
    for key in range(12):  # session keys; each draws its own depth in 0..2
        defence = RandomisedCut(2, key=bytes([key]) * 32)
        lm = SplitCausalLM(model, SplitPlan.lambda_split(0, 3), defence=defence)
        depths.add(lm.plan.cuts[0])
        assert lm.plan.cuts == (defence.offset, 3)
        assert lm.service.parts[1].first_layer == defence.offset  # the cloud runs exactly the layers after the cut
        assert lm.generate(_prompt(4), max_new_tokens=16, eos_token_ids=()).token_ids == plain
    assert depths == {0, 1, 2}  # the key decides the depth, and every depth is drawn


def test_randomised_cut_refuses_a_strength_that_reaches_the_tail(tiny_models):
    from splitveil.core.errors import ConfigError
    from splitveil.protect.cut import RandomisedCut

    with pytest.raises(ConfigError, match="into the tail"):
        SplitCausalLM(tiny_models["llama"], SplitPlan.lambda_split(1, 3), defence=RandomisedCut(2))
    with pytest.raises(ConfigError, match="number of layers"):
        RandomisedCut(1.5)


def test_blind_attacker_finds_the_randomised_depth(tiny_models):
    """An eavesdropper not told the depth tries every candidate: only the true one reproduces the states."""
    from splitveil.attack.text.adaptive import identify_cut_depth
    from splitveil.protect.cut import RandomisedCut

    model = tiny_models["llama"]
    for key in (b"a" * 32, b"c" * 32):
        defence = RandomisedCut(2, key=key)
        lm = SplitCausalLM(model, SplitPlan.lambda_split(0, 3), defence=defence)
        lm.tokenizer = _Ids()
        prompt = _prompt(7)
        seen = observe(lm, prompt, 2)
        found, residuals = identify_cut_depth(lm.splittable, seen.uplink[: len(prompt)], range(0, 3), candidates=32)
        assert found == defence.offset and residuals[found] < 1e-4
        assert min(r for d, r in residuals.items() if d != found) > 1e-2


def test_randcut_secret_recovery_is_measured_not_assumed(tiny_models, monkeypatch):
    """Whether the attacker recovered a randomised cut's depth is the blind search's answer compared with the
    session's true depth: right when the search finds it, wrong when the search misses."""
    from splitveil.attack.text import adaptive
    from splitveil.protect.cut import RandomisedCut

    adaptation = adaptive.adaptation_for("randcut", 2)
    defence = RandomisedCut(2, key=b"c" * 32)
    lm = SplitCausalLM(tiny_models["llama"], SplitPlan.lambda_split(0, 3), defence=defence)
    lm.tokenizer = _Ids()
    prompt = _prompt(7)
    seen = observe(lm, prompt, 2)
    _, secret = adaptation.session(lm, defence, defence.offset)
    assert secret is None  # nothing is assumed before the search
    probe = adaptation.probe(lm, seen.uplink[: len(prompt)], 0)
    assert probe["identified_depth"] == defence.offset
    assert adaptation.secret_recovered(probe, defence.offset) is True
    wrong = (defence.offset + 1) % 3
    monkeypatch.setattr(adaptive, "identify_cut_depth", lambda *args, **kwargs: (wrong, {}))
    missed = adaptation.probe(lm, seen.uplink[: len(prompt)], 0)
    assert adaptation.secret_recovered(missed, defence.offset) is False
    assert adaptive.adaptation_for("permute", 1).secret_recovered(None, 1) is None


def test_split_scoring_matches_the_unsplit_model_and_perplexity_is_finite(tiny_models):
    from splitveil.protect.text import heldout_perplexity
    from splitveil.metrics.text import mean_nll

    model = tiny_models["llama"]
    ids = _prompt(8, length=14)
    unsplit = model(input_ids=torch.tensor([ids])).logits[0].detach()
    lm = SplitCausalLM(model, SplitPlan.lambda_split(1, 3))
    assert torch.allclose(lm.score(ids), unsplit, atol=1e-5)
    assert torch.allclose(SplitCausalLM(model).score(ids), unsplit, atol=1e-6)
    nll, count = mean_nll(unsplit, ids)
    expected = torch.nn.functional.cross_entropy(unsplit[:-1], torch.tensor(ids[1:]), reduction="sum")
    assert count == 13 and abs(nll - float(expected)) < 1e-4
    plain = heldout_perplexity(lm, [ids])
    noisy = heldout_perplexity(SplitCausalLM(model, SplitPlan.lambda_split(1, 3), defence=GaussianNoise(1.0)), [ids])
    assert 1 < plain < 1e4 and noisy != plain
    assert lm.score(ids).shape == unsplit.shape and lm.service.sessions == {}  # the scoring session was closed


def test_learned_attacker_trained_on_its_own_noise_reads_noisy_states():
    from splitveil.attack.text.adaptive import noise_augmenter
    from splitveil.attack.text.learned import LearnedInversion
    from splitveil.attack.training import StopRule
    from splitveil.models.tiny import tiny_causal_lm

    model = tiny_causal_lm("llama", weight_scale=4.0)
    lm = SplitCausalLM(model, SplitPlan.lambda_split(1, 3), defence=GaussianNoise(0.3))
    lm.tokenizer = _Ids()
    corpus = [torch.randint(3, 101, (24,), generator=torch.Generator().manual_seed(2000 + i)).tolist() for i in range(120)]
    attack = LearnedInversion(lm.stages[0].stage, corpus, stop=StopRule(patience=5), augment=noise_augmenter(0.3, seed=5))
    prompt = _prompt(11, length=20)
    seen = observe(lm, prompt, 2)
    assert token_recovery(prompt, attack.reconstruct(seen.uplink[: len(prompt)])) >= 0.3  # chance is 1/98


def test_each_defence_has_its_adaptive_attacker_and_strength_0_adapts_nothing():
    from splitveil.attack.text.adaptive import ADAPTATIONS, Adaptation, adaptation_for
    from splitveil.protect.cut import CUT_DEFENCES
    from splitveil.protect.text import deployment_for

    assert {deployment_for(name) for name in CUT_DEFENCES.names()} <= set(ADAPTATIONS)
    assert adaptation_for("noise", 0.5).attack_options("exact")["tolerance"] > 0.4
    assert "augment" in adaptation_for("noise", 0.5).attack_options("learned")
    assert adaptation_for("noise", 0.0).attack_options("exact") == {}
    assert type(adaptation_for(None)) is Adaptation
    states = torch.randn(3, 8)
    undo, secret = adaptation_for("permute", 0).session(None, None, 1)
    assert torch.equal(undo(states), states) and secret is None
    assert adaptation_for("randcut", 0).probe(None, states, 1) is None
