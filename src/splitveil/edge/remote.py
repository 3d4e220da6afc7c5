"""RemoteStage: the device's stand-in for a part that runs on a server.

It sends its input as FORWARD frames (in chunks of positions, so that no frame exceeds the server's limit) and
returns the reply's tensor. It remembers every input the remote part has processed in this session, so that when
the session is lost (server restart, eviction, dropped connection) it opens a new session, replays that history
and carries on. The rebuilt remote KV cache comes from one prefill instead of step-by-step decoding, so it equals
the lost one to float tolerance (greedy tokens are checked identical in the tests), not bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import time

import torch

from splitveil.core.errors import ConfigError, TransportError, WireError
from splitveil.transport.base import Transport
from splitveil.wire.codecs import get_codec
from splitveil.wire.frame import HEADER_FIXED_BYTES, MAX_FRAME_BYTES, NO_SESSION, Frame, FrameKind, decode_frame, encode_frame

log = logging.getLogger(__name__)
OPEN_REPLY_BYTES = HEADER_FIXED_BYTES + 4 + 65536  # an OK frame with the server's JSON info (text frames cap at 64 KiB)
ERROR_REPLY_BYTES = HEADER_FIXED_BYTES + 4 + 4096  # an ERROR frame (messages cap at 4 KiB)


class SessionLost(TransportError):
    """The server no longer knows our session (it restarted or evicted it)."""


def _connection_lost() -> tuple[type[BaseException], ...]:
    from splitveil.transport.network import ConnectionLost

    return (ConnectionLost, SessionLost)


def result_bytes(shape: tuple[int, ...], codec: str) -> int:
    """Size of a RESULT frame carrying a tensor of `shape` in `codec`."""
    return HEADER_FIXED_BYTES + 4 * len(shape) + math.prod(shape) * get_codec(codec).bytes_per_element


class RemoteStage:
    """Runs part `part_index` on the far side of `transport`.

    Every reply is checked before its tensor is used: its size is bounded by what the request can produce (the
    transport refuses a larger one while it arrives), and a RESULT must carry this request's session, sequence
    number, part and codec, a finite tensor, and the expected shape: [B, T, hidden] from a part that ends before the
    LM head, [B, 1, vocabulary] (the last position's logits) from a part that holds it.

    Args:
        transport: how frames reach the server.
        part_index: the part's index in the plan (the server must run it).
        codec: wire codec of the tensors sent (the server replies in the same codec).
        expect: facts the server's OPEN reply must confirm (e.g. {"cuts": [2, 28], "hidden_size": 576}).
        recover_seconds: how long to keep trying to reach the server again after losing it (0 = never).
        output_size: the last dimension of the part's output: the vocabulary size when it holds the LM head, else
            the hidden size (None: the hidden size the server announces).
        ends_model: the part holds the LM head and returns the last position's logits.
    """

    def __init__(self, transport: Transport, part_index: int, codec: str, *, expect: dict | None = None,
                 recover_seconds: float = 30.0, output_size: int | None = None, ends_model: bool = False):
        self.transport = transport
        self.part_index = part_index
        self.codec = codec
        self.expect = dict(expect or {})
        self.recover_seconds = recover_seconds
        self.output_size = output_size
        self.ends_model = ends_model
        self.session = NO_SESSION
        self.seq = 0
        self.info: dict = {}
        self.history: list[torch.Tensor] = []  # inputs the remote part has processed, in order
        self.keep_replies = False  # keep what the remote part returned too (to show what the server could read)
        self.replies: list[torch.Tensor] = []
        self.recoveries = 0

    # -- frames ----------------------------------------------------------------------------------------------

    def _call(self, frame: Frame, *, expected_shape: tuple[int, ...] | None = None) -> Frame:
        """Sends `frame`; returns the checked reply: an OK (OPEN, CLOSE) or a RESULT of `expected_shape`."""
        limit = ERROR_REPLY_BYTES
        if frame.kind == FrameKind.OPEN:
            limit = max(limit, OPEN_REPLY_BYTES)
        if expected_shape is not None:
            limit = max(limit, result_bytes(expected_shape, self.codec))
        previous, self.transport.max_reply_bytes = self.transport.max_reply_bytes, limit
        try:
            data = self.transport.request(encode_frame(frame))
        finally:
            self.transport.max_reply_bytes = previous
        try:
            reply = decode_frame(data, max_bytes=limit, finite=True)
        except WireError as error:
            raise TransportError(f"the server sent a malformed reply: {error.message}") from None
        if reply.kind == FrameKind.ERROR:
            message = " ".join(reply.message.split())[:300]
            if message == "unknown session" or message.startswith("session evicted"):
                raise SessionLost(f"the server lost our session: {message}")
            raise TransportError(f"the server refused the request: {message}")
        self._check_reply(frame, reply, expected_shape)
        return reply

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
            if reply.part != request.part:
                problem = f"a result of part {reply.part} where part {request.part} was expected"
            elif reply.codec != request.codec:
                problem = f"a {reply.codec} tensor where {request.codec} was expected"
            elif shape != expected_shape:
                problem = f"a result of shape {list(shape)} where {list(expected_shape or ())} was expected"
        if problem is not None:
            raise TransportError(f"the server sent {problem} (part {self.part_index}); refusing its reply")

    def expected_output_shape(self, hidden_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The RESULT shape a FORWARD of `hidden_shape` [B, T, H] must get back."""
        batch, positions = hidden_shape[0], hidden_shape[1]
        width = self.output_size or int(self.info.get("hidden_size") or self.expect.get("hidden_size") or hidden_shape[-1])
        return (batch, 1, width) if self.ends_model else (batch, positions, width)

    def open(self) -> None:
        reply = self._call(Frame(FrameKind.OPEN))
        self.session, self.seq, self.history, self.replies = reply.session, 0, [], []
        self.info = _parse_info(reply.message)
        if self.part_index not in self.info.get("parts", [self.part_index]):
            raise ConfigError(f"the server does not run part {self.part_index} of this plan")
        for key, value in self.expect.items():
            if key in self.info and self.info[key] != value:
                raise ConfigError(f"the server runs {key}={self.info[key]}, this client expects {key}={value}")

    def close(self) -> None:
        if self.session == NO_SESSION:
            return
        try:
            self._call(Frame(FrameKind.CLOSE, session=self.session, seq=self.seq))
        except (TransportError, *_connection_lost()):
            pass  # the session is gone either way
        finally:
            self.session = NO_SESSION

    @property
    def max_positions(self) -> int:
        """Positions per frame that keep a frame within the server's limit."""
        limit = int(self.info.get("max_frame_bytes", MAX_FRAME_BYTES))
        width = int(self.info.get("hidden_size", 0)) or 1
        per_position = width * get_codec(self.codec).bytes_per_element
        return max(1, (limit - HEADER_FIXED_BYTES - 4 * 3) // per_position)

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        outputs = []
        for chunk in torch.split(hidden, self.max_positions, dim=1):
            reply = self._call(Frame(FrameKind.FORWARD, chunk, codec=self.codec, session=self.session, seq=self.seq,
                                     part=self.part_index), expected_shape=self.expected_output_shape(tuple(chunk.shape)))
            self.seq += 1
            outputs.append(reply.tensor)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    # -- the stage -------------------------------------------------------------------------------------------

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        try:
            output = self._forward(hidden)
        except _connection_lost() as error:
            if self.recover_seconds <= 0:
                raise
            output = self._recover(hidden, error)
        self.history.append(hidden)
        if self.keep_replies:
            self.replies.append(output)
        return output

    def _recover(self, hidden: torch.Tensor, error: BaseException) -> torch.Tensor:
        """Opens a new session, replays the history, then runs `hidden`; retries until `recover_seconds`."""
        history, replies = list(self.history), list(self.replies)
        deadline = time.monotonic() + self.recover_seconds
        delay = 0.1
        log.warning("lost the remote session (%s); replaying %d inputs into a new one", error, len(history))
        while True:
            try:
                self.transport.close()  # a lost session's connection is of no further use
                self.session = NO_SESSION
                self.open()
                if history:
                    self._forward(torch.cat(history, dim=1))  # rebuilds the remote KV cache; outputs already used
                self.history = history
                self.replies = replies
                output = self._forward(hidden)
                self.recoveries += 1
                return output
            except _connection_lost() as again:
                if time.monotonic() > deadline:
                    raise TransportError(f"lost the server and could not recover within {self.recover_seconds:g} s: {again}") from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)


def _parse_info(message: str) -> dict:
    """The server's OPEN info (JSON), with the numbers the client computes with checked."""
    try:
        info = json.loads(message) if message else {}
    except json.JSONDecodeError:
        info = {}
    if not isinstance(info, dict):
        info = {}
    if info.get("sealed_channel") or info.get("tee"):
        raise ConfigError("this server is a trusted executor that expects a sealed channel: a plain client would hand "
                          "its hidden states to whoever relays them, so nothing was sent; connect with --attest "
                          "(and --attest-key FILE)")
    for key in ("hidden_size", "max_frame_bytes", "max_tokens"):
        value = info.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise TransportError(f"the server announced a bad {key} ({str(value)[:40]!r})")
    if not isinstance(info.get("parts", []), list):
        raise TransportError("the server announced a bad list of parts")
    return info


def probe_server(transport: Transport) -> dict:
    """Opens and closes a session to read what the server runs (model, cuts, hidden size, limits)."""
    stage = RemoteStage(transport, 0, "fp32", recover_seconds=0)
    reply = stage._call(Frame(FrameKind.OPEN))
    stage.session = reply.session
    stage.close()
    return _parse_info(reply.message)
