"""One client session with a remote frame service: the base of every client of a remote party (`edge.remote.RemoteStage`
and its subclasses, `protect.slip.client.SlipClient`, `tee.executor.EnclaveClient` and `AcceleratorLink`).

`ClientSession` opens the session (the server's info checked against what the client expects), sends each request
with the session's id and next sequence number, bounds every reply by what that request can produce (the transport
refuses a larger one while it arrives, the decoder again), checks the reply (kind, session, sequence number, codec,
shape, and the part where the protocol echoes it) before anything uses it, turns an ERROR frame into one line, and
closes. Byte and round-trip accounting is the transport's. Replay after a lost connection is `RemoteStage`'s, the one
client whose server keeps state it can rebuild.
"""

from __future__ import annotations

import json
import math

from splitveil.core.errors import TransportError, WireError
from splitveil.wire.codecs import get_codec
from splitveil.wire.frame import HEADER_FIXED_BYTES, NO_SESSION, Frame, FrameKind, decode_frame, encode_frame, int64_result

OPEN_REPLY_BYTES = HEADER_FIXED_BYTES + 4 + 65536  # an OK frame with the server's JSON info (text frames cap at 64 KiB)
ERROR_REPLY_BYTES = HEADER_FIXED_BYTES + 4 + 4096  # an ERROR frame (messages cap at 4 KiB)


class SessionLost(TransportError):
    """The server no longer knows our session (it restarted or evicted it)."""


def result_bytes(shape: tuple[int, ...], codec: str) -> int:
    """Size of a RESULT frame carrying a tensor of `shape` in `codec`."""
    return HEADER_FIXED_BYTES + 4 * len(shape) + math.prod(shape) * get_codec(codec).bytes_per_element


class ClientSession:
    """One session with the frame service behind `transport`.

    Subclasses name the party (`what`, for errors), say whether its RESULT frames echo the request's part
    (`echoes_part`) and may refine `parse_info` (the OPEN reply's JSON) and `refused` (an ERROR reply).

    Args:
        transport: how frames reach the server.
        expect: facts the server's OPEN reply must confirm (checked by `check_info`).
    """

    what = "the server"
    echoes_part = False
    finite_replies = True  # refuse non-finite tensors in replies (floating-point protocols)

    def __init__(self, transport, *, expect: dict | None = None):
        self.transport = transport
        self.expect = dict(expect or {})
        self.session = NO_SESSION
        self.seq = 0
        self.info: dict = {}

    # -- one exchange ----------------------------------------------------------------------------------------

    def _call(self, frame: Frame, *, expected_shape: tuple[int, ...] | None = None, reply_bytes: int | None = None) -> Frame:
        """Sends `frame`; returns its checked reply: an OK (OPEN, CLOSE) or a RESULT, of `expected_shape` when given.
        The reply may be at most `reply_bytes` long (default: a RESULT of `expected_shape` in the request's codec, or
        an OK or ERROR frame)."""
        limit = self._reply_limit(frame, expected_shape, reply_bytes)
        previous, self.transport.max_reply_bytes = self.transport.max_reply_bytes, limit
        try:
            data = self.transport.request(encode_frame(frame))
        finally:
            self.transport.max_reply_bytes = previous
        return self._checked_reply(frame, data, limit, expected_shape)

    @staticmethod
    def _reply_limit(frame: Frame, expected_shape: tuple[int, ...] | None, reply_bytes: int | None) -> int:
        limit = ERROR_REPLY_BYTES
        if frame.kind == FrameKind.OPEN:
            limit = max(limit, OPEN_REPLY_BYTES)
        if reply_bytes is not None:
            limit = max(limit, reply_bytes)
        elif expected_shape is not None:
            limit = max(limit, result_bytes(expected_shape, frame.codec))
        return limit

    def _checked_reply(self, frame: Frame, data: bytes, limit: int, expected_shape: tuple[int, ...] | None) -> Frame:
        try:
            reply = decode_frame(data, max_bytes=limit, finite=self.finite_replies)
        except WireError as error:
            raise TransportError(f"{self.what} sent a malformed reply: {error.message}") from None
        if reply.kind == FrameKind.ERROR:
            self.refused(" ".join(reply.message.split())[:300])
        self._check_reply(frame, reply, expected_shape)
        return reply

    def refused(self, message: str) -> None:
        """An ERROR reply: raises (SessionLost when the server lost the session)."""
        if message == "unknown session" or message.startswith("session evicted"):
            raise SessionLost(f"{self.what} lost our session: {message}")
        raise TransportError(f"{self.what} refused the request: {message}")

    def _check_reply(self, request: Frame, reply: Frame, expected_shape: tuple[int, ...] | None) -> None:
        want = FrameKind.RESULT if request.kind == FrameKind.FORWARD else FrameKind.OK
        problem = None
        if reply.kind != want:
            problem = f"a {reply.kind.name} frame where {want.name} was expected"
        elif request.kind == FrameKind.OPEN:
            if reply.session == NO_SESSION:
                problem = "an OPEN reply without a session id"
        elif reply.session != request.session:
            problem = "a reply for another session"
        elif reply.seq != request.seq:
            problem = f"sequence number {reply.seq} where {request.seq} was expected"
        elif want == FrameKind.RESULT:
            shape = tuple(reply.tensor.shape) if reply.tensor is not None else ()
            if reply.tensor is None:
                problem = "a result without a tensor"
            elif self.echoes_part and reply.part != request.part:
                problem = f"a result of part {reply.part} where part {request.part} was expected"
            elif reply.codec != request.codec:
                problem = f"a {reply.codec} tensor where {request.codec} was expected"
            elif expected_shape is not None and shape != tuple(expected_shape):
                problem = f"a result of shape {list(shape)} where {list(expected_shape)} was expected"
        if problem is not None:
            raise TransportError(f"{self.what} sent {problem}; refusing its reply")

    # -- the session -----------------------------------------------------------------------------------------

    def parse_info(self, message: str) -> dict:
        """The server's OPEN info: a JSON object ({} when it sent none)."""
        try:
            info = json.loads(message) if message else {}
        except json.JSONDecodeError:
            info = {}
        return info if isinstance(info, dict) else {}

    def check_info(self, info: dict) -> None:
        """Raises when the server is not what this client expects (default: each key of `expect` it announces
        must have the expected value)."""
        from splitveil.core.errors import ConfigError

        for key, value in self.expect.items():
            if key in info and info[key] != value:
                raise ConfigError(f"{self.what} runs {key}={info[key]}, this client expects {key}={value}")

    def open(self, payload=None) -> dict:
        """Opens a session; returns the server's info. `payload`: a uint8 tensor the OPEN frame carries (the
        dealer's seed), None for every other service."""
        reply = self._call(Frame(FrameKind.OPEN, payload, codec="uint8") if payload is not None else Frame(FrameKind.OPEN))
        info = self.parse_info(reply.message)
        self.check_info(info)
        self.session, self.seq, self.info = reply.session, 0, info
        return info

    def request(self, tensor, *, codec: str, part: int = 0, expected_shape: tuple[int, ...] | None = None,
                reply_bytes: int | None = None) -> Frame:
        """Sends `tensor` as the session's next FORWARD; returns the checked RESULT."""
        reply = self._call(Frame(FrameKind.FORWARD, tensor, codec=codec, session=self.session, seq=self.seq, part=part),
                           expected_shape=expected_shape, reply_bytes=reply_bytes)
        self.seq += 1
        return reply

    def post(self, tensor, *, codec: str, kind: FrameKind = FrameKind.FORWARD, part: int = 0) -> Frame:
        """Sends `tensor` as the session's next FORWARD (or `kind`) without waiting for the reply (the transport must
        pipeline); `collect` returns the checked replies in the order they were posted. Returns the frame sent."""
        frame = Frame(kind, tensor, codec=codec, session=self.session, seq=self.seq, part=part)
        self.transport.post(encode_frame(frame))
        self.seq += 1
        return frame

    def collect(self, frame: Frame, *, expected_shape: tuple[int, ...] | None, overlapped: bool = False) -> Frame:
        """The checked reply of `frame`, the oldest request `post` sent, bounded by `expected_shape` while it
        arrives (None: an OK or ERROR frame)."""
        data, limit = self._collect_bytes(frame, expected_shape, overlapped=overlapped)
        return self._checked_reply(frame, data, limit, expected_shape)

    def collect_int64(self, frame: Frame, shape: tuple[int, ...]):
        """`collect` for a reply that must be an int64 tensor of `shape`: a numpy array viewing the received bytes
        (no decode copy: mask terms come in megabytes per decode step). Anything else is checked the general way,
        which raises with what it is."""
        data, limit = self._collect_bytes(frame, shape)
        array = int64_result(data, shape, session=frame.session, seq=frame.seq)
        return array if array is not None else self._checked_reply(frame, data, limit, shape).tensor.numpy()

    def _collect_bytes(self, frame: Frame, expected_shape: tuple[int, ...] | None, *,
                       overlapped: bool = False) -> tuple[bytes, int]:
        """The raw reply of `frame` (the oldest posted request), refused while it arrives past the size `frame` can
        get back; and that size."""
        limit = self._reply_limit(frame, expected_shape, None)
        previous, self.transport.max_reply_bytes = self.transport.max_reply_bytes, limit
        try:
            return self.transport.collect(overlapped=overlapped), limit
        finally:
            self.transport.max_reply_bytes = previous

    def close(self) -> None:
        """Closes the session (a lost connection or session is closed either way)."""
        if self.session == NO_SESSION:
            return
        try:
            self._call(Frame(FrameKind.CLOSE, session=self.session, seq=self.seq))
        except TransportError:  # a lost connection (ConnectionLost) too
            pass
        finally:
            self.session = NO_SESSION
