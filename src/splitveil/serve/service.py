"""PartService: runs the remote parts of a plan, one fresh copy of their state (KV caches) per session.

`handle(frame_bytes) -> reply_bytes` never raises on bad input: a malformed or unexpected frame gets an ERROR
frame back and touches no session. Transports (loopback now, network later) only move bytes to and from it.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

import torch

from splitveil.core.errors import SplitveilError, WireError
from splitveil.models.splittable import Part
from splitveil.wire.codecs import FLOAT_CODECS
from splitveil.wire.frame import MAX_FRAME_BYTES, NO_SESSION, Frame, FrameKind, decode_frame, encode_frame, error_frame

log = logging.getLogger(__name__)
FP16_MAX = 65504.0


@dataclass
class Session:
    parts: dict[int, Part]  # part index -> this session's copy
    next_seq: int = 0
    tokens: int = 0  # positions processed so far
    meta: dict = field(default_factory=dict)


class PartService:
    """Serves `parts` (part index in the plan -> Part) to sessions.

    Args:
        parts: the remote parts; each session gets `part.clone()` (shared weights, own cache).
        hidden_size: the width every float tensor must have in its last dimension.
        max_frame_bytes: frames above this size are refused before decoding.
        max_sessions: OPEN beyond this many live sessions is refused.
        max_tokens: positions one session may process in all (the model's context length).
        max_batch: rows one FORWARD frame may carry.
    """

    def __init__(
        self,
        parts: dict[int, Part],
        *,
        hidden_size: int,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        max_sessions: int = 64,
        max_tokens: int = 8192,
        max_batch: int = 8,
    ):
        self.parts = dict(parts)
        self.hidden_size = hidden_size
        self.max_frame_bytes = max_frame_bytes
        self.max_sessions = max_sessions
        self.max_tokens = max_tokens
        self.max_batch = max_batch
        self.sessions: dict[bytes, Session] = {}

    def handle(self, data: bytes) -> bytes:
        try:
            frame = decode_frame(data, max_bytes=self.max_frame_bytes)
        except WireError as error:
            log.warning("refused a frame: %s", error.message)
            return encode_frame(error_frame(error.message))
        try:
            reply = self._dispatch(frame)
        except SplitveilError as error:
            log.warning("refused a %s frame: %s", frame.kind.name, error.message)
            reply = error_frame(error.message, session=frame.session, seq=frame.seq)
        except Exception:  # a bug must not take the server or other sessions down
            log.exception("internal error on a %s frame", frame.kind.name)
            reply = error_frame("internal server error", session=frame.session, seq=frame.seq)
        return encode_frame(reply)

    def _dispatch(self, frame: Frame) -> Frame:
        if frame.kind == FrameKind.OPEN:
            return self._open()
        session = self.sessions.get(frame.session)
        if session is None or frame.session == NO_SESSION:
            raise WireError("unknown session")
        if frame.kind == FrameKind.CLOSE:
            del self.sessions[frame.session]
            return Frame(FrameKind.OK, session=frame.session, seq=frame.seq)
        if frame.kind == FrameKind.FORWARD:
            return self._forward(session, frame)
        raise WireError(f"a client may not send {frame.kind.name} frames")

    def _open(self) -> Frame:
        if len(self.sessions) >= self.max_sessions:
            raise WireError(f"the server is full ({self.max_sessions} sessions)")
        session_id = secrets.token_bytes(16)
        self.sessions[session_id] = Session({index: part.clone() for index, part in self.parts.items()})
        return Frame(FrameKind.OK, session=session_id)

    def _forward(self, session: Session, frame: Frame) -> Frame:
        if frame.seq != session.next_seq:
            raise WireError(f"frame out of order: expected sequence number {session.next_seq}, got {frame.seq}")
        part = session.parts.get(frame.part)
        if part is None:
            raise WireError(f"this server does not run part {frame.part}")
        tensor = frame.tensor
        if tensor is None or frame.codec not in FLOAT_CODECS:
            raise WireError("a forward frame must carry a float tensor (fp32, fp16 or bf16)")
        if tensor.dim() != 3 or tensor.shape[-1] != self.hidden_size or 0 in tensor.shape:
            raise WireError(f"expected hidden states of shape [batch, positions, {self.hidden_size}], got {list(tensor.shape)}")
        if tensor.shape[0] > self.max_batch:
            raise WireError(f"batch of {tensor.shape[0]} exceeds the limit of {self.max_batch}")
        if session.tokens + tensor.shape[1] > self.max_tokens:
            raise WireError(f"the session would exceed its limit of {self.max_tokens} positions")
        output: torch.Tensor = part(tensor)
        if frame.codec == "fp16" and output.is_floating_point() and float(output.abs().max()) > FP16_MAX:
            raise WireError("the part's output overflows fp16; use the fp32 or bf16 wire")
        session.next_seq += 1
        session.tokens += tensor.shape[1]
        return Frame(FrameKind.RESULT, output, codec=frame.codec, session=frame.session, seq=frame.seq, part=frame.part)
