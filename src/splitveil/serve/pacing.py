"""Keeping concurrent sessions' decode steps in one batch: the scheduler holds a round of steps for sessions that
are about to send theirs.

A batched decode step on the CPU costs about as much for two rows as for six (SmolLM2's trunk: 70 vs 78 ms; a lone
step 40 ms): the weights are read once per round whatever the rows. Sessions whose steps fall into different
rounds stay apart for the rest of their generations, since each gets its reply, and sends its next step, at its own
round's end: eight OpenAI-edge streams measured 27 rounds of 2 steps alternating with 25 rounds of 6, so every
token cost two rounds. Holding the round of the early group until the late group's steps arrive merges them
for good.

The scheduler knows when each session is due: the time its last reply left plus its turnaround (how long it took
to send a step after a reply, a moving average; the client's own work, plus the network). A round holds for the
sessions that are due within a bound, and no longer than the last step round took to compute: not holding costs
the late sessions a round of their own (and holds the early ones, whose next steps then queue behind it), so a
hold shorter than a round is never a loss in throughput. A session that is overdue (it stopped, or thinks) is not
waited for; a lone session never waits.

Merged for good, though, the sessions alternate with their client: the server computes while every client works
on its reply, then the clients work while the server waits. With four or more sessions decoding, the scheduler
therefore keeps them in `cohorts` groups (two by default): a round takes at most its share of the decoding
sessions, so the server computes one group's round while the other group's clients turn their replies around.
Eight OpenAI-edge streams on one 2-core machine, rounds alternating in one server (5 each, medians): 46.9 tok/s in
two groups against 40.2 in one (3.17x and 2.91x one stream); at 32 streams the two were within the machine's noise
(64.4 and 59.1). A round of half the rows costs more than half a round (SmolLM2's trunk: 4 rows 39 ms, 8 rows 53),
so the groups pay only where the client's turnaround would otherwise leave the server idle, which a real network's
round trip makes the common case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: the fewest sessions decoding at once that are split into cohorts (each cohort at least two sessions)
FEWEST_FOR_COHORTS = 4
#: a session with no step in the server's hands and none for this long after its reply has stopped decoding
#: (finished, or thinking); it is not counted in the cohorts
IDLE_AFTER = 1.0


@dataclass
class _Pace:
    replied: float | None = None  # when its last reply left (scheduler clock)
    turnaround: float | None = None  # moving average of reply -> next step


@dataclass
class StepPacer:
    """When a round of decode steps should start (see the module's docstring).

    Args:
        max_hold: the longest a round waits for sessions due (seconds); 0 turns holding off.
        cohorts: groups the decoding sessions' steps are kept in (1: one round takes every waiting step).
        slack: added to each session's expected arrival (a moving average misses by a little either way).
    """

    max_hold: float = 0.1  # as ServerLimits.step_hold and `serve --step-hold-ms`
    cohorts: int = 2  # as ServerLimits.step_cohorts and `serve --step-cohorts`
    slack: float = 0.002
    smoothing: float = 0.3  # weight of the newest turnaround in the moving average
    round_seconds: float | None = None  # moving average of a step round's compute time
    sessions: dict = field(default_factory=dict)  # session id -> _Pace

    def replied(self, session_id: bytes, now: float) -> None:
        """A reply to `session_id` left at `now`."""
        self.sessions.setdefault(session_id, _Pace()).replied = now

    def arrived(self, session_id: bytes, now: float) -> None:
        """A decode step of `session_id` arrived at `now`."""
        pace = self.sessions.setdefault(session_id, _Pace())
        if pace.replied is not None:
            pace.turnaround = self._average(pace.turnaround, max(0.0, now - pace.replied))
            pace.replied = None  # in the server's hands until its reply

    def computed(self, seconds: float) -> None:
        """A round of decode steps took `seconds` to compute."""
        self.round_seconds = self._average(self.round_seconds, seconds)

    def _average(self, average: float | None, newest: float) -> float:
        return newest if average is None else (1 - self.smoothing) * average + self.smoothing * newest

    def forget(self, session_id: bytes) -> None:
        self.sessions.pop(session_id, None)

    def decoding(self, now: float, queued: set) -> int:
        """Sessions decoding at `now`: those with a step waiting (`queued`) or in the server's hands, and those
        whose reply left less than `IDLE_AFTER` (or two turnarounds) ago."""
        count = len(queued)
        for session_id, pace in self.sessions.items():
            if session_id in queued or pace.turnaround is None:
                continue
            if pace.replied is None or now - pace.replied < max(IDLE_AFTER, 2 * pace.turnaround):
                count += 1
        return count

    def round_cap(self, now: float, queued: set) -> int | None:
        """The most steps the next round takes (None: all of them): its cohort's share of the decoding sessions."""
        if self.cohorts <= 1:
            return None
        decoding = self.decoding(now, queued)
        if decoding < FEWEST_FOR_COHORTS:
            return None
        return max(math.ceil(decoding / self.cohorts), FEWEST_FOR_COHORTS // 2)

    def hold_until(self, now: float, queued: set, since: float | None = None) -> float | None:
        """The time the round of `queued` sessions' steps should wait until, or None to start now; `since` is when
        the round began holding (the bound counts from there, however many sessions arrive meanwhile)."""
        if self.max_hold <= 0 or not queued or self.round_seconds is None:
            return None
        bound = (now if since is None else since) + min(self.max_hold, self.round_seconds)
        latest = None
        for session_id, pace in self.sessions.items():
            if session_id in queued or pace.replied is None or pace.turnaround is None:
                continue
            due = pace.replied + pace.turnaround * 1.25 + self.slack
            if now < due <= bound:
                latest = due if latest is None else max(latest, due)
        return latest
