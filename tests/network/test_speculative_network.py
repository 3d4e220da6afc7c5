"""Speculative decoding against a real TLS server behind the link emulator: delay, jitter and a reset in the middle
of a generation, and the tokens are still those of sequential decoding (the rolled-back session is replayed)."""

import pytest

from splitveil.transport.link import Link, LinkSpec

pytestmark = pytest.mark.network

PROMPT = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7]


def test_speculation_over_a_jittery_link_that_resets_is_exact(make_server, client):
    server = make_server()
    sequential = client(server).generate(PROMPT, max_new_tokens=24)
    spec = LinkSpec(rtt_ms=6.0, jitter_ms=2.0, reset_after=6_000, seed=3)
    with Link(spec, ("127.0.0.1", server.port)) as link:
        lm = client(server, recover_seconds=20.0, url=f"wss://127.0.0.1:{link.port}")
        fast = lm.generate(PROMPT, max_new_tokens=24, speculate="prompt-lookup", draft_tokens=4,
                          draft_policy="fixed")
        recoveries = sum(getattr(stage, "recoveries", 0) for stage in lm.stages)
        assert link.resets_done == 1
    assert recoveries == 1
    assert fast.token_ids == sequential.token_ids
    assert fast.speculation["drafted"] > 0


def test_a_rollback_costs_no_round_trip_of_its_own(make_server, client):
    server = make_server()
    lm = client(server)
    sequential = lm.generate(PROMPT, max_new_tokens=16)
    fast = lm.generate(PROMPT, max_new_tokens=16, speculate="self", draft_tokens=3, draft_policy="fixed")
    assert fast.token_ids == sequential.token_ids
    # one round trip per pass (open and close aside), however many passes rolled back
    assert fast.round_trips == fast.speculation["passes"] + 1 + 2
    assert sequential.round_trips == sequential.decode_tokens + 1 + 2


def test_a_connected_split_forks_onto_a_session_of_its_own(make_server, client):
    """What the OpenAI edge's lanes are: a fork over the same weights with its own TLS connection and session."""
    import threading

    server = make_server()
    lm = client(server)
    fork = lm.fork()
    try:
        assert fork.transport is not lm.transport and fork.splittable is lm.splittable
        expected = {i: lm.generate([5, 6, 7, i], max_new_tokens=12).token_ids for i in range(2)}
        got = {}
        threads = [threading.Thread(target=lambda i=i, r=r: got.__setitem__(i, r.generate([5, 6, 7, i],
                                                                                           max_new_tokens=12).token_ids))
                   for i, r in enumerate([lm, fork])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert got == expected
    finally:
        fork.close()


def test_the_adaptive_policy_drafts_over_a_slow_link_and_stays_exact(make_server, client):
    """Over a 30 ms link a pass is mostly waiting (the tiny model computes in about a millisecond), so drafting pays
    whenever drafts are accepted now and then: the default policy drafts, passes fall, and the tokens do not change."""
    server = make_server()
    sequential = client(server).generate(PROMPT, max_new_tokens=24)
    with Link(LinkSpec(rtt_ms=30.0), ("127.0.0.1", server.port)) as link:
        lm = client(server, url=f"wss://127.0.0.1:{link.port}")
        fast = lm.generate(PROMPT, max_new_tokens=24, speculate="prompt-lookup", draft_tokens=4)
    assert fast.token_ids == sequential.token_ids
    assert fast.speculation["draft_policy"] == "adaptive" and fast.speculation["accepted"] > 0
    assert fast.speculation["passes"] < sequential.decode_tokens
