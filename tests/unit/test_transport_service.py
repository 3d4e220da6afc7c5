"""LoopbackTransport accounting, and PartService: sessions, and refusal of every bad frame without harm to any session.

The service runs the trunk (layers 1..2) of a Λ-split tiny llama. Outputs are compared, exactly, with a fresh
`part.clone()` fed the same inputs directly.
"""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitveil.models.causal_lm import CausalLMSplittable
from splitveil.models.splittable import Part
from splitveil.models.tiny import tiny_causal_lm
from splitveil.plan.plan import SplitPlan, apply
from splitveil.serve.service import PartService
from splitveil.transport.base import Transport, TransportStats
from splitveil.transport.loopback import LoopbackTransport
from splitveil.wire.frame import MAX_FRAME_BYTES, NO_SESSION, Frame, FrameKind, decode_frame, encode_frame

torch.set_num_threads(1)

HIDDEN = 32
PART = 1  # the trunk's index in the plan
MAX_FRAME = 8192
FORGED = bytes.fromhex("00112233445566778899aabbccddeeff")
_FIXED = struct.Struct("<2sBBBBBB16sI")


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trunk():
    splittable = CausalLMSplittable(tiny_causal_lm("llama"))
    parts = apply(splittable, SplitPlan.lambda_split(1, 3))
    assert (parts[PART].start, parts[PART].end) == (2, 4)
    return parts[PART]


# inputs of two sessions: a 4-position prompt, then two single decode steps
XS = [randn(1, 4, HIDDEN, seed=10), randn(1, 1, HIDDEN, seed=11), randn(1, 1, HIDDEN, seed=12)]
YS = [randn(1, 3, HIDDEN, seed=20), randn(1, 1, HIDDEN, seed=21), randn(1, 1, HIDDEN, seed=22)]


def reference(part: Part, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    fresh = part.clone()
    return [fresh(x).clone() for x in inputs]


@pytest.fixture(scope="module")
def ref_x(trunk):
    return reference(trunk, XS)


@pytest.fixture(scope="module")
def ref_y(trunk):
    return reference(trunk, YS)


@pytest.fixture
def service(trunk):
    return PartService({PART: trunk}, hidden_size=HIDDEN, max_frame_bytes=MAX_FRAME)


def send(service: PartService, frame: Frame | bytes) -> Frame:
    data = frame if isinstance(frame, bytes) else encode_frame(frame)
    return decode_frame(service.handle(data))


def open_session(service: PartService) -> bytes:
    reply = send(service, Frame(FrameKind.OPEN))
    assert reply.kind == FrameKind.OK, reply.message
    assert reply.session != NO_SESSION
    return reply.session


def forward(service: PartService, session: bytes, seq: int, x: torch.Tensor, *, codec: str = "fp32", part: int = PART) -> torch.Tensor:
    reply = send(service, Frame(FrameKind.FORWARD, x, codec=codec, session=session, seq=seq, part=part))
    assert reply.kind == FrameKind.RESULT, reply.message
    assert (reply.session, reply.seq, reply.part, reply.codec) == (session, seq, part, codec)
    return reply.tensor


def test_reference_is_deterministic(trunk, ref_x):
    # exact comparisons below rely on a part computing the same bits for the same inputs
    again = reference(trunk, XS)
    assert all(torch.equal(a, b) for a, b in zip(again, ref_x))
    assert ref_x[0].shape == (1, 4, HIDDEN)
    # and a part's cache matters: step 1 after the prompt differs from step 1 alone
    assert not torch.equal(ref_x[1], trunk.clone()(XS[1]))


# ---------------------------------------------------------------------------------------------------- transport


def test_loopback_counts_bytes_and_round_trips():
    seen = []

    def handler(data):
        seen.append(data)
        return data[::-1] + b"!"

    transport = LoopbackTransport(handler)
    assert isinstance(transport, Transport)
    assert transport.stats == TransportStats(0, 0, 0)
    assert transport.request(b"abc") == b"cba!"
    assert transport.stats == TransportStats(bytes_up=3, bytes_down=4, round_trips=1)

    before = transport.stats.snapshot()
    assert transport.request(bytearray(b"hello")) == b"olleh!"
    assert transport.request(memoryview(b"")) == b"!"
    assert transport.stats == TransportStats(bytes_up=8, bytes_down=11, round_trips=3)
    # the snapshot is a copy, not a view of the live counters
    assert before == TransportStats(3, 4, 1)
    assert transport.stats.since(before) == TransportStats(bytes_up=5, bytes_down=7, round_trips=2)
    # the handler always gets immutable bytes
    assert [type(d) for d in seen] == [bytes, bytes, bytes]


def test_transport_context_manager_closes():
    closed = []

    class Recording(LoopbackTransport):
        def close(self):
            closed.append(True)

    with Recording(lambda b: b) as transport:
        assert isinstance(transport, Recording)
        transport.request(b"x")
    assert closed == [True]


def test_loopback_over_service_counts_real_frames(service, ref_x):
    transport = LoopbackTransport(service.handle)
    raw = transport.request(encode_frame(Frame(FrameKind.OPEN)))
    reply = decode_frame(raw)
    assert transport.stats == TransportStats(bytes_up=28, bytes_down=len(raw), round_trips=1)
    assert json.loads(reply.message)["hidden_size"] == HIDDEN  # the OPEN reply tells the client the server's limits
    session = reply.session

    start = transport.stats.snapshot()
    frame = encode_frame(Frame(FrameKind.FORWARD, XS[0], session=session, seq=0, part=PART))
    assert len(frame) == 28 + 3 * 4 + 4 * HIDDEN * 4
    result = decode_frame(transport.request(frame))
    assert torch.equal(result.tensor, ref_x[0])
    delta = transport.stats.since(start)
    assert delta == TransportStats(bytes_up=len(frame), bytes_down=len(frame), round_trips=1)

    # fp16 halves the payload both ways
    start = transport.stats.snapshot()
    transport.request(encode_frame(Frame(FrameKind.FORWARD, XS[1], codec="fp16", session=session, seq=1, part=PART)))
    assert transport.stats.since(start) == TransportStats(bytes_up=40 + 64, bytes_down=40 + 64, round_trips=1)


# ------------------------------------------------------------------------------------------------------ sessions


def test_open_gives_distinct_random_ids(service):
    ids = {open_session(service) for _ in range(5)}
    assert len(ids) == 5
    assert set(service.sessions) == ids
    assert NO_SESSION not in ids


def test_forward_matches_a_fresh_part(service, ref_x):
    session = open_session(service)
    for seq, (x, expected) in enumerate(zip(XS, ref_x)):
        assert torch.equal(forward(service, session, seq, x), expected)
    state = service.sessions[session]
    assert state.next_seq == 3
    assert state.tokens == 4 + 1 + 1


def test_sessions_are_isolated(service, ref_x, ref_y):
    a, b = open_session(service), open_session(service)
    # interleaved: each session's KV cache sees only its own positions
    for seq in range(3):
        assert torch.equal(forward(service, b, seq, YS[seq]), ref_y[seq])
        assert torch.equal(forward(service, a, seq, XS[seq]), ref_x[seq])


def test_sessions_do_not_touch_the_served_part(trunk, service, ref_x):
    before = trunk.seq_len
    session = open_session(service)
    forward(service, session, 0, XS[0])
    assert trunk.seq_len == before
    assert service.sessions[session].parts[PART] is not trunk


@pytest.mark.parametrize("codec, half", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_forward_in_half_codecs_replies_in_the_same_codec(trunk, service, codec, half):
    session = open_session(service)
    fresh = trunk.clone()
    for seq, x in enumerate(XS):
        expected = fresh(x.to(half).float()).to(half).float()
        assert torch.equal(forward(service, session, seq, x, codec=codec), expected)


def test_max_sessions_is_enforced(trunk):
    service = PartService({PART: trunk}, hidden_size=HIDDEN, max_sessions=2)
    a, b = open_session(service), open_session(service)
    reply = send(service, Frame(FrameKind.OPEN))
    assert reply.kind == FrameKind.ERROR
    assert "full (2 sessions)" in reply.message
    assert set(service.sessions) == {a, b}
    # closing one frees a slot
    assert send(service, Frame(FrameKind.CLOSE, session=a)).kind == FrameKind.OK
    c = open_session(service)
    assert set(service.sessions) == {b, c}
    assert send(service, Frame(FrameKind.OPEN)).kind == FrameKind.ERROR


def test_close_removes_the_session(service, ref_x, ref_y):
    a, b = open_session(service), open_session(service)
    forward(service, a, 0, XS[0])
    forward(service, b, 0, YS[0])
    reply = send(service, Frame(FrameKind.CLOSE, session=a, seq=1))
    assert reply.kind == FrameKind.OK
    assert (reply.session, reply.seq) == (a, 1)
    assert a not in service.sessions
    # the closed session is gone for good
    reply = send(service, Frame(FrameKind.FORWARD, XS[1], session=a, seq=1, part=PART))
    assert reply.kind == FrameKind.ERROR and "unknown session" in reply.message
    reply = send(service, Frame(FrameKind.CLOSE, session=a))
    assert reply.kind == FrameKind.ERROR and "unknown session" in reply.message
    # the other one is untouched
    assert torch.equal(forward(service, b, 1, YS[1]), ref_y[1])
    assert list(service.sessions) == [b]


def test_default_frame_limit(trunk):
    assert PartService({PART: trunk}, hidden_size=HIDDEN).max_frame_bytes == MAX_FRAME_BYTES


# ----------------------------------------------------------------------------------------------------- bad frames


def _valid(session, seq, **changes):
    fields = dict(kind=FrameKind.FORWARD, tensor=XS[1], codec="fp32", session=session, seq=seq, part=PART)
    fields.update(changes)
    return encode_frame(Frame(**fields))


def _patch(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + bytes([value]) + data[offset + 1:]


def _with_value(value, codec):
    def build(session, seq):
        x = XS[1].clone()
        x[0, 0, 7] = value
        return _valid(session, seq, tensor=x, codec=codec)

    return build


# name -> (build(session, next_seq) -> bytes, substring of the ERROR message, whether the reply echoes session/seq)
BAD_FRAMES = {
    "garbage": (lambda s, q: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)), "bad magic", False),
    "empty": (lambda s, q: b"", "shorter than a header", False),
    "short": (lambda s, q: _valid(s, q)[:20], "shorter than a header", False),
    "bad version": (lambda s, q: _patch(_valid(s, q), 2, 9), "wire version 9", False),
    "unknown kind": (lambda s, q: _patch(_valid(s, q), 3, 77), "unknown frame kind 77", False),
    "unknown codec id": (lambda s, q: _patch(_valid(s, q), 4, 42), "unknown codec id 42", False),
    "ndim > 4": (lambda s, q: _patch(_valid(s, q), 5, 9), "9 dimensions exceed", False),
    "truncated payload": (lambda s, q: _valid(s, q)[:-1], "needs 128 bytes, frame carries 127", False),
    "payload too long": (lambda s, q: _valid(s, q) + b"\x00", "needs 128 bytes, frame carries 129", False),
    "oversized": (lambda s, q: _valid(s, q, tensor=torch.zeros(1, 100, HIDDEN)), f"exceeds the limit of {MAX_FRAME}", False),
    "NaN fp32": (_with_value(float("nan"), "fp32"), "NaN or Inf", False),
    "Inf fp16": (_with_value(float("inf"), "fp16"), "NaN or Inf", False),
    "-Inf bf16": (_with_value(float("-inf"), "bf16"), "NaN or Inf", False),
    "int64 tensor": (lambda s, q: _valid(s, q, tensor=torch.ones(1, 2, HIDDEN, dtype=torch.int64), codec="int64"),
                     "must carry a float tensor", True),
    "uint8 tensor": (lambda s, q: _valid(s, q, tensor=torch.ones(1, 2, HIDDEN, dtype=torch.uint8), codec="uint8"),
                     "must carry a float tensor", True),
    "no tensor": (lambda s, q: _valid(s, q, tensor=None), "must carry a float tensor", True),
    "last dim 31": (lambda s, q: _valid(s, q, tensor=torch.zeros(1, 2, 31)),
                    f"expected hidden states of shape [batch, positions, {HIDDEN}], got [1, 2, 31]", True),
    "last dim 33": (lambda s, q: _valid(s, q, tensor=torch.zeros(1, 1, 33)), "got [1, 1, 33]", True),
    "2-D": (lambda s, q: _valid(s, q, tensor=torch.zeros(2, HIDDEN)), f"got [2, {HIDDEN}]", True),
    "4-D": (lambda s, q: _valid(s, q, tensor=torch.zeros(1, 1, 1, HIDDEN)), f"got [1, 1, 1, {HIDDEN}]", True),
    "1-D": (lambda s, q: _valid(s, q, tensor=torch.zeros(HIDDEN)), f"got [{HIDDEN}]", True),
    "zero positions": (lambda s, q: _valid(s, q, tensor=torch.zeros(1, 0, HIDDEN)), f"got [1, 0, {HIDDEN}]", True),
    "zero batch": (lambda s, q: _valid(s, q, tensor=torch.zeros(0, 1, HIDDEN)), f"got [0, 1, {HIDDEN}]", True),
    "no session": (lambda s, q: _valid(NO_SESSION, q), "unknown session", True),
    "forged session": (lambda s, q: _valid(FORGED, q), "unknown session", True),
    "forged close": (lambda s, q: _valid(FORGED, q, kind=FrameKind.CLOSE, tensor=None), "unknown session", True),
    "forged result": (lambda s, q: _valid(FORGED, q, kind=FrameKind.RESULT), "unknown session", True),
    "seq ahead": (lambda s, q: _valid(s, q + 1), "expected sequence number 1, got 2", True),
    "seq replayed": (lambda s, q: _valid(s, q - 1), "expected sequence number 1, got 0", True),
    "seq max": (lambda s, q: _valid(s, 2**32 - 1), f"got {2**32 - 1}", True),
    "part 0 (head)": (lambda s, q: _valid(s, q, part=0), "does not run part 0", True),
    "part 2 (tail)": (lambda s, q: _valid(s, q, part=2), "does not run part 2", True),
    "part 255": (lambda s, q: _valid(s, q, part=255), "does not run part 255", True),
    "client RESULT": (lambda s, q: _valid(s, q, kind=FrameKind.RESULT), "may not send RESULT", True),
    "client OK": (lambda s, q: _valid(s, q, kind=FrameKind.OK, tensor=None), "may not send OK", True),
    "client ERROR": (lambda s, q: _valid(s, q, kind=FrameKind.ERROR, tensor=torch.zeros(3, dtype=torch.uint8), codec="uint8"),
                     "may not send ERROR", True),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_frame_is_refused_without_harm(trunk, service, ref_x, ref_y, name):
    build, reason, echoes = BAD_FRAMES[name]
    a, b = open_session(service), open_session(service)
    assert torch.equal(forward(service, a, 0, XS[0]), ref_x[0])
    assert torch.equal(forward(service, b, 0, YS[0]), ref_y[0])
    sessions_before = dict(service.sessions)
    a_part = service.sessions[a].parts[PART]
    positions_before = a_part.seq_len

    # the bad frame targets session a (where it names a session) at a's next sequence number
    data = build(a, 1)
    raw_reply = service.handle(data)  # must not raise
    reply = decode_frame(raw_reply)
    assert reply.kind == FrameKind.ERROR
    assert reply.tensor is not None and reply.codec == "uint8"
    assert reason in reply.message
    if echoes:  # refusals after decoding name the frame they refuse
        sent = decode_frame(data)
        assert (reply.session, reply.seq) == (sent.session, sent.seq)
    else:  # undecodable frames cannot be attributed to a session
        assert (reply.session, reply.seq) == (NO_SESSION, 0)

    # no session was created, closed or advanced
    assert service.sessions == sessions_before
    assert service.sessions[a].next_seq == 1 and service.sessions[b].next_seq == 1
    assert service.sessions[a].tokens == 4 and service.sessions[b].tokens == 3
    assert service.sessions[a].parts[PART] is a_part and a_part.seq_len == positions_before

    # both sessions go on exactly as fresh parts fed the same inputs would
    for seq in (1, 2):
        assert torch.equal(forward(service, a, seq, XS[seq]), ref_x[seq])
        assert torch.equal(forward(service, b, seq, YS[seq]), ref_y[seq])
    # and a session opened after the bad frame starts from a clean state
    c = open_session(service)
    assert torch.equal(forward(service, c, 0, XS[0]), ref_x[0])


def test_many_bad_frames_in_a_row(service, ref_x):
    a = open_session(service)
    forward(service, a, 0, XS[0])
    for name, (build, _reason, _echoes) in BAD_FRAMES.items():
        assert decode_frame(service.handle(build(a, 1))).kind == FrameKind.ERROR, name
    assert list(service.sessions) == [a]
    assert torch.equal(forward(service, a, 1, XS[1]), ref_x[1])
    assert torch.equal(forward(service, a, 2, XS[2]), ref_x[2])


def test_oversized_frame_is_refused_before_decoding(trunk):
    # a limit below a valid frame's size: the same frame that works elsewhere is refused on size alone
    service = PartService({PART: trunk}, hidden_size=HIDDEN, max_frame_bytes=100)
    session = open_session(service)
    data = encode_frame(Frame(FrameKind.FORWARD, XS[1], session=session, seq=0, part=PART))
    reply = decode_frame(service.handle(data))
    assert reply.kind == FrameKind.ERROR
    assert f"frame of {len(data)} bytes exceeds the limit of 100" in reply.message
    assert service.sessions[session].next_seq == 0


class _SpyPart(Part):
    """A stand-in part that records what reaches it."""

    start, end = 2, 4

    def __init__(self, calls):
        self.calls = calls

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return x.clone()

    def clone(self):
        return _SpyPart(self.calls)


def test_spy_part_sees_valid_frames():
    calls = []
    service = PartService({PART: _SpyPart(calls)}, hidden_size=HIDDEN)
    session = open_session(service)
    forward(service, session, 0, XS[0])
    assert calls == [(1, 4, HIDDEN)]


def test_refused_frames_never_reach_the_part():
    calls = []
    service = PartService({PART: _SpyPart(calls)}, hidden_size=HIDDEN, max_frame_bytes=MAX_FRAME)
    session = open_session(service)
    forward(service, session, 0, XS[0])
    for name, (build, _reason, _echoes) in BAD_FRAMES.items():
        reply = decode_frame(service.handle(build(session, 1)))
        assert reply.kind == FrameKind.ERROR, name
    assert calls == [(1, 4, HIDDEN)]
    assert service.sessions[session].next_seq == 1


def test_empty_batch_with_huge_position_count_is_refused():
    calls = []
    service = PartService({PART: _SpyPart(calls)}, hidden_size=HIDDEN)
    session = open_session(service)
    header = _FIXED.pack(b"SV", 1, int(FrameKind.FORWARD), 1, 3, PART, 0, session, 0)
    data = header + struct.pack("<3I", 0, 2**32 - 1, HIDDEN)
    assert len(data) == 40
    reply = decode_frame(service.handle(data))
    assert calls == []  # the part must never see it
    assert reply.kind == FrameKind.ERROR
    assert service.sessions[session].tokens == 0


def test_batch_and_session_position_limits():
    calls = []
    service = PartService({PART: _SpyPart(calls)}, hidden_size=HIDDEN, max_batch=2, max_tokens=10)
    session = open_session(service)
    too_wide = send(service, Frame(FrameKind.FORWARD, randn(3, 1, HIDDEN, seed=1), session=session, seq=0, part=PART))
    assert too_wide.kind == FrameKind.ERROR and "batch of 3" in too_wide.message
    assert send(service, Frame(FrameKind.FORWARD, randn(1, 8, HIDDEN, seed=2), session=session, seq=0, part=PART)).kind == FrameKind.RESULT
    too_long = send(service, Frame(FrameKind.FORWARD, randn(1, 3, HIDDEN, seed=3), session=session, seq=1, part=PART))
    assert too_long.kind == FrameKind.ERROR and "limit of 10 positions" in too_long.message
    assert send(service, Frame(FrameKind.FORWARD, randn(1, 2, HIDDEN, seed=4), session=session, seq=1, part=PART)).kind == FrameKind.RESULT
    assert calls == [(1, 8, HIDDEN), (1, 2, HIDDEN)]


class _LoudPart(_SpyPart):
    def forward(self, x):
        return x * 1e6

    def clone(self):
        return _LoudPart(self.calls)


def test_fp16_reply_overflow_is_refused_not_sent_as_inf():
    service = PartService({PART: _LoudPart([])}, hidden_size=HIDDEN)
    session = open_session(service)
    reply = send(service, Frame(FrameKind.FORWARD, torch.ones(1, 1, HIDDEN), codec="fp16", session=session, seq=0, part=PART))
    assert reply.kind == FrameKind.ERROR and "overflows fp16" in reply.message
    # the refused step used up its sequence number (over the network the connection closes anyway)
    bf16 = send(service, Frame(FrameKind.FORWARD, torch.ones(1, 1, HIDDEN), codec="bf16", session=session, seq=1, part=PART))
    assert bf16.kind == FrameKind.RESULT and torch.isfinite(bf16.tensor).all()


@pytest.mark.parametrize("changes", [{"part": 256}, {"part": -1}, {"seq": 2**32}, {"seq": -1}])
def test_encoding_out_of_range_header_fields_is_a_wire_error(changes):
    from splitveil.core.errors import WireError

    with pytest.raises(WireError):
        encode_frame(Frame(FrameKind.FORWARD, torch.zeros(1, 1, HIDDEN), **changes))


# ------------------------------------------------------------------------------------- hostile frames, fuzzed

U32_MAX = 2**32 - 1


def _raw(session, *, kind=FrameKind.FORWARD, codec=1, shape=(), payload=b"", seq=0, part=PART) -> bytes:
    return _FIXED.pack(b"SV", 1, int(kind), codec, len(shape), part, 0, session, seq) + struct.pack(f"<{len(shape)}I", *shape) + payload


# the acceptance check's cases (shared/checks/lib/hostile_frames.py) and their neighbours
HOSTILE = {
    "zero-size shape with huge dims": dict(codec=1, shape=(0, U32_MAX, U32_MAX)),
    "zero-size fp16 shape": dict(codec=2, shape=(2**31, 0, 576)),
    "zero positions, huge batch": dict(codec=3, shape=(U32_MAX, 0, HIDDEN)),
    "shape product overflowing 64 bits": dict(codec=1, shape=(U32_MAX,) * 4, payload=b"\0" * 16),
    "uint8 tensor in a FORWARD": dict(codec=5, shape=(1, 1, HIDDEN), payload=b"\1" * HIDDEN),
    "huge empty CLOSE": dict(kind=FrameKind.CLOSE, codec=1, shape=(0, U32_MAX, U32_MAX)),
    "huge empty OPEN": dict(kind=FrameKind.OPEN, codec=1, shape=(0, U32_MAX, U32_MAX)),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_frame_gets_one_line_error_and_never_raises(name, caplog):
    calls = []
    service = PartService({PART: _SpyPart(calls)}, hidden_size=HIDDEN)
    session = open_session(service)
    with caplog.at_level("DEBUG", logger="splitveil.serve.service"):
        raw_reply = service.handle(_raw(session, **HOSTILE[name]))  # must not raise
    reply = decode_frame(raw_reply)
    assert reply.kind == FrameKind.ERROR and reply.message and "\n" not in reply.message
    assert calls == [] and service.sessions[session].tokens == 0 and list(service.sessions) == [session]
    refusals = [r for r in caplog.records if r.name == "splitveil.serve.service"]
    assert len(refusals) == 1 and refusals[0].exc_info is None and "\n" not in refusals[0].getMessage()


def test_admit_never_raises_even_on_an_internal_error(monkeypatch, caplog):
    service = PartService({PART: _SpyPart([])}, hidden_size=HIDDEN)
    session = open_session(service)

    def broken(*args):
        raise RuntimeError("a bug\nwith two lines")

    monkeypatch.setattr(service, "_check_forward", broken)
    with caplog.at_level("WARNING", logger="splitveil.serve.service"):
        work, raw_reply = service.admit(_valid(session, 0))
    assert work is None
    reply = decode_frame(raw_reply)
    assert reply.kind == FrameKind.ERROR and reply.message == "internal server error"
    assert (reply.session, reply.seq) == (session, 0)
    assert [r.exc_info for r in caplog.records] == [None]  # one line, no traceback
    assert "\n" not in caplog.records[0].getMessage()


def _mutate(data: bytes, flips, header, shape, cut) -> bytes:
    data = bytearray(data)
    for offset, bit in flips:
        data[offset % len(data)] ^= 1 << bit
    for offset, value in header:
        if offset not in range(8, 24):  # keep the session id, so that the frame reaches the session checks
            data[offset] = value
    if shape is not None:
        old_ndim = min(data[5], 4)
        payload = data[28 + 4 * old_ndim:]
        data[5] = len(shape)
        data = data[:28] + struct.pack(f"<{len(shape)}I", *shape) + payload[: 0 if 0 in shape else None]
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.integers(min_value=0, max_value=3),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=10**5), st.integers(min_value=0, max_value=7)), max_size=3),
    header=st.lists(st.tuples(st.integers(min_value=0, max_value=27), st.integers(min_value=0, max_value=255)), max_size=2),
    shape=st.one_of(st.none(), st.lists(st.sampled_from([0, 1, 2, HIDDEN, 2**31, U32_MAX]), min_size=1, max_size=4)),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=10**5)),
    noise=st.binary(max_size=64),
)
def test_admit_never_raises_on_fuzzed_frames(which, flips, header, shape, cut, noise):
    calls = []
    service = PartService({PART: _SpyPart(calls)}, hidden_size=HIDDEN, max_frame_bytes=MAX_FRAME)
    session = open_session(service)
    valid = [_valid(session, 0), _valid(session, 0, tensor=XS[0], codec="bf16"), _valid(session, 0, kind=FrameKind.CLOSE, tensor=None),
             encode_frame(Frame(FrameKind.OPEN))][which]
    for data in (_mutate(valid, flips, header, shape, cut), noise, valid[:4] + noise):
        for bound in (None, NO_SESSION, session):
            work, reply = service.admit(data, bound_session=bound)  # must not raise
            assert (work is None) != (reply is None)
            if reply is not None:
                assert decode_frame(reply).kind in (FrameKind.ERROR, FrameKind.OK)
            else:
                assert work.frame.tensor.dim() == 3 and 0 not in work.frame.tensor.shape
                assert decode_frame(service.run([work])[0]).kind in (FrameKind.RESULT, FrameKind.ERROR)
            if session not in service.sessions:  # a mutated CLOSE got through: start over
                session = open_session(service)


# ------------------------------------------------------------------------------------- limits and accounting


def test_batch_rows_count_against_the_position_limit():
    """A [rows, positions, H] frame makes the session hold rows x positions: 8 rows do not get 8x the limit."""
    calls = []
    service = PartService({PART: _SpyPart(calls)}, hidden_size=HIDDEN, max_tokens=10)
    session = open_session(service)
    assert send(service, Frame(FrameKind.FORWARD, randn(2, 4, HIDDEN, seed=1), session=session, seq=0, part=PART)).kind == FrameKind.RESULT
    assert service.sessions[session].tokens == 8
    refused = send(service, Frame(FrameKind.FORWARD, randn(2, 2, HIDDEN, seed=2), session=session, seq=1, part=PART))
    assert refused.kind == FrameKind.ERROR and "limit of 10 positions" in refused.message
    assert send(service, Frame(FrameKind.FORWARD, randn(2, 1, HIDDEN, seed=3), session=session, seq=1, part=PART)).kind == FrameKind.RESULT
    assert service.sessions[session].tokens == 10
    assert calls == [(2, 4, HIDDEN), (2, 1, HIDDEN)]


class _CachePart(_SpyPart):
    """Keeps every input it saw, like a KV cache; `state_bytes` is exactly what it keeps."""

    def __init__(self, calls, bytes_per_position=1000):
        super().__init__(calls)
        self.bytes_per_position = bytes_per_position
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0] * x.shape[1]
        return super().forward(x)

    def state_bytes(self):
        return self.seen * self.bytes_per_position

    def clone(self):
        return _CachePart(self.calls, self.bytes_per_position)


def _forward_frame(session, seq, positions, rows=1):
    return encode_frame(Frame(FrameKind.FORWARD, torch.ones(rows, positions, HIDDEN), session=session, seq=seq, part=PART))


def test_server_wide_kv_budget_refuses_open_and_forward_when_full():
    service = PartService({PART: _CachePart([])}, hidden_size=HIDDEN, max_kv_bytes=10_000)
    a, b = open_session(service), open_session(service)
    assert decode_frame(service.handle(_forward_frame(a, 0, 4))).kind == FrameKind.RESULT
    assert service.kv_bytes == 4000 and service.sessions[a].kv_bytes == 4000
    assert decode_frame(service.handle(_forward_frame(b, 0, 2, rows=2))).kind == FrameKind.RESULT
    assert service.kv_bytes == 8000
    # 3 more positions would need 3000 bytes (the rate seen so far): refused before computing
    refused = decode_frame(service.handle(_forward_frame(b, 1, 3)))
    assert refused.kind == FrameKind.ERROR and "KV memory is full (0.009537 MiB)" in refused.message
    assert service.sessions[b].next_seq == 1 and service.sessions[b].tokens == 4 and service.kv_bytes == 8000
    assert decode_frame(service.handle(_forward_frame(b, 1, 2))).kind == FrameKind.RESULT  # exactly fits
    assert service.kv_bytes == 10_000
    full = send(service, Frame(FrameKind.OPEN))
    assert full.kind == FrameKind.ERROR and "KV memory is full" in full.message
    assert decode_frame(service.handle(_forward_frame(a, 1, 1))).kind == FrameKind.ERROR
    # closing a session gives its memory back
    assert send(service, Frame(FrameKind.CLOSE, session=a)).kind == FrameKind.OK
    assert service.kv_bytes == 6000
    c = open_session(service)
    assert decode_frame(service.handle(_forward_frame(c, 0, 4))).kind == FrameKind.RESULT
    for session in (b, c):
        service.close_session(session)
    assert service.kv_bytes == 0 and service._kv_reserved == 0


def test_kv_budget_counts_admitted_work_before_it_is_computed():
    """Work admitted in the same round is reserved at the observed rate, so one round cannot overshoot the budget."""
    service = PartService({PART: _CachePart([])}, hidden_size=HIDDEN, max_kv_bytes=10_000)
    sessions = [open_session(service) for _ in range(4)]
    assert decode_frame(service.handle(_forward_frame(sessions[0], 0, 1))).kind == FrameKind.RESULT  # learns 1000 B/position
    admitted = [service.admit(_forward_frame(s, 0, 4)) for s in sessions[1:]]
    assert [work is not None for work, _ in admitted] == [True, True, False]
    assert decode_frame(admitted[2][1]).kind == FrameKind.ERROR
    assert service._kv_reserved == 8000
    replies = service.run([work for work, _ in admitted[:2]])
    assert all(decode_frame(r).kind == FrameKind.RESULT for r in replies)
    assert service._kv_reserved == 0 and service.kv_bytes == 9000 <= service.max_kv_bytes


def test_a_session_closed_while_its_work_waits_is_not_counted():
    service = PartService({PART: _CachePart([])}, hidden_size=HIDDEN, max_kv_bytes=10_000)
    session = open_session(service)
    work, _ = service.admit(_forward_frame(session, 0, 4))
    service.close_session(session)
    service.run([work])
    assert service.kv_bytes == 0 and service._kv_reserved == 0


def test_batch_sizes_is_a_bounded_histogram():
    service = PartService({PART: _SpyPart([])}, hidden_size=HIDDEN)
    session = open_session(service)
    forward(service, session, 0, XS[0])
    for seq in range(1, 2001):
        service.handle(_valid(session, seq))
    assert len(service.batch_sizes) == 1  # one entry per batch size seen, not one per forward
    assert service.batch_sizes[1] == 2001 and max(service.batch_sizes) == 1


def test_time_spent_waiting_for_compute_is_not_idle_time():
    service = PartService({PART: _SpyPart([])}, hidden_size=HIDDEN)
    session = open_session(service)
    work, _ = service.admit(_valid(session, 0))
    time.sleep(0.05)  # queued behind other sessions' work for longer than the idle timeout
    assert service.evict_idle(0.01) == []
    service.run([work])
    assert service.evict_idle(0.01) == []  # answered just now
    time.sleep(0.05)
    assert service.evict_idle(0.01) == [session]


def test_steps_run_before_chunks_of_the_same_round():
    calls = []
    service = PartService({PART: _SpyPart(calls)}, hidden_size=HIDDEN)
    a, b = open_session(service), open_session(service)
    forward(service, b, 0, XS[0])
    chunk, _ = service.admit(_valid(a, 0, tensor=torch.ones(1, 5, HIDDEN)))
    step, _ = service.admit(_valid(b, 1))
    calls.clear()
    replies = service.run([chunk, step])
    assert calls == [(1, 1, HIDDEN), (1, 5, HIDDEN)]
    assert [decode_frame(r).seq for r in replies] == [0, 1]  # replies stay in the order of the work
