"""The trusted side's connection to the untrusted executor: one session, one FORWARD per masked product (or a few,
when the positions of a long prefill do not fit one frame)."""

from __future__ import annotations

import json

import torch

from splitveil.core.errors import TransportError
from splitveil.protect.slip.errors import VerificationError
from splitveil.protect.slip.executor import positions_per_frame
from splitveil.transport.base import Transport
from splitveil.wire.frame import MAX_FRAME_BYTES, NO_SESSION, Frame, FrameKind, decode_frame, encode_frame

MAX_REPLY_BYTES = 256 * 1024 * 1024


class SlipClient:
    """Sends masked inputs to an executor and returns its products.

    Args:
        transport: loopback (in-process executor) or WebSocket over TLS (an executor process).
        expect: facts the executor's OPEN reply must confirm (mode, residual digest, number of groups).
    """

    def __init__(self, transport: Transport, *, expect: dict | None = None):
        self.transport = transport
        self.expect = dict(expect or {})
        self.session = NO_SESSION
        self.seq = 0
        self.info: dict = {}
        self.failed: str | None = None  # why a check ended this client's session (then it sends nothing more)
        self._key = object()

    def open(self) -> dict:
        self._refuse_if_failed()
        reply = self._exchange(Frame(FrameKind.OPEN))
        if reply.kind != FrameKind.OK:
            raise TransportError(f"the SLIP executor did not open a session ({reply.kind.name})")
        self.session, self.seq = reply.session, 0
        self._key = object()  # a new session: the trusted side draws new check vectors for it
        self.info = json.loads(reply.message or "{}")
        if not self.info.get("slip"):
            raise TransportError("the server is not a SLIP executor (give the URL of `splitveil slip serve`)")
        for key, value in self.expect.items():
            if self.info.get(key) != value:
                raise TransportError(f"the SLIP executor has {key}={self.info.get(key)!r}, this side needs {value!r}")
        return self.info

    def session_key(self) -> object:
        """An object that changes with every session this client opens (opening one when none is open)."""
        if self.session == NO_SESSION:
            self.open()
        return self._key

    def fail(self, reason: str) -> None:
        """Ends the session after a failed check: it is closed, and this client opens no other and sends nothing."""
        self.close()
        self.failed = reason

    def _refuse_if_failed(self) -> None:
        if self.failed is not None:
            raise VerificationError(f"this SLIP session ended after a failed check ({self.failed}); start a new one")

    def multiply(self, group_id: int, values: torch.Tensor, out_features: int) -> torch.Tensor:
        """values [P, n] int64 (ring elements or float64 bits) -> the executor's [P, m] int64, in as few frames as the
        executor's frame limit allows (one round trip each; `positions_per_frame` rows per frame)."""
        self._refuse_if_failed()
        if self.session == NO_SESSION:
            self.open()
        outputs = []
        step = positions_per_frame(int(self.info.get("max_frame_bytes", MAX_FRAME_BYTES)), values.shape[1], out_features)
        for start in range(0, values.shape[0], step):
            chunk = values[start : start + step]
            header = torch.tensor([group_id, chunk.shape[0]], dtype=torch.int64)
            payload = torch.cat([header, chunk.reshape(-1)])
            reply = self._exchange(Frame(FrameKind.FORWARD, payload, codec="int64", session=self.session, seq=self.seq))
            self.seq += 1
            if reply.kind != FrameKind.RESULT or reply.tensor is None or reply.codec != "int64":
                raise TransportError(f"the SLIP executor answered a product with {reply.kind.name}")
            if tuple(reply.tensor.shape) != (chunk.shape[0], out_features):
                raise TransportError(f"the SLIP executor returned shape {list(reply.tensor.shape)} for "
                                     f"{chunk.shape[0]} x {out_features}")
            outputs.append(reply.tensor)
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def close(self) -> None:
        if self.session == NO_SESSION:
            return
        try:
            self._exchange(Frame(FrameKind.CLOSE, session=self.session, seq=self.seq))
        except TransportError:
            pass
        finally:
            self.session = NO_SESSION

    def _exchange(self, frame: Frame) -> Frame:
        reply = decode_frame(self.transport.request(encode_frame(frame)), max_bytes=MAX_REPLY_BYTES, finite=False)
        if reply.kind == FrameKind.ERROR:
            self.session = NO_SESSION
            raise TransportError(f"the SLIP executor refused: {reply.message}")
        return reply

