"""Speculative decoding across the split: drafters, the acceptance rule, the draft policy, rollback of
every kind of stage, and the end-to-end promise: greedy output unchanged, sampled output with the distribution of
sequential sampling (checked against the exact distribution, computed by enumeration on a tiny model)."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from splitveil.core.errors import ConfigError
from splitveil.edge.generate import GenerationConfig, SplitCausalLM
from splitveil.edge.sampling import token_probabilities
from splitveil.edge.speculative import DraftPolicy, PromptLookup, Sampling, accept
from splitveil.models.tiny import tiny_causal_lm
from splitveil.plan.plan import SplitPlan


@pytest.fixture(scope="module")
def tiny():
    return tiny_causal_lm("llama")


# -- drafters ------------------------------------------------------------------------------------------------------

def test_prompt_lookup_drafts_what_followed_the_latest_occurrence():
    drafter = PromptLookup(max_ngram=3)
    context = [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 8, 2, 3, 4]
    assert drafter.draft(context, 3, Sampling()) == ([6, 7, 8], None)  # the latest [2, 3, 4], not the first
    assert drafter.draft(context, 1, Sampling()) == ([6], None)
    assert drafter.draft([1, 2, 3], 4, Sampling()) == ([], None)  # nothing repeats
    assert drafter.draft([5, 1, 7, 1], 2, Sampling()) == ([7, 1], None)  # falls back to shorter n-grams


def test_prompt_lookup_drafts_past_a_replaced_token():
    # the answer copies [1, 2, 3, 4, 5, ...] but wrote 9 where the text has 4 (a rewrite's "friday" -> "Friday")
    context = [1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 9]
    drafter = PromptLookup(max_ngram=3)
    assert drafter.draft(context, 3, Sampling()) == ([5, 6, 7], None)
    assert drafter.source == "subst-3"
    assert drafter.draft(context + [5], 2, Sampling()) == ([6, 7], None) and drafter.source == "ngram-1"
    assert PromptLookup(max_ngram=3, substitution=False).draft(context, 3, Sampling()) == ([], None)
    assert drafter.draft([0, 2, 3, 4, 5, 8, 2, 3, 9], 3, Sampling()) == ([], None)  # a 2-token match: no guess
    assert drafter.draft([1, 2, 3, 1, 2, 3, 7], 3, Sampling()) == ([2, 3], None)  # stops before the replacing token


def test_prompt_lookup_checks_its_settings():
    with pytest.raises(ConfigError, match="min_ngram"):
        PromptLookup(max_ngram=1, min_ngram=2)


def test_self_drafter_needs_a_lambda_split(tiny):
    lm = SplitCausalLM(tiny, SplitPlan.from_cuts((2,)))
    with pytest.raises(ConfigError, match="Λ-split"):
        lm.generate([5, 6, 7], max_new_tokens=4, speculate="self")


def test_unknown_drafter_and_bad_draft_length_are_refused():
    with pytest.raises(ConfigError, match="drafter"):
        GenerationConfig(speculate="oracle")
    with pytest.raises(ConfigError, match="draft_tokens"):
        GenerationConfig(speculate="prompt-lookup", draft_tokens=0)
    with pytest.raises(ConfigError, match="adaptive or fixed"):
        GenerationConfig(speculate="prompt-lookup", draft_policy="greedy")


# -- the acceptance rule -------------------------------------------------------------------------------------------

def test_greedy_acceptance_keeps_the_agreeing_prefix_and_adds_the_models_token():
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 4, 9, 1]):
        logits[row, best] = 5.0
    assert accept(logits, [3, 4, 5], None, Sampling()) == [3, 4, 9]  # third draft rejected: the model's 9 instead
    assert accept(logits, [3, 4, 9], None, Sampling()) == [3, 4, 9, 1]  # all accepted, plus the bonus token
    assert accept(logits, [7, 4, 9], None, Sampling()) == [3]


@pytest.mark.parametrize("drafter_q", ["one-hot", "distribution"])
def test_sampled_acceptance_has_the_models_distribution(drafter_q):
    """The first token a pass yields is distributed as p, whatever the drafter proposed (exact rule, large sample)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5], [0.0] * 6])
    sampling = Sampling(do_sample=True, temperature=0.8, top_k=5, generator=generator)
    p = sampling.probabilities(logits[0])
    q_dist = torch.tensor([0.05, 0.5, 0.05, 0.3, 0.05, 0.05])
    trials = 20000
    counts = torch.zeros(6)
    for _ in range(trials):
        if drafter_q == "one-hot":
            draft, q = 3, None  # a token the model rarely picks
        else:
            draft = int(torch.multinomial(q_dist, 1, generator=generator))
            q = q_dist.unsqueeze(0)
        counts[accept(logits, [draft], q, sampling)[0]] += 1
    kept = p > 0
    assert counts[~kept].sum() == 0  # top-k's excluded token is never produced
    assert chisquare(counts[kept].numpy(), (p[kept] * trials).numpy()).pvalue > 1e-3


# -- the draft length ----------------------------------------------------------------------------------------------

def test_draft_policy_drafts_while_drafts_pay_and_stops_when_they_do_not():
    policy = DraftPolicy(6)
    assert policy.budget(100) == 6 and policy.budget(3) == 2  # a pass yields its drafts plus the model's token
    assert policy.choose(6, "ngram-3") > 0  # nothing measured yet: an even chance of acceptance is worth a few
    for _ in range(20):  # one source's drafts are all rejected, the other's all accepted
        policy.update("ngram-1", 2, 0, 0.12)
        policy.update("ngram-3", 3, 3, 0.12)
        policy.update("ngram-3", 0, 0, 0.10)
    assert policy.choose(6, "ngram-1") == 0  # backs off: at 1 in 22 a position costs more than it saves
    probes = [policy.choose(6, "ngram-1") for _ in range(2 * policy.probe_every)]
    assert sorted(probes) == [0] * (2 * policy.probe_every - 2) + [1, 1]  # one draft now and then keeps it measured
    assert policy.choose(6, "ngram-3") == 6  # every draft accepted, a position costs 7% of a step: draft them all
    assert policy.choose(2, "ngram-3") == 2  # never more than the drafter found
    with pytest.raises(ConfigError, match="draft-tokens"):
        DraftPolicy(0)


def test_draft_policy_drafts_more_over_a_slow_link():
    """Same acceptance (one draft in two): where a round trip dominates a pass, drafting pays; where each verified
    position costs nearly a whole step (a compute-bound cloud on loopback), it does not."""
    def chosen(plain_seconds, per_position_seconds):
        policy = DraftPolicy(8)
        for _ in range(10):
            policy.update("ngram-2", 2, 1, plain_seconds + 2 * per_position_seconds)
            policy.update("ngram-2", 0, 0, plain_seconds)
        return policy.choose(8, "ngram-2")

    assert chosen(0.160, 0.005) >= 3  # 80 ms link: positions nearly free
    assert chosen(0.010, 0.010) == 0  # loopback, compute-bound: a position costs a step


# -- rollback of each kind of stage --------------------------------------------------------------------------------

@pytest.mark.parametrize("cuts", [None, (1, 3), (2,)])
def test_truncated_split_continues_like_one_that_never_saw_the_rejected_positions(tiny, cuts):
    plan = SplitPlan.from_cuts(cuts) if cuts else None
    lm = SplitCausalLM(tiny, plan)
    lm._begin()
    try:
        lm.step(torch.tensor([[5, 6, 7, 8]]))
        lm.step(torch.tensor([[40, 41, 42]]))  # three positions to reject
        lm.truncate(4)
        rolled_back = lm.step(torch.tensor([[9]]))
    finally:
        lm._end()
    fresh = SplitCausalLM(tiny, plan)
    fresh._begin()
    try:
        expected = fresh.step(torch.tensor([[5, 6, 7, 8, 9]]))
    finally:
        fresh._end()
    torch.testing.assert_close(rolled_back, expected, rtol=1e-4, atol=1e-5)


def test_truncate_beyond_what_is_held_is_refused(tiny):
    lm = SplitCausalLM(tiny, SplitPlan.from_cuts((1, 3)))
    lm._begin()
    try:
        lm.step(torch.tensor([[5, 6]]))
        with pytest.raises(ConfigError, match="cannot keep 3"):
            lm.truncate(3)
    finally:
        lm._end()


def test_speculation_is_refused_where_it_cannot_hold(tiny):
    lm = SplitCausalLM(tiny, SplitPlan.from_cuts((2,)))  # edge|cloud: the LM head runs remotely
    with pytest.raises(ConfigError, match="LM head"):
        lm.generate([5, 6, 7], max_new_tokens=4, speculate="prompt-lookup")
    sliding = SplitCausalLM(tiny_causal_lm("gemma2"), SplitPlan.from_cuts((1, 3)))
    with pytest.raises(ConfigError, match="roll"):
        sliding.generate([5, 6, 7], max_new_tokens=4, speculate="prompt-lookup")


# -- end to end ----------------------------------------------------------------------------------------------------

REPEATING = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7]


@pytest.mark.parametrize("policy", ["fixed", "adaptive"])
@pytest.mark.parametrize("cuts, drafter", [(None, "prompt-lookup"), ((1, 3), "prompt-lookup"), ((1, 3), "self")])
def test_greedy_speculation_equals_sequential_decoding(tiny, cuts, drafter, policy):
    lm = SplitCausalLM(tiny, SplitPlan.from_cuts(cuts) if cuts else None)
    for prompt in (REPEATING, [3, 50, 4, 60, 9]):
        sequential = lm.generate(prompt, max_new_tokens=24)
        fast = lm.generate(prompt, max_new_tokens=24, speculate=drafter, draft_tokens=4, draft_policy=policy)
        assert fast.token_ids == sequential.token_ids
        assert fast.speculation["passes"] <= sequential.decode_tokens
        assert fast.decode_tokens == len(fast.token_ids) - 1


def test_speculation_stops_at_eos_and_max_tokens_like_sequential_decoding(tiny):
    lm = SplitCausalLM(tiny, SplitPlan.from_cuts((1, 3)))
    sequential = lm.generate(REPEATING, max_new_tokens=20)
    eos = sequential.token_ids[7]
    ended = lm.generate(REPEATING, max_new_tokens=20, eos_token_ids=(eos,))
    fast = lm.generate(REPEATING, max_new_tokens=20, eos_token_ids=(eos,), speculate="prompt-lookup",
                       draft_policy="fixed")
    assert fast.token_ids == ended.token_ids and fast.finish_reason == ended.finish_reason == "eos"
    assert len(lm.generate(REPEATING, max_new_tokens=5, speculate="prompt-lookup").token_ids) == 5


def _exact_distribution(model, prompt: list[int], sampling: Sampling, length: int) -> dict[tuple[int, ...], float]:
    """Probability of every sequence of `length` sampled tokens, by enumeration (top-k keeps this small)."""
    table = {(): 1.0}
    for _ in range(length):
        grown = {}
        for sequence, probability in table.items():
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([prompt + list(sequence)])).logits[0, -1]
            p = sampling.probabilities(logits)
            for token in torch.nonzero(p).flatten().tolist():
                grown[sequence + (token,)] = probability * float(p[token])
        table = grown
    return table


@pytest.mark.parametrize("drafter", ["prompt-lookup", "self"])
def test_sampled_speculation_has_the_distribution_of_sequential_sampling(tiny, drafter):
    """Three sampled tokens, 1,200 runs: the empirical distribution of (t2, t3), which speculative passes produce,
    against the exact one of sequential sampling (chi-square goodness of fit)."""
    prompt = [3 + (7 * i) % 98 for i in range(98)] + [5, 6]  # every token once: prompt lookup always drafts
    settings = dict(do_sample=True, temperature=1.5, top_k=3)
    exact = _exact_distribution(tiny, prompt, Sampling(**settings), 3)
    tail = {}
    for sequence, probability in exact.items():
        tail[sequence[1:]] = tail.get(sequence[1:], 0.0) + probability
    lm = SplitCausalLM(tiny, SplitPlan.from_cuts((1, 3)))
    runs = 800
    counts = dict.fromkeys(tail, 0)
    drafted = 0
    for seed in range(runs):
        result = lm.generate(prompt, max_new_tokens=3, eos_token_ids=(), seed=seed, speculate=drafter, draft_tokens=2,
                             draft_policy="fixed", **settings)
        counts[tuple(result.token_ids[1:])] += 1
        drafted += result.speculation["drafted"]
    assert drafted > runs // 4  # drafts were really verified (often)
    cells = sorted(tail)
    observed = [counts[c] for c in cells]
    total = sum(tail[c] for c in cells)
    expected = [tail[c] / total * runs for c in cells]
    assert chisquare(observed, expected).pvalue > 1e-3


def test_token_probabilities_match_the_sampler(tiny):
    logits = torch.tensor([1.0, 2.0, 3.0, 0.5])
    p = token_probabilities(logits, temperature=0.5, top_k=2)
    assert p[0] == 0 and p[3] == 0 and torch.isclose(p.sum(), torch.tensor(1.0))
    assert list(itertools.islice(torch.argsort(p, descending=True).tolist(), 2)) == [2, 1]


def test_draft_policy_does_not_draft_at_break_even():
    """One draft in five accepted, a drafted pass 16% dearer: drafting gains about 5% on paper, within the
    estimates' noise, so the policy keeps plain steps unless told to take any gain (margin 0)."""
    def chosen(margin):
        policy = DraftPolicy(3, margin=margin)
        for index in range(30):
            policy.update("ngram-1", 1, int(index % 5 == 0), 0.116)
            policy.update("ngram-1", 0, 0, 0.100)
        return policy.choose(1, "ngram-1")

    assert chosen(0.0) == 1
    assert chosen(0.1) == 0
