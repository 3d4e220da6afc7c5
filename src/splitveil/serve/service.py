"""PartService: runs the remote parts of a plan, one fresh copy of their state (KV caches) per session.

The service is transport-agnostic and synchronous. `admit(frame_bytes)` validates a frame and either answers it
at once (OPEN, CLOSE, any error) or returns a `Work` item; `run(works)` computes work items, batching decode steps
of several sessions through the same part into one forward when asked to. `handle` = admit + run, for loopback.
Nothing a client sends can raise out of these methods: a malformed or unexpected frame gets an ERROR frame back
and touches no session.

Memory: each session may hold `max_tokens` rows x positions; all sessions together may hold `max_kv_bytes` of part
state (the sum of `Part.state_bytes()`, updated per session after each compute).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from splitveil.core.errors import SplitveilError, WireError
from splitveil.models.splittable import Part
from splitveil.serve.ratelog import RateLimitedLog
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


@dataclass(kw_only=True)
class SessionState:
    """What every service keeps per session: who owns it, the next sequence number, and whether it is idle."""

    owner: bytes = b""  # digest of the token that opened it
    next_seq: int = 0
    last_active: float = field(default_factory=time.monotonic)  # last frame admitted or answered
    in_flight: int = 0  # admitted FORWARD frames not computed yet (a session waiting in a queue is not idle)


@dataclass
class Session(SessionState):
    parts: dict[int, Part]  # part index -> this session's copy
    tokens: int = 0  # rows x positions admitted so far (what its KV cache holds once computed)
    kv_bytes: int = 0  # its parts' state_bytes() after its last compute
    kv_tokens: int = 0  # its `tokens` at that moment
    closed: bool = False


@dataclass
class Work:
    """One admitted FORWARD frame, ready to compute."""

    session_id: bytes
    session: Session
    frame: Frame
    reserved: int = 0  # bytes of state this work is expected to add (counted against max_kv_bytes until computed)
    released: bool = False

    @property
    def is_step(self) -> bool:
        """A single-position frame (a decode step), as opposed to a prefill chunk of many positions."""
        return self.frame.tensor.shape[1] == 1


class SessionService:
    """The session plumbing every frame service shares (`PartService`, the SLIP executor, the TEE executor): `admit`
    answers OPEN and CLOSE, checks the session and its owner, hands a FORWARD to `_admit_forward`, and turns any
    error into an ERROR frame; `evict_idle` drops idle sessions.

    Subclasses set `sessions`, `max_frame_bytes`, `_lock`, and give `_open(owner, frame) -> Frame` (`frame`: the OPEN
    frame, whose payload a service may read, e.g. the dealer's seed), `_admit_forward(session, frame) -> work` (work
    with `session`, `frame` and `released`) and `_run_one(work) -> reply bytes`; `run`, `release`, `handle` and
    `close_session` here serve services without batching or reservations (`PartService` overrides them).
    """

    sessions: dict[bytes, SessionState]
    max_frame_bytes: int
    _log_source = log  # the logger refusals go to (each subclass names its own)

    @property
    def _log(self) -> RateLimitedLog:
        """This service's refusal log: `_log_source` at a bounded rate (a flood of bad frames must not flood it)."""
        limiter = self.__dict__.get("_refusals")
        if limiter is None:
            limiter = self.__dict__["_refusals"] = RateLimitedLog(self._log_source)
        return limiter

    @_log.setter
    def _log(self, value) -> None:
        self.__dict__["_refusals"] = value

    @property
    def observers(self) -> list:
        """Callbacks `observer(data)` told every frame this service receives, raw, in arrival order, before anything
        is checked: the server side's one observation hook (`Transport.observe` is the client side's). What an
        untrusted server receives is recorded through it (`slip serve --log-frames`)."""
        return self.__dict__.setdefault("_observers", [])

    def admit(self, data: bytes, *, owner: bytes = b"", bound_session: bytes | None = None) -> tuple[object | None, bytes | None]:
        """Validates one frame. Returns (work, None) for a FORWARD to compute, else (None, reply bytes).

        Args:
            owner: digest of the caller's token; sessions answer only to the token that opened them.
            bound_session: the one session this caller's connection may use: NO_SESSION for a connection that has
                opened none yet (it may only OPEN), None for in-process callers (any session of `owner`).
        """
        for observer in self.__dict__.get("_observers", ()):
            observer(bytes(data) if isinstance(data, (bytearray, memoryview)) else data)
        frame = None
        try:
            frame = decode_frame(data, max_bytes=self.max_frame_bytes)
            if not isinstance(frame, Frame):  # cannot happen; keeps the promise below even if decoding changes
                raise WireError("undecodable frame")
            if frame.kind == FrameKind.OPEN:
                if bound_session not in (None, NO_SESSION):
                    raise WireError("this connection already has a session")
                return None, encode_frame(self._open(owner, frame))
            session = self._session(frame.session, owner, bound_session)
            if frame.kind == FrameKind.CLOSE:
                self.close_session(frame.session)
                return None, encode_frame(Frame(FrameKind.OK, session=frame.session, seq=frame.seq))
            if frame.kind == FrameKind.TRUNCATE:
                self._truncate(session, frame)
                session.next_seq += 1
                session.last_active = time.monotonic()
                return None, encode_frame(Frame(FrameKind.OK, session=frame.session, seq=frame.seq))
            if frame.kind != FrameKind.FORWARD:
                raise WireError(f"a client may not send {frame.kind.name} frames")
            work = self._admit_forward(session, frame)  # checks the frame and counts it against the limits
            session.next_seq += 1
            with self._lock:
                session.in_flight += 1
            session.last_active = time.monotonic()
            return work, None
        except SplitveilError as error:
            self._log.warning("refused a frame: %s", _one_line(error.message))
            return None, error_reply(error.message, frame)
        except Exception as error:  # a bug must not escape to the transport; the client still gets its ERROR frame
            self._log.error("refused a frame after an internal error: %s: %s", type(error).__name__, _one_line(str(error)))
            self._log.debug("internal error while admitting a frame", exc_info=True)
            return None, error_reply("internal server error", frame)

    def _open(self, owner: bytes, frame: Frame | None = None) -> Frame:
        raise NotImplementedError

    def _admit_forward(self, session: SessionState, frame: Frame):
        raise NotImplementedError

    def _run_one(self, work) -> bytes:
        raise NotImplementedError

    def _truncate(self, session: SessionState, frame: Frame) -> None:
        """Rolls a session's state back (TRUNCATE); a service without per-position state refuses it."""
        raise WireError("this server keeps no positions to roll back")

    def _failure_message(self, error: Exception) -> str:
        """What the client is told when computing its frame failed (nothing internal by default)."""
        return "internal server error"

    def close_session(self, session_id: bytes) -> bool:
        return self.sessions.pop(session_id, None) is not None

    def release(self, work) -> None:
        """Ends an admitted FORWARD (computed or dropped); its session may go idle again."""
        if work.released:
            return
        work.released = True
        with self._lock:
            work.session.in_flight -= 1
        work.session.last_active = time.monotonic()

    def run(self, works: list) -> list[bytes]:
        """Computes each admitted frame with `_run_one`; replies in order. Never raises."""
        replies = []
        for work in works:
            try:
                replies.append(self._run_one(work))
            except Exception as error:  # a bug must not take the server or other sessions down
                self._log.error("forward failed: %s: %s", type(error).__name__, _one_line(str(error)))
                replies.append(error_reply(self._failure_message(error), work.frame))
            finally:
                self.release(work)
        return replies

    def handle(self, data: bytes, *, owner: bytes = b"") -> bytes:
        """Admits and computes one frame (loopback use). Never raises."""
        work, reply = self.admit(data, owner=owner)
        return reply if work is None else self.run([work])[0]

    def _session(self, session_id: bytes, owner: bytes, bound_session: bytes | None):
        session = self.sessions.get(session_id)
        if session is None or session_id == NO_SESSION:
            raise WireError("unknown session")
        if bound_session == NO_SESSION:
            raise WireError("open a session on this connection first")
        if (bound_session is not None and session_id != bound_session) or not secrets.compare_digest(session.owner, owner):
            raise WireError("this session belongs to another client")
        return session

    def evict_idle(self, idle_seconds: float) -> list[bytes]:
        """Drops sessions idle for longer than `idle_seconds`; returns their ids. A session whose frame waits for
        compute is not idle, however long it waits."""
        now = time.monotonic()
        stale = [sid for sid, s in self.sessions.items() if not s.in_flight and now - s.last_active > idle_seconds]
        for sid in stale:
            self.close_session(sid)
        return stale


def error_reply(message: str, frame: Frame | None) -> bytes:
    """An ERROR frame of one line answering `frame` (or no session, when there is no frame to answer)."""
    try:
        return encode_frame(error_frame(_one_line(message), session=frame.session if frame else NO_SESSION,
                                        seq=frame.seq if frame else 0))
    except Exception:  # e.g. a frame object with fields that cannot be encoded back
        return encode_frame(error_frame(_one_line(message)))


class PartService(SessionService):
    """Serves `parts` (part index in the plan -> Part) to sessions.

    Args:
        parts: the remote parts; each session gets `part.clone()` (shared weights, own cache).
        hidden_size: the width every float tensor must have in its last dimension.
        info: what OPEN replies tell the client (model, plan, limits), as JSON.
        max_frame_bytes: frames above this size are refused before decoding.
        max_sessions: OPEN beyond this many live sessions is refused.
        max_tokens: rows x positions one session may process in all (the model's context length).
        max_batch: rows one FORWARD frame may carry.
        batch_steps: compute concurrent single-position steps of many sessions as one batched forward.
        max_kv_bytes: bytes of part state (KV caches) all sessions together may hold; None = no server-wide bound.
            When the sum of `state_bytes()` plus what admitted work is expected to add reaches it, OPEN and FORWARD
            frames are refused with an ERROR frame until sessions close.
        input_shapes: part index -> the exact shape of one example of that part's input, for parts that take
            something else than hidden states (a CNN's cloud part: (channels, height, width)). Such a part's FORWARD
            must carry a float tensor [batch, *shape]; it is counted as `batch` positions and never batched with
            other sessions. Parts not listed take [batch, positions, hidden_size], as before.
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
        max_kv_bytes: int | None = None,
        input_shapes: dict[int, tuple[int, ...]] | None = None,
    ):
        self.parts = dict(parts)
        self.input_shapes = {int(i): tuple(int(d) for d in shape) for i, shape in (input_shapes or {}).items()}
        self.hidden_size = hidden_size
        self.max_frame_bytes = max_frame_bytes
        self.max_sessions = max_sessions
        self.max_tokens = max_tokens
        self.max_batch = max_batch
        self.batch_steps = batch_steps
        self.max_kv_bytes = max_kv_bytes
        self.info = {**(info or {}), "parts": sorted(self.parts), "hidden_size": hidden_size,
                     "max_frame_bytes": max_frame_bytes, "max_tokens": max_tokens}
        if self.input_shapes:
            self.info["input_shapes"] = {str(i): list(shape) for i, shape in sorted(self.input_shapes.items())}
            self.info["max_batch"] = max_batch
        self.sessions: dict[bytes, Session] = {}
        self.batch_sizes: Counter[int] = Counter()  # batch size -> forwards computed at that size (bounded histogram)
        # server-wide state accounting; admit/close run on the event loop, run() on the compute thread
        self._lock = threading.Lock()
        self.kv_bytes = 0  # sum of the live sessions' kv_bytes
        self._kv_reserved = 0  # sum of the reservations of admitted, not yet computed work
        self._kv_tokens = 0  # sum of the live sessions' kv_tokens
        self._bytes_per_position = 0.0  # kv_bytes / _kv_tokens, the last known (to reserve for new work)

    # -- admission -------------------------------------------------------------------------------------------

    def _admit_forward(self, session: Session, frame: Frame) -> Work:
        self._check_forward(session, frame)
        rows_positions = self._positions(frame)
        reserved = self._reserve(rows_positions)
        session.tokens += rows_positions
        return Work(frame.session, session, frame, reserved=reserved)

    # -- memory accounting -----------------------------------------------------------------------------------

    def _reserve(self, rows_positions: int) -> int:
        """Counts the state a FORWARD of `rows_positions` will add (at the bytes per row x position the live sessions
        hold on average); refuses it when that does not fit the server-wide budget."""
        if self.max_kv_bytes is None:
            return 0
        estimate = int(rows_positions * self._bytes_per_position)
        with self._lock:
            committed = self.kv_bytes + self._kv_reserved
            if committed >= self.max_kv_bytes or committed + estimate > self.max_kv_bytes:
                raise WireError(f"the server's KV memory is full ({_mib(self.max_kv_bytes)}); try again later")
            self._kv_reserved += estimate
        return estimate

    def release(self, work: Work) -> None:
        """Ends an admitted FORWARD (computed or dropped): frees its reservation; its session may go idle again."""
        if work.released:
            return
        work.released = True
        with self._lock:
            self._kv_reserved -= work.reserved
            work.session.in_flight -= 1
        work.session.last_active = time.monotonic()

    def _account(self, session: Session) -> None:
        """Re-reads a session's state size after a compute (cheap: one call per part)."""
        held = sum(part.state_bytes() for part in session.parts.values())
        with self._lock:
            if session.closed:
                return
            self.kv_bytes += held - session.kv_bytes
            self._kv_tokens += session.tokens - session.kv_tokens
            session.kv_bytes, session.kv_tokens = held, session.tokens
            if self._kv_tokens > 0:  # the average over sessions: spare capacity of short ones does not inflate it
                self._bytes_per_position = self.kv_bytes / self._kv_tokens

    def _open(self, owner: bytes, frame: Frame | None = None) -> Frame:
        if len(self.sessions) >= self.max_sessions:
            raise WireError(f"the server is full ({self.max_sessions} sessions)")
        if self.max_kv_bytes is not None and self.kv_bytes + self._kv_reserved >= self.max_kv_bytes:
            raise WireError(f"the server's KV memory is full ({_mib(self.max_kv_bytes)}); try again later")
        session_id = secrets.token_bytes(16)
        self.sessions[session_id] = Session({index: part.clone() for index, part in self.parts.items()}, owner=owner)
        return text_frame(FrameKind.OK, json.dumps(self.info), session=session_id)

    def _check_forward(self, session: Session, frame: Frame) -> None:
        if frame.seq != session.next_seq:
            raise WireError(f"frame out of order: expected sequence number {session.next_seq}, got {frame.seq}")
        if frame.part not in session.parts:
            raise WireError(f"this server does not run part {frame.part}")
        tensor = frame.tensor
        if tensor is None or frame.codec not in FLOAT_CODECS:
            raise WireError("a forward frame must carry a float tensor (fp32, fp16 or bf16)")
        shape = self.input_shapes.get(frame.part)
        if shape is not None:
            if tensor.dim() != 1 + len(shape) or tuple(tensor.shape[1:]) != shape or tensor.shape[0] == 0:
                raise WireError(f"expected inputs of shape [batch, {', '.join(map(str, shape))}], got {list(tensor.shape)}")
        elif tensor.dim() != 3 or tensor.shape[-1] != self.hidden_size or 0 in tensor.shape:
            raise WireError(f"expected hidden states of shape [batch, positions, {self.hidden_size}], got {list(tensor.shape)}")
        if tensor.shape[0] > self.max_batch:
            raise WireError(f"batch of {tensor.shape[0]} exceeds the limit of {self.max_batch}")
        if session.tokens + self._positions(frame) > self.max_tokens:
            raise WireError(f"the session would exceed its limit of {self.max_tokens} positions (rows x positions)")

    def _truncate(self, session: Session, frame: Frame) -> None:
        """TRUNCATE: part `frame.part` of the session keeps its first N positions (N: the int64 [1] payload), for
        speculative decoding's rejected positions. Checked first, so a refused frame changes nothing: the sequence
        number, the part, the payload, N <= the positions held, and no FORWARD of the session waiting for compute
        (the compute thread may be using its caches; a client waits for its replies before rolling back)."""
        if frame.seq != session.next_seq:
            raise WireError(f"frame out of order: expected sequence number {session.next_seq}, got {frame.seq}")
        part = session.parts.get(frame.part)
        if part is None:
            raise WireError(f"this server does not run part {frame.part}")
        if frame.part in self.input_shapes:
            raise WireError(f"part {frame.part} keeps no positions to roll back")
        tensor = frame.tensor
        if tensor is None or frame.codec != "int64" or tuple(tensor.shape) != (1,):
            raise WireError("a truncate frame carries one int64: the positions to keep")
        length = int(tensor[0])
        if not 0 <= length <= part.positions:
            raise WireError(f"cannot keep {length} positions: part {frame.part} of this session holds {part.positions}")
        with self._lock:
            if session.in_flight:
                raise WireError("cannot roll back while a forward of this session waits for compute")
        rows = max(1, session.tokens // max(1, sum(p.positions for p in session.parts.values())))  # batch rows
        try:
            part.truncate(length)
        except SplitveilError as error:
            raise WireError(error.message) from None
        session.tokens = rows * sum(p.positions for p in session.parts.values())

    def _positions(self, frame: Frame) -> int:
        """What a FORWARD counts against the limits: rows x positions of hidden states, or rows of shaped inputs."""
        if frame.part in self.input_shapes:
            return frame.tensor.shape[0]
        return frame.tensor.shape[0] * frame.tensor.shape[1]

    def close_session(self, session_id: bytes) -> bool:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        with self._lock:
            session.closed = True
            self.kv_bytes -= session.kv_bytes
            self._kv_tokens -= session.kv_tokens
            session.kv_bytes = session.kv_tokens = 0
        return True

    # -- compute ---------------------------------------------------------------------------------------------

    def run(self, works: list[Work]) -> list[bytes]:
        """Computes admitted work; replies in the same order. Never raises."""
        try:
            return self._run(works)
        except Exception as error:  # a bug in the grouping itself: every frame still gets its reply
            log.error("compute round failed: %s: %s", type(error).__name__, _one_line(str(error)))
            log.debug("compute round failed", exc_info=True)
            return [error_reply("internal server error", work.frame) for work in works]
        finally:
            for work in works:
                try:
                    self._account(work.session)
                except Exception as error:
                    log.error("state accounting failed: %s: %s", type(error).__name__, _one_line(str(error)))
                self.release(work)

    def _run(self, works: list[Work]) -> list[bytes]:
        """Decode steps first (batched by part where possible), then the other frames in order: a step admitted
        in the same round as a prefill chunk does not wait for that chunk."""
        replies: list[bytes | None] = [None] * len(works)
        batchable: dict[int, list[int]] = {}
        singles: list[int] = []
        for index, work in enumerate(works):
            tensor = work.frame.tensor
            if (self.batch_steps and work.frame.part not in self.input_shapes and tensor.shape[0] == 1
                    and tensor.shape[1] == 1 and work.session.tokens > 1):
                batchable.setdefault(work.frame.part, []).append(index)
            else:
                singles.append(index)
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
        for index in sorted(singles, key=lambda i: not works[i].is_step):
            replies[index] = self._run_one(works[index])
        return replies  # type: ignore[return-value]

    def _run_one(self, work: Work) -> bytes:
        try:
            output = work.session.parts[work.frame.part](work.frame.tensor)
            work.session.last_active = time.monotonic()
            self.batch_sizes[1] += 1
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
        self.batch_sizes[len(works)] += 1
        return outputs

    def _reply(self, work: Work, output: torch.Tensor) -> bytes:
        frame = work.frame
        if frame.codec == "fp16" and output.is_floating_point() and float(output.abs().max()) > FP16_MAX:
            return encode_frame(error_frame("the part's output overflows fp16; use the fp32 or bf16 wire",
                                            session=work.session_id, seq=frame.seq))
        return encode_frame(Frame(FrameKind.RESULT, output, codec=frame.codec, session=work.session_id, seq=frame.seq, part=frame.part))



def _one_line(text: str) -> str:
    return " ".join(text.split()) or "error"


def _mib(size: int) -> str:
    return f"{size / 2**20:.4g} MiB"
