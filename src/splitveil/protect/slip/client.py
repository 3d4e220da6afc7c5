"""The trusted side's connection to the untrusted executor: one session, one FORWARD per masked product (or a few,
when the positions of a long prefill do not fit one frame)."""

from __future__ import annotations

import torch

from splitveil.core.errors import TransportError
from splitveil.protect.slip.errors import VerificationError
from splitveil.protect.slip.executor import positions_per_frame
from splitveil.transport.base import Transport
from splitveil.transport.session import ClientSession
from splitveil.wire.frame import MAX_FRAME_BYTES, NO_SESSION

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
        self._refuse_if_failed()
        if self.session == NO_SESSION:
            self.open()
        outputs = []
        step = positions_per_frame(int(self.info.get("max_frame_bytes", MAX_FRAME_BYTES)), values.shape[1], out_features)
        for start in range(0, values.shape[0], step):
            chunk = values[start : start + step]
            header = torch.tensor([group_id, chunk.shape[0]], dtype=torch.int64)
            payload = torch.cat([header, chunk.reshape(-1)])
            outputs.append(self.request(payload, codec="int64", expected_shape=(chunk.shape[0], out_features)).tensor)
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
