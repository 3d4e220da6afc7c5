"""Hostile peers for the service: message generators, a client that judges every answer, and the `bench fuzz` run.

Every generator is a pure function of a seeded `random.Random` and a `Target` (the session the connection holds,
the sequence number the server expects, the hidden size, a live session of *another* connection). It returns the
messages to send in order: frames as `bytes`, WebSocket text messages as `str`; the `http` category returns raw
HTTP upgrade requests instead. `FuzzClient.run_case` sends them over a real TLS WebSocket and judges each answer:

- an ERROR frame (one non-empty line), after which the server may close the connection (a clean close is counted);
- a RESULT or OK only when the message really was a valid frame for this connection (checked with `decode_frame`);
- anything else is a failure: no answer within the timeout (`hang`; `handshake_timeout` when the WebSocket
  upgrade itself got no answer, before any hostile byte was sent), a close without an ERROR frame, an
  undecodable answer, "internal server error", a malformed frame that was accepted, HTTP 5xx, or a traceback in
  the server's log while the case ran (`unhandled`).

One exception is documented in docs/service.md and counted apart, not as a failure: a message larger than twice
the frame limit is closed by the WebSocket layer with code 1009 and no ERROR frame.

The generators and `FuzzClient` serve every frame-speaking target of `bench fuzz --target` (`fuzz_targets`): a
target says what its valid FORWARD is (`Target.row_shape` for float inputs of another shape, `Target.make_forward`
for another payload) and which answers it accepts (`FuzzClient.accepts`); outcomes, tally, workers and the record
are `fuzz_core`'s.
"""

from __future__ import annotations

import logging
import random
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from splitveil.core.errors import WireError
from splitveil.core.registry import Registry
from splitveil.harness.fuzz_core import (  # noqa: F401  (re-exported: the serve target's names of old)
    FAILURES,
    Outcome,
    Tally,
    case_rng,
    finish_record,
    is_unhandled_line,
    locked,
    log_watcher,
    plot_fuzz_bench,
    replay_failures,
    run_cases,
    save_fuzz_bench,
)
from splitveil.core import validate
from splitveil.harness.common import HEADER, float_payload, raw_frame  # noqa: F401  (the targets' and tests' names)
from splitveil.plan.plan import DEFAULT_LM_CUTS
from splitveil.wire.frame import MAGIC, MAX_FRAME_BYTES, NO_SESSION, FrameKind, decode_frame

CODEC_IDS = {"fp32": 1, "fp16": 2, "bf16": 3}  # the float codecs' wire ids
REPLY_CAP = 256 * 1024 * 1024


@dataclass
class Target:
    """What a connection knows when it builds its next hostile message."""

    session: bytes = NO_SESSION  # the connection's own session (zeros while it holds none)
    seq: int = 0  # the sequence number the server expects next
    hidden: int = 576
    part: int = 1
    max_frame_bytes: int = MAX_FRAME_BYTES
    foreign: bytes | None = None  # a live session of another connection (the bystander's), when known
    row_shape: tuple[int, ...] | None = None  # float input [rows, *row_shape] (a CNN part); None: [1, positions, hidden]
    make_forward: Callable[[random.Random, "Target"], bytes] | None = None  # another target's valid FORWARD
    extra: dict = field(default_factory=dict)  # a target's own state (its groups, its sealed channel, ...)


@dataclass(frozen=True)
class Category:
    generate: Callable[[random.Random, Target], list]
    session: str  # "yes": OPEN first; "no": send on a fresh connection; "any": either, chosen by the rng
    transport: str = "websocket"  # or "http": raw upgrade requests over TLS


CATEGORIES: Registry[Category] = Registry("fuzz category")


def float_shape(t: Target, positions: int) -> tuple[int, ...]:
    """The shape of a valid float input of `positions` rows: [1, positions, hidden], or [positions, *row_shape]."""
    return (1, positions, t.hidden) if t.row_shape is None else (positions, *t.row_shape)


def valid_forward(rng: random.Random, t: Target, *, positions: int | None = None, codec: str | None = None,
                  values: np.ndarray | None = None) -> bytes:
    """A FORWARD the server must accept: finite floats of `float_shape` for the connection's session."""
    codec = codec or rng.choice(list(CODEC_IDS))
    positions = positions or rng.randint(1, 4)
    shape = float_shape(t, positions) if values is None else tuple(values.shape)
    if values is None:
        values = np.random.default_rng(rng.getrandbits(32)).normal(0, 1, shape)
    return raw_frame(session=t.session, seq=t.seq, part=t.part, codec=CODEC_IDS[codec], shape=shape,
                     payload=float_payload(values, codec))


def forward(rng: random.Random, t: Target, **options) -> bytes:
    """The target's valid FORWARD for `t` (`options` go to the float one)."""
    return t.make_forward(rng, t) if t.make_forward is not None else valid_forward(rng, t, **options)


def register_category(registry: Registry, name: str, session: str, transport: str = "websocket"):
    """Decorator: adds a generator to a target's registry of categories."""
    def add(generate):
        registry.register(name, Category(generate, session, transport))
        return generate
    return add


def _register(name: str, session: str, transport: str = "websocket"):
    return register_category(CATEGORIES, name, session, transport)


@_register("random_bytes", "any")
def random_bytes(rng, t):
    size = rng.choice([0, rng.randint(1, 27), rng.randint(28, 100), rng.randint(101, 4096)])
    prefix = rng.choice([b"", b"SV", b"SV\x01", b"SV\x01\x02"])
    return [(prefix + rng.randbytes(size))[:size]]


@_register("bit_flip", "yes")
def bit_flip(rng, t):
    frame = bytearray(forward(rng, t, positions=rng.randint(1, 2)))
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(40) if rng.random() < 0.6 else rng.randrange(len(frame))
        frame[at] ^= 1 << rng.randrange(8)
    return [bytes(frame)]


@_register("truncation", "any")
def truncation(rng, t):
    whole = rng.choice([forward(rng, t), raw_frame(kind=FrameKind.OPEN, part=0),
                        raw_frame(kind=FrameKind.CLOSE, session=t.session, seq=t.seq)])
    return [whole[: rng.randrange(len(whole))]]


HUGE_DIMS = (0, 1, 2, 3, 8, 9, 2**16, 2**31 - 1, 2**31, 2**32 - 1)


@_register("absurd_shape", "yes")
def absurd_shape(rng, t):
    style = rng.randrange(5)
    codec = rng.randint(1, 5)
    if style == 0:  # an empty tensor whose other dimensions are huge
        shape = [rng.choice((2**31, 2**32 - 1, rng.getrandbits(32))) for _ in range(rng.randint(1, 3))]
        shape.insert(rng.randrange(len(shape) + 1), 0)
        return [raw_frame(session=t.session, seq=t.seq, part=t.part, codec=codec, shape=tuple(shape))]
    if style == 1:  # the product overflows 64 bits
        shape = tuple(rng.choice((2**32 - 1, 2**31 + rng.getrandbits(31))) for _ in range(4))
        return [raw_frame(session=t.session, seq=t.seq, part=t.part, codec=codec, shape=shape, payload=rng.randbytes(rng.randint(0, 64)))]
    if style == 2:  # ndim anywhere in 0..255, with the dimensions it announces (capped) or fewer
        ndim = rng.randint(0, 255)
        dims = tuple(rng.choice(HUGE_DIMS + (t.hidden,)) for _ in range(min(ndim, 64) if rng.random() < 0.7 else rng.randint(0, 3)))
        return [raw_frame(session=t.session, seq=t.seq, part=t.part, codec=codec, shape=dims, ndim=ndim,
                          payload=rng.randbytes(rng.randint(0, 64)))]
    if style == 3:  # consistent byte count, wrong rank or width: [n], [1, n], [b, n, h, 1], width hidden +- 1
        count = rng.randint(1, 6)
        shape = rng.choice([(count * t.hidden,), (count, t.hidden), (1, count, t.hidden, 1), (1, count, t.hidden + 1),
                            (1, count, max(t.hidden - 1, 1)), (9, 1, t.hidden), (count, 0, t.hidden)])
        size = int(np.prod(shape))
        return [raw_frame(session=t.session, seq=t.seq, part=t.part, codec=1, shape=shape,
                          payload=float_payload(np.zeros(size), "fp32"))]
    shape = tuple(rng.choice(HUGE_DIMS) for _ in range(rng.randint(1, 4)))  # random huge dims, a short payload
    return [raw_frame(session=t.session, seq=t.seq, part=t.part, codec=codec, shape=shape, payload=rng.randbytes(rng.randint(0, 16)))]


@_register("nonfinite", "yes")
def nonfinite(rng, t):
    positions = rng.randint(1, 3)
    values = np.random.default_rng(rng.getrandbits(32)).normal(0, 1, float_shape(t, positions)).astype(np.float32)
    for _ in range(rng.randint(1, 5)):
        values.flat[rng.randrange(values.size)] = rng.choice([np.nan, np.inf, -np.inf, 1e5])  # 1e5: Inf only in fp16
    return [valid_forward(rng, t, positions=positions, values=values)]


@_register("huge_values", "yes")
def huge_values(rng, t):
    """Finite but extreme inputs (valid frames: RESULT or ERROR are both right answers)."""
    positions = rng.randint(1, 2)
    codec = rng.choice(list(CODEC_IDS))
    top = {"fp32": 3.4e38, "fp16": 65504.0, "bf16": 3.38e38}[codec]
    values = np.random.default_rng(rng.getrandbits(32)).normal(0, 1, float_shape(t, positions)).astype(np.float32)
    mask = np.random.default_rng(rng.getrandbits(32)).random(values.shape) < rng.choice([0.01, 0.5, 1.0])
    values[mask] = rng.choice([top, -top, 1e38 if codec != "fp16" else 6e4, 1e30 if codec != "fp16" else 1e4])
    return [valid_forward(rng, t, positions=positions, codec=codec, values=values)]


@_register("bad_header", "yes")
def bad_header(rng, t):
    fields = dict(session=t.session, seq=t.seq, part=t.part, codec=1, shape=(1, 1, t.hidden),
                  payload=float_payload(np.zeros((1, 1, t.hidden)), "fp32"))
    which = rng.choice(["magic", "version", "kind", "codec", "part", "seq", "session"])
    if which == "magic":
        fields["magic"] = rng.choice([b"VS", b"sv", b"\0\0", rng.randbytes(2)])
        fields["magic"] = fields["magic"] if fields["magic"] != MAGIC else b"XX"
    elif which == "version":
        fields["version"] = rng.choice([0, 2, 255, rng.randint(2, 255)])
    elif which == "kind":
        fields["kind"] = rng.choice([0, FrameKind.RESULT, FrameKind.ERROR, FrameKind.OK, 8, rng.randint(8, 255)])
    elif which == "codec":
        fields["codec"] = rng.choice([0, 4, 5, 6, rng.randint(6, 255)])
    elif which == "part":
        fields["part"] = rng.choice([p for p in (0, 2, 3, 255, rng.randint(0, 255)) if p != t.part])
    elif which == "seq":
        fields["seq"] = rng.choice([s for s in (t.seq + 1, t.seq + 2, 2**32 - 1, rng.getrandbits(32)) if s != t.seq])
    else:
        fields["session"] = rng.choice([NO_SESSION, rng.randbytes(16), bytes(15) + b"\1"])
    return [raw_frame(**fields)]


@_register("foreign_session", "any")
def foreign_session(rng, t):
    """FORWARD or CLOSE naming another connection's live session (the bystander's when known)."""
    other = t.foreign or rng.randbytes(16)
    if rng.random() < 0.5:
        return [raw_frame(kind=FrameKind.CLOSE, session=other, seq=rng.getrandbits(8))]
    return [forward(rng, replace(t, session=other, seq=rng.randint(0, 200)))]


@_register("text_message", "any")
def text_message(rng, t):
    return [rng.choice(["", "hello", '{"kind": "OPEN"}', "SV\x01\x01", "\u00e9\u4e2d\U0001f600" * rng.randint(1, 50),
                        "x" * rng.randint(1, 10000), raw_frame(kind=FrameKind.OPEN).hex()])]


@_register("second_open", "yes")
def second_open(rng, t):
    return [raw_frame(kind=FrameKind.OPEN, part=0)] * rng.randint(1, 2)


@_register("bad_truncate", "yes")
def bad_truncate(rng, t):
    """TRUNCATE frames that must be refused: beyond any session's positions, negative, a float or a longer payload,
    no payload, a part the server does not run, another session or a sequence number out of order."""
    which = rng.choice(["beyond", "negative", "codec", "shape", "empty", "part", "session", "seq"])
    length = {"beyond": rng.randint(2**31, 2**62), "negative": -rng.randint(1, 2**62)}.get(which, 0)
    fields = {"kind": FrameKind.TRUNCATE, "session": t.session, "seq": t.seq, "part": t.part, "codec": 4,
              "shape": (1,), "payload": struct.pack("<q", length)}
    if which == "codec":
        fields.update(codec=1, payload=struct.pack("<f", 1.0))
    elif which == "shape":
        fields.update(shape=(2,), payload=struct.pack("<2q", 0, 0))
    elif which == "empty":
        fields.update(shape=(), payload=b"")
    elif which == "part":
        fields["part"] = (t.part + rng.randint(1, 200)) % 256
    elif which == "session":
        fields["session"] = t.foreign or rng.randbytes(16)
    elif which == "seq":
        fields["seq"] = t.seq + rng.randint(1, 1000)
    return [raw_frame(**fields)]


@_register("no_session", "no")
def no_session(rng, t):
    """Valid-looking frames on a connection that holds no session."""
    session = rng.choice([NO_SESSION, rng.randbytes(16), t.foreign or NO_SESSION])
    if rng.random() < 0.3:
        return [raw_frame(kind=FrameKind.CLOSE, session=session)]
    return [forward(rng, replace(t, session=session, seq=0))]


@_register("close_then_use", "yes")
def close_then_use(rng, t):
    """CLOSE of the connection's own session (valid), then frames for the closed session."""
    return [raw_frame(kind=FrameKind.CLOSE, session=t.session, seq=t.seq), forward(rng, replace(t))]


@_register("oversize", "any")
def oversize(rng, t):
    """Frames over the size limit; one in ten over twice the limit (closed by the WebSocket layer, documented)."""
    limit = t.max_frame_bytes
    size = 2 * limit + rng.randint(1, 4096) if rng.random() < 0.1 else limit + rng.randint(1, 65536)
    positions = max(1, (size - 40) // (4 * t.hidden))
    frame = raw_frame(session=t.session, seq=t.seq, part=t.part, codec=1, shape=(1, positions, t.hidden))
    return [frame + bytes(size - len(frame))]


_UPGRADE = ("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")
HTTP_REQUESTS = (  # `{token}` is the server's real token, filled in when sent
    _UPGRADE + "Authorization: Bearer {token}\r\nAuthorization: Bearer x\r\n\r\n",
    _UPGRADE + "Authorization: Bearer x\r\nAuthorization: Bearer {token}\r\n\r\n",
    _UPGRADE + "Authorization: Bearer wrong-token\r\n\r\n",
    _UPGRADE + "\r\n",
    _UPGRADE + "Authorization: Basic {token}\r\n\r\n",
    _UPGRADE + "Authorization: Bearer " + "A" * 9000 + "\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n",
    "\x00\x01garbage\r\n\r\n",
)


@_register("http", "no", transport="http")
def http_requests(rng, t):
    """Raw upgrade requests: the server must answer HTTP 4xx (or close), never 5xx and never 101."""
    return [rng.choice(HTTP_REQUESTS)]


# -- judging answers ---------------------------------------------------------------------------------------------


def _accepts(message, t: Target, reply_kind: int) -> bool:
    """Whether a RESULT/OK answer to `message` is right: the message must be a valid frame for this connection."""
    if not isinstance(message, bytes):
        return False
    try:
        frame = decode_frame(message, max_bytes=t.max_frame_bytes)
    except WireError:
        return False
    if reply_kind == FrameKind.OK:
        return (frame.kind == FrameKind.OPEN and t.session == NO_SESSION) or (
            frame.kind == FrameKind.CLOSE and frame.session == t.session != NO_SESSION)
    shape = frame.shape
    if not (reply_kind == FrameKind.RESULT and frame.kind == FrameKind.FORWARD and frame.session == t.session != NO_SESSION
            and frame.seq == t.seq and frame.part == t.part and frame.codec in CODEC_IDS and 0 not in shape):
        return False
    if t.row_shape is not None:
        return shape[1:] == tuple(t.row_shape) and shape[0] <= t.extra.get("max_batch", 64)
    return len(shape) == 3 and shape[-1] == t.hidden


class FuzzClient:
    """Sends hostile cases to a server over TLS and judges the answers.

    Args:
        url: wss://127.0.0.1:PORT.
        token: the server's bearer token.
        ca_file: the server's certificate.
        hidden: the served part's hidden size; part: its index in the plan.
        timeout: seconds to wait for any one answer before calling it a hang.
        close_wait: seconds to wait for the server to close after an ERROR frame.
        unhandled: returns the server log lines that show an unhandled path since the last call (tracebacks).
        settle: seconds to wait after a case before reading the log (a server logs a failed handler after closing).
        categories: the target's generators (default: those of `splitveil serve`).
        target: other `Target` fields every case starts from (`row_shape`, `make_forward`, `extra`).

    A `ws://` url is reached without TLS (the `serve --enclave` relay). Targets change `accepts` (which RESULT/OK
    is right) and `_setup` (what a connection does before its hostile messages) in subclasses.
    """

    def __init__(self, url: str, *, token: str, ca_file, hidden: int, part: int = 1, max_frame_bytes: int = MAX_FRAME_BYTES,
                 timeout: float = 20.0, close_wait: float = 2.0, unhandled: Callable[[], list[str]] = lambda: [],
                 settle: float = 0.0, categories: Registry[Category] | None = None, target: dict | None = None):
        from splitveil.transport.tls import client_context

        self.url, self.token, self.timeout, self.close_wait = url, token, timeout, close_wait
        self.ssl = None if url.startswith("ws://") else client_context(ca_file=ca_file)
        self.hidden, self.part, self.max_frame_bytes = hidden, part, max_frame_bytes
        self.unhandled, self.settle = unhandled, settle
        self.categories = CATEGORIES if categories is None else categories
        self.target = dict(target or {})
        self.foreign: Callable[[], bytes | None] = lambda: None

    def new_target(self) -> Target:
        extra = dict(self.target.get("extra", {}))
        return Target(hidden=self.hidden, part=self.part, max_frame_bytes=self.max_frame_bytes, foreign=self.foreign(),
                      **{**self.target, "extra": extra})

    def accepts(self, message, t: Target, reply_kind: int) -> bool:
        return _accepts(message, t, reply_kind)

    def run_case(self, category: str, rng: random.Random, *, index: int | None = None) -> Outcome:
        """Runs one case of `category` drawn from `rng` on fresh connections; never raises."""
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

        spec = self.categories.get(category)
        t = self.new_target()
        outcome = Outcome(category, index)

        try:
            if spec.transport == "http":
                self._http(spec, rng, t, outcome)
            else:
                self._websocket(spec, rng, t, outcome)
        except TimeoutError as error:
            outcome.failure, outcome.detail = "hang", f"no answer within {self.timeout:g} s ({error})"
        except InvalidStatus as error:  # the upgrade itself was refused (connection limits): 503 is a fair answer
            status = error.response.status_code
            outcome.answers.append(f"upgrade_refused_{status}")
            if status >= 500 and status != 503:
                outcome.failure, outcome.detail = "http_5xx", f"upgrade answered HTTP {status}"
        except ConnectionClosed as closed:  # closed while opening its session or sending valid frames
            outcome.failure = "closed_without_error"
            outcome.detail = f"closed before the hostile message (code {closed.rcvd.code if closed.rcvd else None})"
        except InvalidHandshake as error:  # the server closed or garbled the upgrade
            outcome.failure, outcome.detail = "closed_without_error", f"upgrade failed: {error}"[:300]
        except (OSError, WireError) as error:
            outcome.failure, outcome.detail = "bad_reply", f"{type(error).__name__}: {error}"[:300]
        except Exception as error:  # a defect of this harness: counted, never hidden
            outcome.failure, outcome.detail = "harness_error", f"{type(error).__name__}: {error}"[:300]
        if self.settle:
            time.sleep(self.settle)
        lines = self.unhandled()
        if lines and outcome.failure is None:
            outcome.failure, outcome.detail = "unhandled", " | ".join(lines[:3])[:500]
        return outcome

    def _websocket(self, spec: Category, rng: random.Random, t: Target, outcome: Outcome) -> None:
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        try:
            ws = connect(self.url, ssl=self.ssl, additional_headers={"Authorization": f"Bearer {self.token}"},
                         max_size=REPLY_CAP, compression=None, open_timeout=self.timeout, close_timeout=1)
        except TimeoutError as error:  # before any hostile byte: the opening handshake itself stalled
            outcome.failure, outcome.detail = "handshake_timeout", f"no WebSocket handshake within {self.timeout:g} s ({error})"
            return
        with ws:
            if not self._setup(ws, spec, rng, t, outcome):
                return
            messages = spec.generate(rng, t)
            for message in messages:
                outcome.messages.append(message)
                try:
                    ws.send(message)
                    reply = ws.recv(timeout=self.timeout)
                except ConnectionClosed as closed:
                    code = closed.rcvd.code if closed.rcvd else None
                    size = len(message.encode() if isinstance(message, str) else message)
                    if size > 2 * self.max_frame_bytes and code in (1009, None):  # None: reset while still sending
                        outcome.answers.append("close_1009")
                    else:
                        outcome.failure, outcome.detail = "closed_without_error", f"close code {code}"
                    return
                if not self._judge(reply, message, t, outcome):
                    return
                if outcome.answers[-1] == "error":
                    try:
                        ws.recv(timeout=self.close_wait)
                        outcome.answers.append("error_then_more")
                    except ConnectionClosed:
                        outcome.answers.append("clean_close")
                    except TimeoutError:
                        outcome.answers.append("error_kept_open")
                    return

    def _setup(self, ws, spec: Category, rng: random.Random, t: Target, outcome: Outcome) -> bool:
        """Opens the connection's session when the category wants one, sometimes with a few valid frames first;
        False when the case ends here (a refused OPEN is a valid answer)."""
        if spec.session == "yes" or (spec.session == "any" and rng.random() < 0.5):
            ws.send(raw_frame(kind=FrameKind.OPEN, part=0))
            opened = decode_frame(ws.recv(timeout=self.timeout), max_bytes=REPLY_CAP, finite=False)
            if opened.kind != FrameKind.OK:  # e.g. the server is full: a valid answer, nothing to fuzz with
                outcome.answers.append(f"open_refused: {opened.message}")
                return False
            t.session = opened.session
            for _ in range(rng.choice([1, 2]) if rng.random() < 0.15 else 0):  # sometimes a session with state
                ws.send(forward(rng, t, codec="fp32", positions=1))
                if decode_frame(ws.recv(timeout=self.timeout), max_bytes=REPLY_CAP, finite=False).kind != FrameKind.RESULT:
                    outcome.failure, outcome.detail = "bad_reply", "a valid FORWARD was refused"
                    return False
                t.seq += 1
        return True

    def _judge(self, reply, message, t: Target, outcome: Outcome, accepts: Callable | None = None) -> bool:
        """Whether `reply` is a right answer to `message` (then `t` follows the session); else the failure is set."""
        accepts = accepts or self.accepts
        if isinstance(reply, str):
            outcome.failure, outcome.detail = "bad_reply", "a text message instead of a frame"
            return False
        try:
            frame = decode_frame(reply, max_bytes=REPLY_CAP, finite=False)
        except WireError as error:
            outcome.failure, outcome.detail = "bad_reply", f"undecodable answer: {error.message}"
            return False
        if frame.kind == FrameKind.ERROR:
            text = frame.message
            if text == "internal server error":
                outcome.failure, outcome.detail = "internal_error", text
                return False
            if not text.strip() or "\n" in text:
                outcome.failure, outcome.detail = "bad_reply", f"ERROR message is not one line: {text[:200]!r}"
                return False
            outcome.answers.append("error")
            outcome.detail = text[:200]
            return True
        if frame.kind in (FrameKind.RESULT, FrameKind.OK) and accepts(message, t, frame.kind):
            if frame.kind == FrameKind.RESULT:
                t.seq += 1
                outcome.answers.append("result")
            else:
                t.session, t.seq = (frame.session, 0) if t.session == NO_SESSION else (NO_SESSION, 0)
                outcome.answers.append("ok")
            return True
        outcome.failure = "accepted_malformed" if frame.kind in (FrameKind.RESULT, FrameKind.OK) else "bad_reply"
        outcome.detail = f"answered {frame.kind.name} to a message that is not a valid frame for this connection"
        return False

    def _http(self, spec: Category, rng: random.Random, t: Target, outcome: Outcome) -> None:
        self.send_http(spec.generate(rng, t), outcome)

    def send_http(self, requests: list[str], outcome: Outcome) -> Outcome:
        """Sends raw HTTP requests (`{token}` filled in), each on its own TLS connection, and judges the status lines."""
        import socket
        from urllib.parse import urlparse

        parsed = urlparse(self.url)
        for request in requests:
            data = request.replace("{token}", self.token).encode("latin-1")
            outcome.messages.append(data)
            with socket.create_connection((parsed.hostname, parsed.port), timeout=self.timeout) as raw:
                with (self.ssl.wrap_socket(raw, server_hostname=parsed.hostname) if self.ssl else raw) as sock:
                    sock.sendall(data)
                    try:
                        head = sock.recv(256)
                    except (ConnectionError, ssl.SSLError):
                        head = b""
            status = head.split(b"\r\n", 1)[0].decode("latin-1", errors="replace")
            parts = status.split()
            code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
            if code is None:
                outcome.answers.append("http_closed")
            elif code >= 500:
                outcome.failure, outcome.detail = "http_5xx", status
                return outcome
            else:
                outcome.answers.append("http_4xx" if 400 <= code < 500 else f"http_{code}")
            if code == 101:
                outcome.failure, outcome.detail = "accepted_malformed", f"upgrade accepted: {status}"
                return outcome
        return outcome


# -- the benchmark (target serve) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FuzzBenchSpec:
    model: str = "smollm2-135m"
    cuts: tuple[int, ...] = DEFAULT_LM_CUTS  # serve, enclave, edge: the Λ-split; accelerator: (cut,); slip: unused
    messages: int = 20000  # hostile messages to send at least
    workers: int = 4  # hostile connections at a time
    seed: int = 0
    timeout_seconds: float = 60.0  # per answer: longer is a hang
    bystander_tokens: int = 16  # tokens per bystander generation
    rss_period_seconds: float = 0.5
    categories: tuple[str, ...] = ()  # empty: all
    target: str = "serve"  # which server (`fuzz_targets.TARGETS`)
    dataset: str = ""  # the accelerator's CNN data set (empty: the target's default)

    def __post_init__(self):
        """Refuses, with one line, what no run could do."""
        from splitveil.harness.fuzz_targets import TARGETS

        TARGETS.get(self.target)
        validate.at_least(self, 1, "messages", "workers", "bystander_tokens")
        validate.at_least(self, 0, "seed")
        validate.positive(self, "timeout_seconds", "rss_period_seconds")


def has_tokenizer(name: str) -> bool:
    """False for a local folder without tokenizer files (a test's tiny model: its bystanders send token ids)."""
    folder = Path(name)
    return not folder.is_dir() or any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))


def load_lm(name: str):
    """(model, tokenizer) of `name`; a local folder without a tokenizer (a test's tiny model) gives tokenizer None."""
    from splitveil.models.loading import load_causal_lm

    return load_causal_lm(name, with_tokenizer=has_tokenizer(name))


def bystander_prompts(model, tokenizer, tokens: int):
    """Two prompts as token ids and the unsplit model's greedy tokens for each (what every LM bystander must give)."""
    from splitveil.edge.generate import SplitCausalLM

    unsplit = SplitCausalLM(model, tokenizer=tokenizer)
    if tokenizer is None:  # a test's tiny model: token ids below its vocabulary
        prompts = [[1, 5, 9, 23, 4, 17, 30], [3, 7, 11, 2, 40, 8]]
    else:
        prompts = [unsplit.encode_prompt(p) for p in ("The capital of France is", "List three facts about the moon.")]
    return prompts, [unsplit.generate(p, max_new_tokens=tokens, eos_token_ids=()).token_ids for p in prompts]


def split_lm(model, tokenizer, cuts, transport):
    """A `SplitCausalLM` over `transport` with recovery off (any harm to its session must show)."""
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.plan.plan import SplitPlan

    lm = SplitCausalLM(model, SplitPlan.from_cuts(cuts), tokenizer=tokenizer, transport=transport)
    for stage in lm.stages:
        if hasattr(stage, "recover_seconds"):
            stage.recover_seconds = 0.0
    return lm


def exact_after(make_lm, prompts, expected, tokens: int) -> Callable[[], bool]:
    """A fresh honest client once the fuzzing is over: are its tokens still the unsplit ones?"""
    def check() -> bool:
        lm = make_lm()
        try:
            return [lm.generate(p, max_new_tokens=tokens, eos_token_ids=()).token_ids for p in prompts] == expected
        finally:
            lm.close()
    return check


def quiet_client_library() -> None:
    # the client library logs a traceback when the server resets a connection while an oversize message is still
    # being sent (the documented close of messages over twice the limit); the outcome is judged, not logged
    logging.getLogger("websockets.client").setLevel(logging.CRITICAL)


def category_names(registry: Registry, chosen: tuple[str, ...]) -> list[str]:
    names = list(chosen) or registry.names()
    for name in names:
        registry.get(name)
    return names


def run_fuzz_bench(spec: FuzzBenchSpec, *, progress: Callable[[int, int], None] | None = None) -> dict:
    """Hostile messages from `spec.workers` connections against `spec.target` (default: a real `splitveil serve`),
    with a bystander working; the record of `fuzz_core.finish_record`."""
    if spec.target != "serve":
        from splitveil.harness.fuzz_targets import TARGETS

        return TARGETS.get(spec.target).run(spec, progress=progress)
    from splitveil.core.records import environment
    from splitveil.harness.fuzz_core import Subject, fuzz_subject
    from splitveil.harness.load_service import Bystander
    from splitveil.serve.process import ServerProcess
    from splitveil.transport.network import WebSocketTransport

    names = category_names(CATEGORIES, spec.categories)
    quiet_client_library()
    model, tokenizer = load_lm(spec.model)
    hidden = model.config.hidden_size
    prompts, expected = bystander_prompts(model, tokenizer, spec.bystander_tokens)
    record = {"benchmark": "fuzz", "target": "serve", "spec": asdict(spec), "environment": environment(), "categories": names}
    with ServerProcess(spec.model, spec.cuts, extra_args=["--max-sessions", str(spec.workers + 16)]) as server:
        unhandled = locked(log_watcher(server.log_path))

        def transport():
            return WebSocketTransport(server.url, token=server.token, ca_file=server.cert, timeout=spec.timeout_seconds)

        lm = split_lm(model, tokenizer, spec.cuts, transport())
        bystander = Bystander(lm, prompts, expected, spec.bystander_tokens)

        def make_client(settle: float = 0.0) -> FuzzClient:
            client = FuzzClient(server.url, token=server.token, ca_file=server.cert, hidden=hidden,
                                timeout=spec.timeout_seconds, unhandled=unhandled, settle=settle)
            client.foreign = lambda: bystander.session
            return client

        subject = Subject(server.process.pid, server.log_path, lambda: server.process.poll() is None, unhandled)
        after = exact_after(lambda: split_lm(model, tokenizer, spec.cuts, transport()), prompts, expected, spec.bystander_tokens)
        try:
            return fuzz_subject(spec, subject, make_client, bystander, after, names=names, record=record, progress=progress)
        finally:
            lm.close()


run = run_fuzz_bench  # the entry point every `fuzz_targets` module has
