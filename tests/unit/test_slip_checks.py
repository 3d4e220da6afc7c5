"""SLIP's checks of the untrusted executor's replies: Freivalds vectors drawn afresh for every session, the range
check on the unmasked product, the soundness they deliver (2^-40 by default), and a failure ending the session."""

import numpy as np
import pytest
import torch

from splitveil.models.tiny import tiny_causal_lm
from splitveil.protect.slip.client import SlipClient
from splitveil.protect.slip.errors import VerificationError
from splitveil.protect.slip.executor import SlipExecutorService
from splitveil.protect.slip.fixedpoint import RingWeight, ring_matmul, uniform_ring
from splitveil.protect.slip.freivalds import FreivaldsCheck, bits_per_vector, product_range, vectors_needed
from splitveil.protect.slip.trusted import SlipConfig, SlipModel
from splitveil.transport.loopback import LoopbackTransport

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11]])


def protected(*, tamper=None, **config):
    slip = SlipModel(tiny_causal_lm("llama", weight_scale=1.0), SlipConfig(**config), generator=np.random.default_rng(0))
    service = SlipExecutorService(slip.executor_weights(), mode=slip.config.mode, tamper=tamper)
    transport = LoopbackTransport(service.handle)
    return slip, service, transport


def shift_one_product(shift: int, *, group: int = 3):
    """A cheating executor: adds `shift` to one entry of its first reply for `group` in each session (a different
    entry each time: with vectors fixed for good, as before, a quarter of the entries let a 2^63 shift through)."""
    calls = []

    def tamper(group_id, output):
        calls.append(group_id)
        if group_id != group:
            return output
        bad = output.clone()
        bad[0, calls.count(group) % bad.shape[1]] += shift  # wraps modulo 2^64
        return bad

    return tamper, calls


@pytest.mark.parametrize("shift, caught_by", [(1 << 63, "Freivalds|range"), (1 << 30, "Freivalds"), (1, "Freivalds")])
def test_a_shifted_product_is_caught_in_every_session_with_the_default_check(shift, caught_by):
    tamper, calls = shift_one_product(shift - (1 << 64) if shift >= 1 << 63 else shift)
    slip, service, transport = protected(rank=1, include_head=True, tamper=tamper)
    assert slip.config.soundness_bits >= 40
    for _ in range(20):
        slip.attach(SlipClient(transport))  # a new session
        with pytest.raises(VerificationError, match=caught_by), torch.no_grad():
            slip.model(IDS)
        assert calls[-1] == 3  # the cheat ended the session: no group after it was sent anything
    assert not service.sessions


def test_check_vectors_are_fresh_for_every_session():
    slip, _, transport = protected(rank=1)
    drawn = []
    for _ in range(3):
        slip.attach(SlipClient(transport))
        with torch.no_grad():
            slip.model(IDS)
        drawn.append(slip.runtimes[0].check.s.clone())
    assert drawn[0].shape[0] >= 2
    assert not torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[1], drawn[2])


def test_vectors_prepared_offline_serve_the_next_session_only():
    slip, _, transport = protected(rank=1)
    slip.fill_pools(8)
    prepared = slip.runtimes[0].check._next[0].clone()
    slip.attach(SlipClient(transport))
    with torch.no_grad():
        slip.model(IDS)
    assert torch.equal(slip.runtimes[0].check.s[: prepared.shape[0]], prepared)
    slip.attach(SlipClient(transport))  # nothing prepared: drawn afresh
    with torch.no_grad():
        slip.model(IDS)
    assert not torch.equal(slip.runtimes[0].check.s[: prepared.shape[0]], prepared)


def test_a_failed_check_ends_the_session_and_nothing_more_is_computed():
    tamper, calls = shift_one_product(1 << 20, group=0)
    slip, service, transport = protected(rank=1, tamper=tamper)
    slip.attach(SlipClient(transport))
    with pytest.raises(VerificationError, match="session is over"), torch.no_grad():
        slip.model(IDS)
    rows, sent = service.rows_computed, len(calls)
    with pytest.raises(VerificationError, match="ended after a failed check"), torch.no_grad():
        slip.model(IDS)
    assert service.rows_computed == rows and len(calls) == sent and not service.sessions


def test_every_product_of_a_session_gets_at_least_the_target_soundness():
    slip, _, transport = protected(rank=1, include_head=True)
    slip.attach(SlipClient(transport))
    with torch.no_grad():
        slip.model(IDS)
    assert slip.soundness_bits() >= 40
    assert all(r.check.vectors_used >= 2 * r.check.products for r in slip.runtimes)


def test_soundness_per_vector_follows_the_range():
    assert bits_per_vector(None) == 1  # no range check: a top-bit error passes one vector half the time
    assert bits_per_vector(1 << 40) == 23  # an error that stays within 2^41 has its lowest set bit <= 41
    assert bits_per_vector((1 << 40) - 1) == 24
    assert bits_per_vector(0) == 64
    assert vectors_needed(40, 1 << 40, least=2) == 2 and vectors_needed(40, 1 << 50, least=2) == 4
    assert vectors_needed(40, None, least=2) == 40


def test_the_range_bounds_every_true_product():
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.integers(-(2**20), 2**20, size=(24, 16), dtype=np.int64))
    x = torch.from_numpy(rng.integers(-(2**18), 2**18, size=(5, 16), dtype=np.int64))
    weight = RingWeight(w)
    for bound in (product_range(x, weight.row_norm()), product_range(x, weight.row_norm(), weight.largest)):
        assert int(ring_matmul(x, w).abs().max()) <= bound < 2**63
    assert product_range(x, weight.row_norm(), weight.largest) <= product_range(x, weight.row_norm())


def test_without_the_range_a_top_bit_error_passes_one_fresh_vector_half_the_time():
    """The honest per-vector soundness in Z_2^64: 1/2 for a corruption in the top bit (what t = 2 gave before)."""
    rng = np.random.default_rng(3)
    w = torch.from_numpy(rng.integers(-(2**20), 2**20, size=(16, 12), dtype=np.int64))
    x = uniform_ring((1, 12), generator=rng)
    y = ring_matmul(x, w)
    bad = y.clone()
    bad[0, 5] += -(1 << 63)
    check = FreivaldsCheck(w, repetitions=1, generator=rng)
    passed = 0
    for _ in range(400):
        check.new_session()
        passed += check.verify(x, bad)
    assert 140 < passed < 260  # ~200: each session's vector decides afresh


def test_ring_products_are_exact_modulo_2_64():
    from splitveil.protect.slip.fixedpoint import ring_products

    rng = np.random.default_rng(4)
    a, b = uniform_ring((9, 13), generator=rng), uniform_ring((3, 13), generator=rng)
    expected = [[(sum(int(x) * int(y) for x, y in zip(row, vec)) + 2**63) % 2**64 - 2**63 for vec in b] for row in a]
    assert ring_products(a, b).tolist() == expected == ring_products(a, b, chunk_elements=5).tolist()
