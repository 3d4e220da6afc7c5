"""The trusted side's connection to the untrusted executor: one session, one FORWARD per masked product (or a few,
when the positions of a long prefill do not fit one frame)."""

from __future__ import annotations

import struct

import numpy as np
import torch

from splitveil.core.errors import TransportError
from splitveil.protect.slip.errors import VerificationError
from splitveil.protect.slip.executor import positions_per_frame
from splitveil.transport.base import Transport
from splitveil.transport.session import ERROR_REPLY_BYTES, ClientSession, result_bytes
from splitveil.wire.frame import MAX_FRAME_BYTES, NO_SESSION, Frame, FrameKind, int64_frame, int64_result

class SlipClient(ClientSession):
    """Sends masked inputs to an executor and returns its products (a `ClientSession`: every reply bounded by the
    product it answers, [P, m] int64).

    Args:
        transport: loopback (in-process executor) or WebSocket over TLS (an executor process).
        expect: facts the executor's OPEN reply must confirm (mode, residual digest, number of groups).
    """

    what = "the SLIP executor"
    finite_replies = False  # ring elements, or float64 bits in the float variant

    def __init__(self, transport: Transport, *, expect: dict | None = None):
        super().__init__(transport, expect=expect)
        self.failed: str | None = None  # why a check ended this client's session (then it sends nothing more)
        self._key = object()

    def check_info(self, info: dict) -> None:
        if not info.get("slip"):
            raise TransportError("the server is not a SLIP executor (give the URL of `splitveil slip serve`)")
        for key, value in self.expect.items():
            if info.get(key) != value:
                raise TransportError(f"the SLIP executor has {key}={info.get(key)!r}, this side needs {value!r}")

    def refused(self, message: str) -> None:
        self.session = NO_SESSION
        raise TransportError(f"the SLIP executor refused: {message}")

    def open(self) -> dict:
        self._refuse_if_failed()
        info = super().open()
        self._key = object()  # a new session: the trusted side draws new check vectors for it
        return info

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
        return torch.from_numpy(np.array(self.multiply_array(group_id, values.numpy(), out_features)))

    def multiply_array(self, group_id: int, values: np.ndarray, out_features: int) -> np.ndarray:
        """`multiply` on numpy int64 arrays: frames built and replies read without building tensors."""
        self._refuse_if_failed()
        if self.session == NO_SESSION:
            self.open()
        outputs = []
        n = values.shape[1]
        step = positions_per_frame(int(self.info.get("max_frame_bytes", MAX_FRAME_BYTES)), n, out_features)
        for start in range(0, values.shape[0], step):
            chunk = values[start : start + step]
            rows = chunk.shape[0]
            frame = int64_frame(FrameKind.FORWARD, struct.pack("<qq", group_id, rows) + chunk.astype("<i8", copy=False).tobytes(),
                                2 + rows * n, session=self.session, seq=self.seq)
            limit = result_bytes((rows, out_features), "int64")
            previous, self.transport.max_reply_bytes = self.transport.max_reply_bytes, max(limit, ERROR_REPLY_BYTES)
            try:
                data = self.transport.request(frame)
            finally:
                self.transport.max_reply_bytes = previous
            reply = int64_result(data, (rows, out_features), session=self.session, seq=self.seq)
            if reply is None:  # not the exact RESULT expected: the general check says what it is, and refuses it
                request = Frame(FrameKind.FORWARD, None, codec="int64", session=self.session, seq=self.seq)
                reply = self._checked_reply(request, data, max(limit, ERROR_REPLY_BYTES), (rows, out_features)).tensor.numpy()
            self.seq += 1
            outputs.append(reply)
        return np.concatenate(outputs) if len(outputs) > 1 else outputs[0]
