"""The scheduler's hold for sessions due to send their decode steps (`serve.pacing.StepPacer`)."""

from collections import deque

import pytest

from splitveil.serve.pacing import IDLE_AFTER, StepPacer
from splitveil.serve.server import take_round

A, B, C = b"a" * 16, b"b" * 16, b"c" * 16


def paced(*, turnaround: float = 0.02, round_seconds: float = 0.07, max_hold: float = 0.1) -> StepPacer:
    """A pacer that has seen sessions A, B and C send a step `turnaround` seconds after a reply, and a step round take
    `round_seconds`; all three got their last reply at t = 10."""
    pacer = StepPacer(max_hold=max_hold)
    for session in (A, B, C):
        pacer.replied(session, 9.0)
        pacer.arrived(session, 9.0 + turnaround)
        pacer.replied(session, 10.0)
    pacer.computed(round_seconds)
    return pacer


def test_a_round_waits_for_the_sessions_due_back():
    pacer = paced()
    pacer.arrived(A, 10.02)  # A is back; B and C are due at 10 + 1.25 * 0.02 + slack
    assert pacer.hold_until(10.02, {A}) == pytest.approx(10.0 + 1.25 * 0.02 + pacer.slack)
    pacer.arrived(B, 10.021)
    pacer.arrived(C, 10.022)
    assert pacer.hold_until(10.022, {A, B, C}) is None  # everyone is in: start now


def test_overdue_and_far_sessions_are_not_waited_for():
    pacer = paced()
    pacer.arrived(A, 10.02)
    assert pacer.hold_until(10.5, {A}) is None  # B and C are late (stopped, or thinking): not waited for
    slow = paced(turnaround=0.2)  # due 0.25 s after their reply: beyond the bound of one round (0.07 s)
    slow.arrived(A, 10.01)
    assert slow.hold_until(10.01, {A}) is None


def test_the_hold_never_exceeds_a_round_or_the_limit():
    pacer = paced(turnaround=0.05, round_seconds=0.04)  # B and C are due at 10.0645; a round costs only 0.04 s
    pacer.arrived(A, 10.02)
    assert pacer.hold_until(10.02, {A}) is None  # more than a round away
    assert pacer.hold_until(10.03, {A}, since=10.03) == pytest.approx(10.0645)  # within 10.03 + 0.04
    assert pacer.hold_until(10.03, {A}, since=10.0) is None  # the bound counts from when the round began holding
    capped = paced(max_hold=0.005)  # B and C are due at 10.027
    capped.arrived(A, 10.02)
    assert capped.hold_until(10.02, {A}) is None
    assert paced(max_hold=0.0).hold_until(10.0, {A}) is None  # 0 turns holding off


def test_nothing_is_held_before_a_round_or_a_turnaround_was_measured():
    pacer = StepPacer()
    pacer.replied(A, 1.0)
    pacer.replied(B, 1.0)
    pacer.arrived(A, 1.01)
    assert pacer.hold_until(1.01, {A}) is None  # no step round measured yet
    pacer.computed(0.05)
    assert pacer.hold_until(1.01, {A}) is None  # B's turnaround is unknown
    assert pacer.hold_until(1.01, set()) is None


def test_turnaround_is_a_moving_average_and_closed_sessions_are_forgotten():
    pacer = paced(turnaround=0.02)
    pacer.arrived(A, 10.04)  # took 0.04 this time
    assert pacer.sessions[A].turnaround == pytest.approx(0.7 * 0.02 + 0.3 * 0.04)
    assert pacer.sessions[A].replied is None  # in the server's hands: not due
    pacer.forget(B)
    pacer.forget(C)
    assert pacer.hold_until(10.04, {A}) is None


def decoding_pacer(sessions: int, *, cohorts: int = 2) -> tuple[StepPacer, list[bytes]]:
    """A pacer that has seen `sessions` sessions decode (turnaround 0.02 s), each replied to at t = 10."""
    pacer = StepPacer(cohorts=cohorts)
    ids = [bytes([i]) * 16 for i in range(sessions)]
    for session in ids:
        pacer.replied(session, 9.0)
        pacer.arrived(session, 9.02)
        pacer.replied(session, 10.0)
    return pacer, ids


def test_four_or_more_decoding_sessions_are_kept_in_cohorts():
    pacer, ids = decoding_pacer(8)
    assert pacer.round_cap(10.01, set(ids[:5])) == 4  # eight decoding: rounds of four
    pacer, ids = decoding_pacer(5)
    assert pacer.round_cap(10.01, set(ids[:3])) == 3
    pacer, ids = decoding_pacer(3)
    assert pacer.round_cap(10.01, set(ids)) is None  # too few to split: one round takes all
    pacer, ids = decoding_pacer(8, cohorts=1)
    assert pacer.round_cap(10.01, set(ids)) is None


def test_sessions_that_stopped_decoding_are_not_counted_in_the_cohorts():
    pacer, ids = decoding_pacer(8)
    later = 10.0 + IDLE_AFTER + 0.01  # no step from anyone since their replies: all idle but the queued
    assert pacer.decoding(later, set(ids[:2])) == 2
    assert pacer.round_cap(later, set(ids[:2])) is None
    pacer.arrived(ids[2], later)  # a step in the server's hands counts until its reply
    assert pacer.decoding(later, set(ids[:2])) == 3
    pacer.forget(ids[0])
    assert pacer.decoding(10.01, set()) == 7


def test_a_capped_round_takes_the_oldest_steps_and_one_chunk():
    steps, chunks = deque(["s1", "s2", "s3", "s4", "s5"]), deque(["c1", "c2"])
    assert take_round(steps, chunks, 2) == ["s1", "s2", "c1"]
    assert list(steps) == ["s3", "s4", "s5"] and list(chunks) == ["c2"]
    assert take_round(steps, chunks) == ["s3", "s4", "s5", "c2"]
    assert not steps and not chunks
