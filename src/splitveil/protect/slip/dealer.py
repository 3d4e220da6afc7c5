"""SLIP's mask dealer: a second, non-colluding party deals the mask terms W r, so the device holds no linear weight.

Protocol (the prompt deployment, public weights, secure rank 0):

- Masks come from a PRG. At OPEN the device sends the dealer a fresh 32-byte seed over TLS (`SEED_BYTES`, from the
  operating system's CSPRNG; a new one for every session). Row `i` of linear group `g` is masked with
  r = ChaCha20(key = seed, nonce = g, blocks from i * ceil(n / 8)): 8 n bytes read as n little-endian int64, i.e.
  uniform over Z_2^64 for anyone without the seed (`MaskStream`). Device and dealer compute the same r; the
  executor never sees r nor the seed.
- The dealer holds the public weights W (the residual bundle at k = 0) and answers a request for rows
  [start_g, start_g + count_g) of every group g with u = r W^T for those rows, in one RESULT frame (`DealerService`).
  Each row of each group is dealt once, in order: a request must start where the last one ended.
- The executor computes W (x + r) as before (`executor.py`). The device unmasks with W (x + r) - W r = W x and
  checks the result (`dealt.py`): whichever party cheated, a wrong product is caught.

What the dealer receives: the seed and row counts, which depend on the prompt's length (rounded up by `--pad-to`)
and on nothing else of it. What the executor receives: x + r, one-time padded by a PRG it has no key for
(computational hiding, where device-drawn masks were information-theoretic). Trust assumption: the dealer and the
executor do not collude. If they did, the executor would subtract r and read every input in clear. Every output
says so.

Frames. OPEN carries the seed (uint8 [32]). A FORWARD carries int64 [groups, 2], rows (start, count) per group; its
RESULT is int64 [sum_g count_g * m_g]: each group's terms [count_g, m_g] flattened, in group order. Everything is
checked before any compute (seed size, shape, order, counts, the reply's size); a bad frame gets an ERROR frame
and changes no session.
"""

from __future__ import annotations

import json
import logging
import secrets
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from splitveil.core.errors import ConfigError, TransportError, WireError
from splitveil.protect.slip.fixedpoint import RingWeight
from splitveil.serve.service import SessionService, SessionState
from splitveil.transport.session import ClientSession
from splitveil.wire.frame import MAX_FRAME_BYTES, NO_SESSION, Frame, FrameKind, encode_frame, text_frame

log = logging.getLogger(__name__)
SEED_BYTES = 32
BLOCK_BYTES = 64  # one ChaCha20 block
MAX_COUNTER = 2**32  # ChaCha20's block counter (32 bits here); a group's rows never wrap it
DEFAULT_MAX_REPLY_BYTES = 256 * 1024 * 1024  # the largest RESULT a dealer sends (the device bounds it exactly)


def blocks_per_row(n: int) -> int:
    return -(-8 * n // BLOCK_BYTES)


def max_rows(n: int) -> int:
    """Rows of a group of input width n that one seed can mask (the block counter must not wrap)."""
    return MAX_COUNTER // blocks_per_row(n)


class MaskStream:
    """The masks of one session: rows of Z_2^64 drawn from ChaCha20 keyed by the session's seed."""

    def __init__(self, seed: bytes):
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a mask seed is {SEED_BYTES} bytes, not {len(seed)}")
        self.seed = bytes(seed)

    def rows(self, group_id: int, n: int, start: int, count: int) -> np.ndarray:
        """Masks [count, n] (int64, every value equally likely) for rows start .. start + count - 1 of group
        `group_id` with input width n."""
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        per_row = blocks_per_row(n)
        if start < 0 or count < 0 or (start + count) * per_row > MAX_COUNTER:
            raise ValueError(f"rows {start}..{start + count - 1} of a group of width {n} exceed what one seed masks "
                             f"({max_rows(n)} rows)")
        if count == 0:
            return np.zeros((0, n), dtype=np.int64)
        nonce = struct.pack("<II", start * per_row, group_id) + bytes(8)  # block counter, then the 96-bit nonce
        stream = Cipher(algorithms.ChaCha20(self.seed, nonce), mode=None).encryptor().update(bytes(count * per_row * BLOCK_BYTES))
        return np.frombuffer(stream, dtype="<i8").reshape(count, per_row * 8)[:, :n]


@dataclass
class DealerSession(SessionState):
    stream: MaskStream | None = None
    next_rows: list[int] = field(default_factory=list)  # per group: the next row to deal
    rows_dealt: int = 0


@dataclass
class DealerWork:
    session_id: bytes
    session: DealerSession
    frame: Frame
    spans: list[tuple[int, int]]  # per group: (start, count)
    released: bool = False

    @property
    def is_step(self) -> bool:
        return False


class DealerService(SessionService):
    """Deals mask terms r W^T for the rows a device asks for.

    Args:
        weights: group id -> W as ring elements ([m, n] int64, the fixed-point encoding the executor uses).
        info: facts OPEN replies carry (the model, the weights' digest).
        max_rows_per_request: rows of one group one request may ask for.
        max_rows_per_session: rows of all groups together one session may be dealt.
        tamper: test hook, (group id, correct terms) -> terms sent: a misbehaving dealer.
    """

    _log_source = log

    def __init__(self, weights: dict[int, torch.Tensor], *, info: dict | None = None,
                 max_frame_bytes: int = MAX_FRAME_BYTES, max_sessions: int = 16, max_rows_per_request: int = 4096,
                 max_rows_per_session: int = 1 << 22, max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES, tamper=None):
        if sorted(weights) != list(range(len(weights))):
            raise ConfigError("the dealer's groups must be numbered 0 .. groups - 1")
        if any(not isinstance(w, RingWeight) and (w.dtype != torch.int64 or w.dim() != 2) for w in weights.values()):
            raise ConfigError("the dealer multiplies with ring-encoded (int64) matrices")
        self.shapes = [tuple(weights[g].shape) for g in range(len(weights))]  # (m, n) per group
        self._products = [(w if isinstance(w, RingWeight) else RingWeight(w)).matmul
                          for w in (weights[g] for g in range(len(weights)))]
        self.max_frame_bytes = max_frame_bytes
        self.max_sessions = max_sessions
        self.max_rows_per_request = max_rows_per_request
        self.max_rows_per_session = max_rows_per_session
        self.max_reply_bytes = max_reply_bytes
        self.tamper = tamper
        self.info = {**(info or {}), "dealer": True, "groups": len(self.shapes),
                     "device": str(getattr(weights.get(0), "device", "cpu")),
                     "max_rows_per_request": max_rows_per_request, "max_reply_bytes": max_reply_bytes}
        self.sessions: dict[bytes, DealerSession] = {}
        self.rows_dealt = 0
        self.macs = 0
        self._lock = threading.Lock()

    def _open(self, owner: bytes, frame: Frame | None = None) -> Frame:
        seed = frame.tensor if frame is not None else None
        if seed is None or frame.codec != "uint8" or tuple(seed.shape) != (SEED_BYTES,):
            raise WireError(f"a dealer session opens with the device's {SEED_BYTES}-byte mask seed (uint8 [{SEED_BYTES}])")
        if len(self.sessions) >= self.max_sessions:
            raise WireError(f"the dealer is full ({self.max_sessions} sessions)")
        session_id = secrets.token_bytes(16)
        self.sessions[session_id] = DealerSession(owner=owner, stream=MaskStream(seed.numpy().tobytes()),
                                                  next_rows=[0] * len(self.shapes))
        return text_frame(FrameKind.OK, json.dumps(self.info), session=session_id)

    def _admit_forward(self, session: DealerSession, frame: Frame) -> DealerWork:
        if frame.seq != session.next_seq:
            raise WireError(f"frame out of order: expected sequence number {session.next_seq}, got {frame.seq}")
        groups = len(self.shapes)
        tensor = frame.tensor
        if tensor is None or frame.codec != "int64" or tuple(tensor.shape) != (groups, 2):
            raise WireError(f"a dealer request carries int64 [{groups}, 2]: (first row, rows) for every group")
        spans = [(int(start), int(count)) for start, count in tensor.tolist()]
        reply_bytes = 0
        for group_id, (start, count) in enumerate(spans):
            m, n = self.shapes[group_id]
            if start != session.next_rows[group_id]:
                raise WireError(f"group {group_id}: rows are dealt once and in order; the next is "
                                f"{session.next_rows[group_id]}, not {start}")
            if not 0 <= count <= self.max_rows_per_request:
                raise WireError(f"group {group_id}: {count} rows in one request; ask for 0 .. {self.max_rows_per_request}")
            if start + count > max_rows(n):
                raise WireError(f"group {group_id}: one seed masks {max_rows(n)} rows; open a new session")
            reply_bytes += 8 * count * m
        rows = sum(count for _, count in spans)
        if rows == 0:
            raise WireError("a dealer request asks for no rows")
        if reply_bytes > self.max_reply_bytes:
            raise WireError(f"the terms asked for take {reply_bytes} bytes, more than the {self.max_reply_bytes} of one reply")
        if session.rows_dealt + rows > self.max_rows_per_session:
            raise WireError(f"the session would exceed its limit of {self.max_rows_per_session} rows")
        for group_id, (start, count) in enumerate(spans):
            session.next_rows[group_id] = start + count
        session.rows_dealt += rows
        return DealerWork(frame.session, session, frame, spans)

    def _run_one(self, work: DealerWork) -> bytes:
        terms = []
        for group_id, (start, count) in enumerate(work.spans):
            if not count:
                continue
            m, n = self.shapes[group_id]
            r = torch.from_numpy(work.session.stream.rows(group_id, n, start, count).copy())
            u = self._products[group_id](r)  # [count, m] = r W^T in Z_2^64
            if self.tamper is not None:
                u = self.tamper(group_id, u)
            terms.append(u.reshape(-1))
            self.rows_dealt += count
            self.macs += count * m * n
        payload = torch.cat(terms) if len(terms) > 1 else terms[0]
        return encode_frame(Frame(FrameKind.RESULT, payload.contiguous(), codec="int64", session=work.session_id,
                                  seq=work.frame.seq))


def build_dealer_service(folder: Path, *, device: str = "cpu", **limits) -> DealerService:
    """The dealer for the public-weights bundle in `folder` (the residual bundle at secure rank 0, where W_residual is
    W): what `splitveil slip dealer` runs. The device checks the bundle's digest at OPEN, and every unmasked product
    against the public weights (`dealt.py`), so terms dealt from any other matrices are caught."""
    from splitveil.protect.slip.bundle import check_residual_only
    from splitveil.protect.slip.executor import executor_weights, load_residual

    check_residual_only(folder)
    bundle, weights = load_residual(folder)
    return DealerService(executor_weights(weights, "fixed", bundle.fixed_point, device=device),
                         info={"model": bundle.model, "residual_sha256": bundle.sha256}, **limits)


# -- the device's side -------------------------------------------------------------------------------------------


class DealerClient(ClientSession):
    """The device's session with a dealer: draws the session's seed, asks for terms ahead of use, and hands out each
    row's (r, W r) once.

    Decoding keeps `ahead` windows of `window` rows per group requested beyond the rows in use (`before_forward`),
    so a decode step finds its terms already received; `take` reads a reply only when a group runs out, and the
    time it spends blocked on the dealer is `wait_seconds`.

    Args:
        transport: a `WebSocketTransport` to `splitveil slip dealer` (it must pipeline requests).
        widths: (n, m) of every group, in group order.
        expect: facts the dealer's OPEN reply must confirm (its weights' digest, the number of groups).
    """

    what = "the mask dealer"
    finite_replies = False

    def __init__(self, transport, *, widths: list[tuple[int, int]], expect: dict | None = None, window: int = 8,
                 ahead: int = 2):
        super().__init__(transport, expect=expect)
        self.widths = list(widths)
        self.window = window
        self.ahead = ahead
        self.stream: MaskStream | None = None
        self._requested = [0] * len(widths)  # per group: rows asked for so far
        self._buffers: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in widths]  # (r, u) blocks not used yet
        self._buffered = [0] * len(widths)  # rows in those blocks
        self._in_flight: list[tuple[Frame, list[tuple[int, int]]]] = []
        self.wait_seconds = 0.0  # blocked reading the dealer's replies

    def check_info(self, info: dict) -> None:
        if not info.get("dealer"):
            raise TransportError("the server is not a SLIP mask dealer (give the URL of `splitveil slip dealer`)")
        for key, value in self.expect.items():
            if info.get(key) != value:
                raise TransportError(f"the mask dealer has {key}={info.get(key)!r}, this side needs {value!r}")
        if int(info.get("groups", -1)) != len(self.widths):
            raise TransportError(f"the mask dealer deals for {info.get('groups')} linear groups, this side has "
                                 f"{len(self.widths)}")

    def open(self, payload=None) -> dict:
        """Opens a session with a fresh seed (the OS's CSPRNG): masks never repeat across sessions."""
        import os

        seed = os.urandom(SEED_BYTES)
        info = super().open(torch.frombuffer(bytearray(seed), dtype=torch.uint8))
        self.stream = MaskStream(seed)
        self._requested = [0] * len(self.widths)
        self._buffers = [[] for _ in self.widths]
        self._buffered = [0] * len(self.widths)
        self._in_flight = []
        return info

    # -- asking ahead ----------------------------------------------------------------------------------------

    def _ask(self, counts: list[int]) -> None:
        """Posts one request for `counts[g]` more rows of every group g (split so that no reply exceeds the dealer's
        limit)."""
        limit = int(self.info.get("max_reply_bytes", DEFAULT_MAX_REPLY_BYTES)) - 64
        most = int(self.info.get("max_rows_per_request", 4096))
        counts = list(counts)
        while any(counts):
            spans, size = [], 0
            for group_id, count in enumerate(counts):
                m = self.widths[group_id][1]
                take = min(count, most, max(0, (limit - size) // (8 * m)))
                spans.append((self._requested[group_id], take))
                self._requested[group_id] += take
                counts[group_id] -= take
                size += 8 * take * m
            if not any(count for _, count in spans):
                raise TransportError("one row of the mask terms does not fit the dealer's largest reply")
            frame = self.post(torch.tensor(spans, dtype=torch.int64), codec="int64")
            self._in_flight.append((frame, spans))

    def before_forward(self, rows: list[int]) -> None:
        """Called before a forward that takes rows[g] rows of group g: asks for what is missing for it, and keeps
        `ahead` decode windows requested beyond it."""
        if self.session == NO_SESSION:
            self.open()
        ready = getattr(self.transport, "reply_ready", None)
        while self._in_flight and ready is not None and ready():
            self._receive()  # read terms as they arrive: the connection stays read (pings answered) between uses
        counts = []
        for group_id, need in enumerate(rows):
            have = self._outstanding(group_id)
            short = need + self.ahead * self.window - have if need else 0
            counts.append(short if have < need or short >= self.window else 0)  # whole windows while decoding
        if any(counts):
            self._ask(counts)

    def _outstanding(self, group_id: int) -> int:
        """Rows of a group asked for and not handed out yet: in flight or received."""
        return sum(spans[group_id][1] for _, spans in self._in_flight) + self._buffered[group_id]

    def _reply_size(self, spans: list[tuple[int, int]]) -> int:
        """Ring elements in the reply to a request for `spans`."""
        return sum(count * self.widths[group_id][1] for group_id, (_, count) in enumerate(spans))

    def _receive(self) -> None:
        import time

        frame, spans = self._in_flight[0]
        started = time.perf_counter()
        terms = self.collect_int64(frame, (self._reply_size(spans),))
        self.wait_seconds += time.perf_counter() - started
        self._in_flight.pop(0)
        offset = 0
        for group_id, (start, count) in enumerate(spans):
            if not count:
                continue
            n, m = self.widths[group_id]
            u = terms[offset : offset + count * m].reshape(count, m)
            offset += count * m
            self._buffers[group_id].append((self.stream.rows(group_id, n, start, count), u))
            self._buffered[group_id] += count

    def take(self, group_id: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `rows` masks of a group and their terms: (r [rows, n], u [rows, m] = r W^T), each row once."""
        buffer = self._buffers[group_id]
        if buffer and buffer[0][0].shape[0] > rows:  # the common case: a decode step's row from a window
            r, u = buffer[0]
            buffer[0] = (r[rows:], u[rows:])
            self._buffered[group_id] -= rows
            return r[:rows], u[:rows]
        while self._buffered[group_id] < rows:
            if not self._in_flight:
                counts = [0] * len(self.widths)
                counts[group_id] = rows - self._buffered[group_id]
                self._ask(counts)
            self._receive()
        blocks, got = [], 0
        while got < rows:
            r, u = buffer[0]
            want = rows - got
            if r.shape[0] <= want:
                blocks.append((r, u))
                buffer.pop(0)
                got += r.shape[0]
            else:
                blocks.append((r[:want], u[:want]))
                buffer[0] = (r[want:], u[want:])
                got += want
        self._buffered[group_id] -= rows
        if len(blocks) == 1:
            return blocks[0]
        return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])

    def close(self) -> None:
        """Reads the replies still in flight (the connection answers in order), then closes the session."""
        try:
            while self._in_flight and self.session != NO_SESSION:
                frame, spans = self._in_flight.pop(0)
                self.collect(frame, expected_shape=(self._reply_size(spans),))
        except TransportError:
            self._in_flight = []
        super().close()
