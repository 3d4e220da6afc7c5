"""One client-session base for every remote party: each reply bounded by what its request can produce and checked
before use, whichever party answers."""

from __future__ import annotations

import json

import pytest
import torch

from splitveil.core.errors import TransportError
from splitveil.transport.loopback import LoopbackTransport
from splitveil.wire.frame import Frame, FrameKind, decode_frame, encode_frame, text_frame

SESSION = bytes(range(16))


def server(result, info: dict | None = None):
    """A handler that opens a session with `info` and answers every FORWARD with `result(request)` (a Frame)."""

    def handle(data: bytes) -> bytes:
        request = decode_frame(data, finite=False)
        if request.kind == FrameKind.OPEN:
            return encode_frame(text_frame(FrameKind.OK, json.dumps(info or {}), session=SESSION))
        if request.kind == FrameKind.CLOSE:
            return encode_frame(Frame(FrameKind.OK, session=SESSION, seq=request.seq))
        return encode_frame(result(request))

    return LoopbackTransport(handle)


def slip_client(result):
    from splitveil.protect.slip.client import SlipClient

    client = SlipClient(server(result, {"slip": True}))
    client.open()
    return client


def test_the_slip_client_takes_a_well_formed_product_and_refuses_an_oversized_one():
    good = lambda r: Frame(FrameKind.RESULT, torch.zeros(3, 4, dtype=torch.int64), codec="int64", session=SESSION, seq=r.seq)  # noqa: E731
    assert slip_client(good).multiply(0, torch.zeros(3, 5, dtype=torch.int64), 4).shape == (3, 4)
    huge = lambda r: Frame(FrameKind.RESULT, torch.zeros(3, 4096, dtype=torch.int64), codec="int64", session=SESSION, seq=r.seq)  # noqa: E731
    with pytest.raises(TransportError, match="exceeds the .* bytes this request can produce"):
        slip_client(huge).multiply(0, torch.zeros(3, 5, dtype=torch.int64), 4)
    stale = lambda r: Frame(FrameKind.RESULT, torch.zeros(3, 4, dtype=torch.int64), codec="int64", session=SESSION, seq=r.seq + 1)  # noqa: E731
    with pytest.raises(TransportError, match="the SLIP executor sent sequence number"):
        slip_client(stale).multiply(0, torch.zeros(3, 5, dtype=torch.int64), 4)


def test_the_accelerator_link_bounds_its_reply_by_the_batch_logits():
    from splitveil.tee.executor import AcceleratorLink

    features = torch.zeros(2, 8)
    good = lambda r: Frame(FrameKind.RESULT, torch.zeros(2, 10), session=SESSION, seq=r.seq, part=r.part)  # noqa: E731
    assert AcceleratorLink(server(good), classes=10)(features).shape == (2, 10)
    wide = lambda r: Frame(FrameKind.RESULT, torch.zeros(2, 50_000), session=SESSION, seq=r.seq, part=r.part)  # noqa: E731
    with pytest.raises(TransportError, match="exceeds"):
        AcceleratorLink(server(wide), classes=10)(features)
    other_part = lambda r: Frame(FrameKind.RESULT, torch.zeros(2, 10), session=SESSION, seq=r.seq, part=2)  # noqa: E731
    with pytest.raises(TransportError, match="the accelerator sent a result of part 2"):
        AcceleratorLink(server(other_part), classes=10)(features)


def test_every_remote_party_client_is_a_client_session():
    from splitveil.edge.remote import RemoteStage
    from splitveil.protect.salt_client import ClassifierStage
    from splitveil.protect.slip.client import SlipClient
    from splitveil.tee.executor import AcceleratorLink, EnclaveClient
    from splitveil.transport.session import ClientSession

    for client in (RemoteStage, ClassifierStage, SlipClient, EnclaveClient, AcceleratorLink):
        assert issubclass(client, ClientSession)
