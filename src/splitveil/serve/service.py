"""PartService: runs the remote parts of a plan, one fresh copy of their state (KV caches) per session.

The service is transport-agnostic and synchronous. `admit(frame_bytes)` validates a frame and either answers it
at once (OPEN, CLOSE, any error) or returns a `Work` item; `run(works)` computes work items, batching decode steps
of several sessions through the same part into one forward when asked to. `handle` = admit + run, for loopback.
Nothing a client sends can raise out of these methods: a malformed or unexpected frame gets an ERROR frame back
and touches no session.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field

import torch

from splitveil.core.errors import SplitveilError, WireError
from splitveil.models.splittable import Part
from splitveil.wire.codecs import FLOAT_CODECS
from splitveil.wire.frame import (
    MAX_FRAME_BYTES,
    NO_SESSION,
    Frame,
    FrameKind,
    decode_frame,
    encode_frame,
    error_frame,
    text_frame,
)

log = logging.getLogger(__name__)
FP16_MAX = 65504.0


@dataclass
class Session:
    parts: dict[int, Part]  # part index -> this session's copy
    owner: bytes = b""  # digest of the token that opened it
    next_seq: int = 0
    tokens: int = 0  # positions processed so far
    last_active: float = field(default_factory=time.monotonic)


@dataclass
class Work:
    """One admitted FORWARD frame, ready to compute."""

    session_id: bytes
    session: Session
    frame: Frame


class PartService:
    """Serves `parts` (part index in the plan -> Part) to sessions.

    Args:
        parts: the remote parts; each session gets `part.clone()` (shared weights, own cache).
        hidden_size: the width every float tensor must have in its last dimension.
        info: what OPEN replies tell the client (model, plan, limits), as JSON.
        max_frame_bytes: frames above this size are refused before decoding.
        max_sessions: OPEN beyond this many live sessions is refused.
        max_tokens: positions one session may process in all (the model's context length).
        max_batch: rows one FORWARD frame may carry.
        batch_steps: compute concurrent single-position steps of many sessions as one batched forward.
    """

    def __init__(
        self,
        parts: dict[int, Part],
        *,
        hidden_size: int,
        info: dict | None = None,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        max_sessions: int = 64,
        max_tokens: int = 8192,
        max_batch: int = 8,
        batch_steps: bool = True,
    ):
        self.parts = dict(parts)
        self.hidden_size = hidden_size
        self.max_frame_bytes = max_frame_bytes
        self.max_sessions = max_sessions
        self.max_tokens = max_tokens
        self.max_batch = max_batch
        self.batch_steps = batch_steps
        self.info = {**(info or {}), "parts": sorted(self.parts), "hidden_size": hidden_size,
                     "max_frame_bytes": max_frame_bytes, "max_tokens": max_tokens}
        self.sessions: dict[bytes, Session] = {}
        self.batch_sizes: list[int] = []  # size of each computed batch (for benchmarks and tests)

    # -- admission -------------------------------------------------------------------------------------------

    def admit(self, data: bytes, *, owner: bytes = b"", bound_session: bytes | None = None) -> tuple[Work | None, bytes | None]:
        """Validates one frame. Returns (work, None) for a FORWARD to compute, else (None, reply bytes).

        Args:
            owner: digest of the caller's token; sessions answer only to the token that opened them.
            bound_session: the one session this caller's connection may use: NO_SESSION for a connection that has
                opened none yet (it may only OPEN), None for in-process callers (any session of `owner`).
        """
        frame = None
        try:
            frame = decode_frame(data, max_bytes=self.max_frame_bytes)
            if frame.kind == FrameKind.OPEN:
                if bound_session not in (None, NO_SESSION):
                    raise WireError("this connection already has a session")
                return None, encode_frame(self._open(owner))
            session = self._session(frame.session, owner, bound_session)
            if frame.kind == FrameKind.CLOSE:
                self.close_session(frame.session)
                return None, encode_frame(Frame(FrameKind.OK, session=frame.session, seq=frame.seq))
            if frame.kind != FrameKind.FORWARD:
                raise WireError(f"a client may not send {frame.kind.name} frames")
            self._check_forward(session, frame)
            session.next_seq += 1
            session.tokens += frame.tensor.shape[1]
            session.last_active = time.monotonic()
            return Work(frame.session, session, frame), None
        except SplitveilError as error:
            log.warning("refused a frame: %s", error.message)
            return None, encode_frame(error_frame(error.message, session=frame.session if frame else NO_SESSION,
                                                  seq=frame.seq if frame else 0))

    def _open(self, owner: bytes) -> Frame:
        if len(self.sessions) >= self.max_sessions:
            raise WireError(f"the server is full ({self.max_sessions} sessions)")
        session_id = secrets.token_bytes(16)
        self.sessions[session_id] = Session({index: part.clone() for index, part in self.parts.items()}, owner=owner)
        return text_frame(FrameKind.OK, json.dumps(self.info), session=session_id)

    def _session(self, session_id: bytes, owner: bytes, bound_session: bytes | None) -> Session:
        session = self.sessions.get(session_id)
        if session is None or session_id == NO_SESSION:
            raise WireError("unknown session")
        if bound_session == NO_SESSION:
            raise WireError("open a session on this connection first")
        if (bound_session is not None and session_id != bound_session) or not secrets.compare_digest(session.owner, owner):
            raise WireError("this session belongs to another client")
        return session

    def _check_forward(self, session: Session, frame: Frame) -> None:
        if frame.seq != session.next_seq:
            raise WireError(f"frame out of order: expected sequence number {session.next_seq}, got {frame.seq}")
        if frame.part not in session.parts:
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

    def close_session(self, session_id: bytes) -> bool:
        return self.sessions.pop(session_id, None) is not None

    def evict_idle(self, idle_seconds: float) -> list[bytes]:
        """Drops sessions idle for longer than `idle_seconds`; returns their ids."""
        now = time.monotonic()
        stale = [sid for sid, s in self.sessions.items() if now - s.last_active > idle_seconds]
        for sid in stale:
            self.close_session(sid)
        return stale

    # -- compute ---------------------------------------------------------------------------------------------

    def run(self, works: list[Work]) -> list[bytes]:
        """Computes admitted work; replies in the same order. Never raises."""
        replies: list[bytes | None] = [None] * len(works)
        batchable: dict[int, list[int]] = {}
        for index, work in enumerate(works):
            tensor = work.frame.tensor
            if self.batch_steps and tensor.shape[0] == 1 and tensor.shape[1] == 1 and work.session.tokens > 1:
                batchable.setdefault(work.frame.part, []).append(index)
            else:
                replies[index] = self._run_one(work)
        for part_index, indices in batchable.items():
            if len(indices) == 1:
                replies[indices[0]] = self._run_one(works[indices[0]])
                continue
            try:
                outputs = self._run_batch([works[i] for i in indices])
            except Exception:  # fall back to one at a time: a bad batch must not fail good sessions
                log.exception("batched step failed; running its %d steps one by one", len(indices))
                outputs = None
            for offset, i in enumerate(indices):
                replies[i] = self._reply(works[i], outputs[offset : offset + 1]) if outputs is not None else self._run_one(works[i])
        return replies  # type: ignore[return-value]

    def _run_one(self, work: Work) -> bytes:
        try:
            output = work.session.parts[work.frame.part](work.frame.tensor)
            work.session.last_active = time.monotonic()
            self.batch_sizes.append(1)
            return self._reply(work, output)
        except SplitveilError as error:
            return encode_frame(error_frame(error.message, session=work.session_id, seq=work.frame.seq))
        except Exception:  # a bug must not take the server or other sessions down
            log.exception("internal error on a forward frame")
            return encode_frame(error_frame("internal server error", session=work.session_id, seq=work.frame.seq))

    def _run_batch(self, works: list[Work]) -> torch.Tensor:
        from splitveil.models.causal_lm import forward_batched_step

        parts = [w.session.parts[w.frame.part] for w in works]
        hidden = torch.cat([w.frame.tensor for w in works], dim=0)
        outputs = forward_batched_step(parts, hidden)
        for work in works:
            work.session.last_active = time.monotonic()
        self.batch_sizes.append(len(works))
        return outputs

    def _reply(self, work: Work, output: torch.Tensor) -> bytes:
        frame = work.frame
        if frame.codec == "fp16" and output.is_floating_point() and float(output.abs().max()) > FP16_MAX:
            return encode_frame(error_frame("the part's output overflows fp16; use the fp32 or bf16 wire",
                                            session=work.session_id, seq=frame.seq))
        return encode_frame(Frame(FrameKind.RESULT, output, codec=frame.codec, session=work.session_id, seq=frame.seq, part=frame.part))

    def handle(self, data: bytes, *, owner: bytes = b"") -> bytes:
        """Admits and computes one frame (loopback use)."""
        work, reply = self.admit(data, owner=owner)
        return reply if work is None else self.run([work])[0]
