"""Next-token selection: greedy, temperature, top-k, top-p (nucleus), seeded sampling."""

from __future__ import annotations

import math

import pytest
import torch

from splitveil.edge.sampling import apply_temperature, select_token, top_k_filter, top_p_filter

torch.set_num_threads(1)

V = 101


def logits_for(seed: int, vocab: int = V, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale


def kept(filtered: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(filtered)).flatten().tolist())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("seed", range(10))
def test_greedy_is_argmax(seed):
    logits = logits_for(seed)
    token = select_token(logits, do_sample=False)
    assert isinstance(token, int)
    assert token == int(torch.argmax(logits))
    assert logits[token] == logits.max()


def test_greedy_ignores_sampling_options():
    logits = torch.tensor([0.0, 5.0, 4.9, -1.0])
    for kwargs in ({}, {"temperature": 0.1}, {"temperature": 10.0, "top_k": 3, "top_p": 0.2}):
        assert select_token(logits, do_sample=False, generator=gen(0), **kwargs) == 1


def test_greedy_on_half_precision_logits():
    logits = torch.tensor([0.0, 1.0, 3.0, 2.0], dtype=torch.bfloat16)
    assert select_token(logits, do_sample=False) == 2
    assert select_token(logits.half(), do_sample=True, top_k=1, generator=gen(0)) == 2


# ---------------------------------------------------------------------------------------------------- temperature


def test_apply_temperature_scales_logits():
    logits = logits_for(1)
    assert torch.equal(apply_temperature(logits, 2.0), logits / 2.0)
    assert torch.equal(apply_temperature(logits, 0.5), logits * 2.0)
    assert apply_temperature(logits, 1.0) is logits


def test_temperature_sharpens_and_flattens_the_sampled_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    draws = 4000

    def frequencies(temperature):
        generator = gen(123)
        counts = torch.zeros(4)
        for _ in range(draws):
            counts[select_token(logits, do_sample=True, temperature=temperature, generator=generator)] += 1
        return counts / draws

    for temperature in (0.5, 1.0, 2.0):
        expected = torch.softmax(logits / temperature, -1)
        # 4000 draws: standard error <= 0.008; 0.04 is five of them
        assert torch.allclose(frequencies(temperature), expected, atol=0.04), temperature
    cold, hot = frequencies(0.25), frequencies(4.0)
    assert cold[0] > 0.95
    assert hot[0] < 0.45 and hot[3] > 0.1


def test_sampling_uses_the_tempered_distribution_exactly():
    # with the same generator state, select_token draws from softmax(logits / T) and nothing else
    logits = logits_for(3)
    for temperature in (0.3, 1.0, 1.7):
        for seed in range(5):
            expected = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen(seed)))
            assert select_token(logits, do_sample=True, temperature=temperature, generator=gen(seed)) == expected


# ---------------------------------------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("k", [1, 2, 5, 50, 100])
def test_top_k_keeps_exactly_k_largest(k):
    logits = logits_for(k)
    assert len(set(logits.tolist())) == V  # distinct values, so "the k largest" is well defined
    filtered = top_k_filter(logits, k)
    assert kept(filtered) == set(torch.topk(logits, k).indices.tolist())
    assert len(kept(filtered)) == k
    assert torch.isneginf(filtered[~torch.isfinite(filtered)]).all()
    # kept logits are unchanged
    mask = torch.isfinite(filtered)
    assert torch.equal(filtered[mask], logits[mask])


@pytest.mark.parametrize("k", [0, V, V + 10, -1])
def test_top_k_zero_or_large_keeps_all(k):
    logits = logits_for(0)
    assert torch.equal(top_k_filter(logits, k), logits)


def test_top_k_does_not_modify_its_input():
    logits = logits_for(4)
    copy = logits.clone()
    top_k_filter(logits, 3)
    top_p_filter(logits, 0.5)
    assert torch.equal(logits, copy)


# ---------------------------------------------------------------------------------------------------------- top-p


def _probs_to_logits(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.05, {0}),
        (0.39, {0}),
        (0.45, {0, 1}),  # 0.4 < 0.45: the second token is needed
        (0.65, {0, 1}),  # 0.4 + 0.3 = 0.7 reaches it
        (0.75, {0, 1, 2}),
        (0.85, {0, 1, 2}),
        (0.95, {0, 1, 2, 3}),
        (0.999, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_the_mass(top_p, expected):
    logits = _probs_to_logits([0.4, 0.3, 0.2, 0.1])
    assert kept(top_p_filter(logits, top_p)) == expected


@pytest.mark.parametrize("top_p, expected", [(0.5, {0}), (0.75, {0, 1}), (0.875, {0, 1, 2}), (0.9, {0, 1, 2, 3})])
def test_top_p_mass_exactly_reached_stops_there(top_p, expected):
    # dyadic probabilities are exact in float32: a prefix whose mass equals top_p exactly is enough
    logits = _probs_to_logits([0.5, 0.25, 0.125, 0.125])
    assert kept(top_p_filter(logits, top_p)) == expected


def test_top_p_zero_still_keeps_the_most_likely_token():
    logits = _probs_to_logits([0.25, 0.5, 0.125, 0.125])
    assert kept(top_p_filter(logits, 0.0)) == {1}
    assert select_token(logits, do_sample=True, top_p=0.0, generator=gen(0)) == 1


def test_top_p_maps_back_to_vocabulary_order():
    # same distribution, shuffled: the kept set follows the tokens, not their sorted positions
    probs = [0.1, 0.3, 0.05, 0.4, 0.15]
    filtered = top_p_filter(_probs_to_logits(probs), 0.75)  # 0.4 + 0.3 = 0.7 < 0.75, + 0.15 = 0.85
    assert kept(filtered) == {3, 1, 4}
    mask = torch.isfinite(filtered)
    assert torch.equal(filtered[mask], _probs_to_logits(probs)[mask])


@pytest.mark.parametrize("top_p", [0.01, 0.5, 0.9, 0.95])
def test_top_p_when_the_first_token_alone_exceeds_it(top_p):
    logits = _probs_to_logits([0.02, 0.96, 0.01, 0.01])
    assert kept(top_p_filter(logits, top_p)) == {1}
    # sampling can then only give that token
    for seed in range(20):
        assert select_token(logits, do_sample=True, top_p=top_p, generator=gen(seed)) == 1


@pytest.mark.parametrize("top_p", [1.0, 1.5])
def test_top_p_one_keeps_all(top_p):
    logits = logits_for(5)
    assert torch.equal(top_p_filter(logits, top_p), logits)


@pytest.mark.parametrize("seed", range(20))
def test_top_p_matches_a_brute_force_nucleus(seed):
    logits = logits_for(seed, vocab=30, scale=2.0)
    top_p = float(torch.rand(1, generator=gen(1000 + seed))) * 0.98 + 0.01
    probs = torch.softmax(logits.double(), -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    nucleus, mass = set(), 0.0
    for index in order:
        nucleus.add(index)
        mass += probs[index]
        if mass >= top_p:
            break
    if any(math.isclose(sum(sorted(probs, reverse=True)[:n]), top_p, rel_tol=1e-5) for n in range(1, len(probs) + 1)):
        pytest.skip("mass lands on the boundary; float rounding decides")
    assert kept(top_p_filter(logits, top_p)) == nucleus


def test_top_k_then_top_p():
    # top-k first: after keeping 2 of [0.4, 0.3, 0.2, 0.1] their renormalized mass is [4/7, 3/7]
    logits = _probs_to_logits([0.4, 0.3, 0.2, 0.1])
    # top_p 0.5 alone keeps {0, 1}; on the top-2 renormalized it keeps only token 0 (4/7 >= 0.5)
    assert kept(top_p_filter(logits, 0.5)) == {0, 1}
    for seed in range(20):
        assert select_token(logits, do_sample=True, top_k=2, top_p=0.5, generator=gen(seed)) == 0


# --------------------------------------------------------------------------------------------------- seeded draws


def test_seeded_sampling_is_reproducible():
    logits = logits_for(7, scale=1.0)  # a flat-ish distribution: many tokens are likely

    def run(seed):
        generator = gen(seed)
        return [select_token(logits, do_sample=True, temperature=0.9, top_k=40, top_p=0.95, generator=generator)
                for _ in range(30)]

    first = run(42)
    assert run(42) == first
    assert len(set(first)) > 5  # really sampling, not collapsing to one token
    assert run(43) != first


@pytest.mark.parametrize("seed", range(10))
def test_top_k_one_sampling_equals_greedy(seed):
    logits = logits_for(seed)
    greedy = select_token(logits, do_sample=False)
    for temperature in (0.5, 1.0, 5.0):
        for draw_seed in range(3):
            assert select_token(logits, do_sample=True, top_k=1, temperature=temperature, generator=gen(draw_seed)) == greedy


def test_sampled_tokens_respect_top_k():
    logits = logits_for(8, scale=0.5)
    allowed = set(torch.topk(logits, 5).indices.tolist())
    generator = gen(9)
    seen = {select_token(logits, do_sample=True, top_k=5, generator=generator) for _ in range(300)}
    assert seen <= allowed
    assert len(seen) == 5  # flat logits: all five come up in 300 draws


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_nonpositive_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        select_token(torch.zeros(5), do_sample=True, temperature=temperature)


# ------------------------------------------------------------------------------------------------ stop strings

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from splitveil.edge.generate import StopStrings  # noqa: E402


class ByteTokenizer:
    """A tokenizer whose tokens are byte strings, with the decoding quirks that make stop strings hard: characters
    split over several tokens (decoded as U+FFFD until complete), a leading space dropped at the start of the text
    (as SentencePiece does), and special tokens that decode to nothing."""

    PIECES = [b"a", b"b", b"ab", b" ", b" the", b"\n", b".", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"\xf0\x9f",
              b"\x98\x80", b"\xc3\xa9", b"ba", b"  ", b"<", b">"]
    SPECIAL = len(PIECES)  # decodes to "" with skip_special_tokens
    decoded = 0  # token ids decoded in all (what the incremental check saves)

    def decode(self, token_ids, skip_special_tokens=True):
        ByteTokenizer.decoded += len(token_ids)
        data = b"".join(self.PIECES[t] for t in token_ids if t != self.SPECIAL)
        text = data.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text


def first_stop_by_full_decoding(tokenizer, token_ids, stop):
    """The old check: after each token, re-decode everything and search it."""
    for n in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:n], skip_special_tokens=True)
        hits = [text.find(s) for s in stop if s and s in text]
        if hits:
            return n, min(hits)
    return None


def first_stop_incrementally(tokenizer, token_ids, stop):
    stops = StopStrings(tokenizer, stop)
    for n in range(1, len(token_ids) + 1):
        found = stops.find(token_ids[:n])
        if found is not None:
            return n, found
    return None


@st.composite
def stop_cases(draw, vocab: int, decode):
    ids = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=60))
    text = decode(ids)
    stop = []
    for _ in range(draw(st.integers(1, 3))):
        if text and draw(st.booleans()):  # a substring of the text: a hit somewhere
            start = draw(st.integers(0, len(text) - 1))
            stop.append(text[start : start + draw(st.integers(1, 12))])
        else:
            stop.append(draw(st.text(alphabet="ab .\n\u00e9\u20ac\ufffd<>", min_size=0, max_size=6)))
    return ids, tuple(stop)


@settings(max_examples=400, deadline=None)
@given(case=stop_cases(len(ByteTokenizer.PIECES) + 1, ByteTokenizer().decode))
def test_incremental_stop_check_equals_full_decoding(case):
    ids, stop = case
    tokenizer = ByteTokenizer()
    if not any(stop):
        return
    assert first_stop_incrementally(tokenizer, ids, stop) == first_stop_by_full_decoding(tokenizer, ids, stop)


def test_incremental_stop_check_decodes_a_bounded_window():
    tokenizer = ByteTokenizer()
    ids = [0, 1, 3] * 400  # 1200 tokens, no stop string
    ByteTokenizer.decoded = 0
    assert first_stop_incrementally(tokenizer, ids, ("zzz",)) is None
    assert ByteTokenizer.decoded < 40 * len(ids)  # full decoding would decode len(ids)**2 / 2 = 720,000 ids
    ByteTokenizer.decoded = 0
    ids = [ByteTokenizer.SPECIAL] * 300 + [0, 1]  # tokens without text make the window grow, still exact
    assert first_stop_incrementally(tokenizer, ids, ("ab",)) == (302, 0)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from splitveil.models.loading import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.mark.model
def test_incremental_stop_check_equals_full_decoding_with_the_real_tokenizer(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    # byte-level tokens (multi-byte characters split over tokens), common words and the special tokens
    pieces = list(range(0, 300)) + list(range(1000, 1200)) + list(range(40000, 40100))

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(case=stop_cases(len(pieces), lambda ids: decode([pieces[i] for i in ids])))
    def check(case):
        ids, stop = case
        ids = [pieces[i] for i in ids]
        if any(stop):
            assert first_stop_incrementally(tokenizer, ids, stop) == first_stop_by_full_decoding(tokenizer, ids, stop)

    check()
