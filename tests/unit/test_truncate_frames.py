"""TRUNCATE frames: a session's trunk rolls back to a position and then computes exactly what a session that never
saw the rejected positions computes; every malformed or untimely TRUNCATE is refused and changes nothing."""

from __future__ import annotations

import pytest
import torch

from splitveil.models.causal_lm import CausalLMSplittable
from splitveil.models.tiny import tiny_causal_lm
from splitveil.plan.plan import SplitPlan, apply
from splitveil.serve.service import PartService
from splitveil.wire.frame import Frame, FrameKind, decode_frame, encode_frame

HIDDEN = 32


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def service_for(family: str = "llama") -> PartService:
    splittable = CausalLMSplittable(tiny_causal_lm(family))
    parts = apply(splittable, SplitPlan.lambda_split(1, 3))
    return PartService({1: parts[1]}, hidden_size=HIDDEN)


class Session:
    def __init__(self, service: PartService):
        self.service = service
        reply = decode_frame(service.handle(encode_frame(Frame(FrameKind.OPEN))))
        self.id, self.seq = reply.session, 0

    def send(self, kind, tensor, *, codec="fp32", part=1, seq=None) -> Frame:
        frame = Frame(kind, tensor, codec=codec, session=self.id, seq=self.seq if seq is None else seq, part=part)
        reply = decode_frame(self.service.handle(encode_frame(frame)))
        if reply.kind != FrameKind.ERROR:
            self.seq += 1
        return reply

    def forward(self, x):
        return self.send(FrameKind.FORWARD, x)

    def truncate(self, length, **options):
        return self.send(FrameKind.TRUNCATE, torch.tensor([length], dtype=torch.int64), codec="int64", **options)


PROMPT, REJECTED, NEXT = randn(1, 5, HIDDEN, seed=1), randn(1, 3, HIDDEN, seed=2), randn(1, 1, HIDDEN, seed=3)


def test_a_rolled_back_session_computes_what_a_fresh_one_does():
    service = service_for()
    rolled = Session(service)
    rolled.forward(PROMPT)
    rolled.forward(REJECTED)
    assert rolled.truncate(6).kind == FrameKind.OK  # keeps the prompt and the first of the three
    after = rolled.forward(NEXT).tensor
    fresh = Session(service)
    expected = fresh.forward(torch.cat([PROMPT, REJECTED[:, :1], NEXT], dim=1)).tensor[:, -1:]
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    assert service.sessions[rolled.id].tokens == 7  # what the session holds counts against its limit, not more


@pytest.mark.parametrize("bad", ["beyond", "negative", "codec", "shape", "part", "seq"])
def test_a_bad_truncate_is_refused_and_changes_nothing(bad):
    service = service_for()
    session = Session(service)
    session.forward(PROMPT)
    options = {}
    length = {"beyond": 6, "negative": -1}.get(bad, 3)
    if bad == "codec":
        reply = session.send(FrameKind.TRUNCATE, torch.tensor([3.0]), codec="fp32")
    elif bad == "shape":
        reply = session.send(FrameKind.TRUNCATE, torch.tensor([3, 3], dtype=torch.int64), codec="int64")
    else:
        if bad == "part":
            options["part"] = 0
        if bad == "seq":
            options["seq"] = session.seq + 1
        reply = session.truncate(length, **options)
    assert reply.kind == FrameKind.ERROR
    assert service.sessions[session.id].parts[1].positions == 5
    after = session.forward(NEXT).tensor  # the session goes on as if nothing had been sent
    expected = Session(service).forward(torch.cat([PROMPT, NEXT], dim=1)).tensor[:, -1:]
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_truncate_while_a_forward_waits_for_compute_is_refused():
    service = service_for()
    session = Session(service)
    session.forward(PROMPT)
    work, _ = service.admit(encode_frame(Frame(FrameKind.FORWARD, NEXT, session=session.id, seq=session.seq, part=1)))
    assert work is not None
    _, reply = service.admit(encode_frame(Frame(FrameKind.TRUNCATE, torch.tensor([2]), codec="int64",
                                                session=session.id, seq=session.seq + 1, part=1)))
    assert "waits for compute" in decode_frame(reply).message
    service.run([work])
    assert service.sessions[session.id].parts[1].positions == 6


def test_sliding_window_layers_refuse_to_roll_back():
    service = service_for("gemma2")
    session = Session(service)
    session.forward(PROMPT)
    reply = session.truncate(3)
    assert reply.kind == FrameKind.ERROR and "roll back" in reply.message
    assert service.sessions[session.id].parts[1].positions == 5


def test_another_clients_session_cannot_be_truncated():
    service = service_for()
    session = Session(service)
    session.forward(PROMPT)
    _, reply = service.admit(encode_frame(Frame(FrameKind.TRUNCATE, torch.tensor([0]), codec="int64",
                                                session=session.id, seq=session.seq, part=1)), owner=b"someone else")
    assert decode_frame(reply).kind == FrameKind.ERROR
    assert service.sessions[session.id].parts[1].positions == 5
