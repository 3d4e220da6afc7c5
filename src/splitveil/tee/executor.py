"""The trusted executor's service and its client: sealed input in, layers [0, p) inside, the feature map at p out to
the untrusted accelerator, the sealed result back.

`EnclaveService` is a `serve.service.SessionService` (like `PartService` and the SLIP executor's service), so the
standard `SplitServer` serves it: TLS, bearer token, one session per connection. FORWARD frames carry uint8 bytes:

    part 0: the client's hello (nonce | X25519 public key)      -> RESULT: the quote (public key | measurement | sig)
    part 1: a sealed message (counter | AES-GCM ciphertext+tag)  -> RESULT: a sealed message

Inside a sealed message is an ordinary frame (`wire/frame.py`, validated before allocating, never pickle): FORWARD
with the images [B, *input_shape] fp32 one way, RESULT with the logits the other. The service opens each sealed
message at admission, so a tampered or replayed one is refused with one ERROR line before any compute; the host's
process (the operator) only ever relays ciphertext. The executor runs its part on its own copy of the first part's
segments (nothing else of the model) and calls `release(features)`, by default a `ClassifierStage` to the
accelerator's `splitveil` server: the feature map at p is the one thing that leaves it in clear.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from splitveil.core.errors import TransportError, WireError
from splitveil.serve.ratelog import RateLimitedLog
from splitveil.serve.service import SessionService, SessionState, error_reply
from splitveil.tee.channel import (
    COUNTER,
    KEY_BYTES,
    SIGNATURE_BYTES,
    SIMULATED,
    AttestationKey,
    ClientHandshake,
    Hello,
    Quote,
    SealedChannel,
    SealError,
    executor_handshake,
)
from splitveil.transport.base import Transport
from splitveil.transport.session import ClientSession, result_bytes
from splitveil.wire.frame import MAX_FRAME_BYTES, NO_SESSION, Frame, FrameKind, decode_frame, encode_frame, text_frame

log = logging.getLogger(__name__)
HELLO_PART, SEALED_PART = 0, 1
QUOTE_BYTES = 2 * KEY_BYTES + SIGNATURE_BYTES  # the executor's public key, its measurement, the signature


@dataclass
class EnclaveSession(SessionState):
    channel: SealedChannel | None = None
    images: int = 0
    inner_session: bytes | None = None  # SealedFrameService: the one inner session this session holds
    closed: bool = False


@dataclass
class EnclaveWork:
    session_id: bytes
    session: EnclaveSession
    frame: Frame
    hello: Hello | None = None
    images: torch.Tensor | None = None  # opened at admission
    released: bool = False
    is_step: bool = False
    inner: bytes | None = None  # a sealed inner frame, opened at admission (SealedFrameService)


class EnclaveService(SessionService):
    """The trusted executor.

    Args:
        part: the first part (a callable images -> features) on the executor's own copy of its weights.
        release: features -> logits: where the feature map at p goes (the accelerator); None returns the features.
        attestation: the SIMULATED attestation key (private half) that signs the quote.
        measurement: what the quote reports (`tee.measure.measure` over the executor's code and weights).
        input_shape: (C, H, W) of one input.
        observed: a list to which every received frame's raw bytes are appended (what the host relays).
    """

    _log_source = log  # refusals are logged as this executor's, at a bounded rate

    def __init__(self, part: Callable, *, attestation: AttestationKey, measurement: bytes, input_shape: tuple[int, ...],
                 release: Callable | None = None, info: dict | None = None, max_frame_bytes: int = MAX_FRAME_BYTES,
                 max_sessions: int = 16, max_batch: int = 64, observed: list | None = None):
        self.part, self.release_features = part, release
        self.attestation, self.measurement = attestation, measurement
        self.input_shape = tuple(input_shape)
        self.max_frame_bytes, self.max_sessions, self.max_batch = max_frame_bytes, max_sessions, max_batch
        self.observed = observed
        self.info = {**(info or {}), "tee": True, "sealed_channel": True, "attestation": SIMULATED,
                     "measurement": measurement.hex(),
                     "input_shape": list(self.input_shape), "max_batch": max_batch, "max_frame_bytes": max_frame_bytes}
        self.sessions: dict[bytes, EnclaveSession] = {}
        self.refused = 0
        self._lock = threading.Lock()

    def admit(self, data: bytes, *, owner: bytes = b"", bound_session: bytes | None = None):
        if self.observed is not None:
            self.observed.append(bytes(data))
        work, reply = super().admit(data, owner=owner, bound_session=bound_session)
        if reply is not None and decode_frame(reply).kind == FrameKind.ERROR:
            self.refused += 1
        return work, reply

    def _open(self, owner: bytes, frame: Frame | None = None) -> Frame:
        if len(self.sessions) >= self.max_sessions:
            raise WireError(f"the trusted executor is full ({self.max_sessions} sessions)")
        session_id = secrets.token_bytes(16)
        self.sessions[session_id] = EnclaveSession(owner=owner)
        return text_frame(FrameKind.OK, json.dumps(self.info), session=session_id)

    @staticmethod
    def _payload(session: EnclaveSession, frame: Frame) -> bytes:
        """The bytes of a hello or sealed message, after checking its order and its form."""
        if frame.seq != session.next_seq:
            raise WireError(f"frame out of order: expected sequence number {session.next_seq}, got {frame.seq}")
        if frame.tensor is None or frame.codec != "uint8" or frame.tensor.dim() != 1:
            raise WireError("the trusted executor takes 1-D uint8 frames (a hello or a sealed message)")
        return frame.tensor.numpy().tobytes()

    def _admit_forward(self, session: EnclaveSession, frame: Frame) -> EnclaveWork:
        data = self._payload(session, frame)
        if frame.part == HELLO_PART:
            if session.channel is not None:
                raise SealError("hello refused: this session already has its key")
            return EnclaveWork(frame.session, session, frame, hello=Hello.from_bytes(data))
        if frame.part != SEALED_PART:
            raise WireError(f"unknown message {frame.part} (0 = hello, 1 = sealed input)")
        if session.channel is None:
            raise SealError("sealed input refused: no key agreed in this session (send the hello first)")
        inner = decode_frame(session.channel.open(data), max_bytes=self.max_frame_bytes)  # SealError if bad
        images = inner.tensor
        if inner.kind != FrameKind.FORWARD or images is None or tuple(images.shape[1:]) != self.input_shape:
            raise WireError(f"the sealed message must hold images [B, {', '.join(map(str, self.input_shape))}]")
        if not 1 <= images.shape[0] <= self.max_batch:
            raise WireError(f"{images.shape[0]} images in one message; send 1 .. {self.max_batch}")
        return EnclaveWork(frame.session, session, frame, images=images.float())

    def _failure_message(self, error: Exception) -> str:
        """A transport failure (the accelerator's refusal, a lost link) is the client's to know; anything else not."""
        return error.message if isinstance(error, TransportError) else "internal server error"

    def _run_one(self, work: EnclaveWork) -> bytes:
        if work.hello is not None:
            quote, channel = executor_handshake(work.hello, work.session_id, attestation=self.attestation,
                                                measurement=self.measurement)
            work.session.channel = channel
            payload = quote.to_bytes()
        else:
            with torch.no_grad():
                features = self.part(work.images)  # [B, *feature_shape]: layers [0, p) inside
                logits = self.release_features(features) if self.release_features is not None else features
            work.session.images += len(work.images)
            payload = work.session.channel.seal(encode_frame(Frame(FrameKind.RESULT, logits.float().contiguous())))
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        return encode_frame(Frame(FrameKind.RESULT, data, codec="uint8", session=work.session_id, seq=work.frame.seq))


SEAL_OVERHEAD = COUNTER.size + 16  # a sealed message's counter and AES-GCM tag


class EnclaveClient(ClientSession):
    """The data owner's side: opens a session, verifies the (simulated) quote, seals images, opens the results (a
    `ClientSession`: the quote's reply is bounded by a quote's size, a sealed reply by what its request can produce).

    Args:
        transport: reaches the trusted executor (a `WebSocketTransport`, or a loopback one in tests).
        attestation: the trusted attestation key's public half.
        expected_measurement: the measurement the executor must report (the code and weights the client meant).
    """

    what = "the trusted executor"

    def __init__(self, transport, *, attestation: AttestationKey, expected_measurement: bytes):
        super().__init__(transport)
        self.attestation, self.expected = attestation, expected_measurement
        self.channel = None
        self.last_sealed: bytes | None = None  # the last sealed request (what the host relayed; tests replay it)

    def refused(self, message: str) -> None:
        if "refused" in message:
            raise SealError(message)
        raise TransportError(f"the trusted executor answered: {message}")

    def connect(self) -> "EnclaveClient":
        """OPEN, then the handshake: afterwards `channel` holds the session keys."""
        self.open()
        handshake = ClientHandshake(self.session, attestation=self.attestation, expected_measurement=self.expected)
        quote = Quote.from_bytes(self.send_raw(HELLO_PART, handshake.hello().to_bytes(), reply_bytes=QUOTE_BYTES))
        self.channel = handshake.finish(quote)
        return self

    def send_raw(self, part: int, payload: bytes, *, reply_bytes: int) -> bytes:
        """Sends one uint8 message as the next frame of the session; returns the reply's bytes (at most
        `reply_bytes` of them)."""
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        reply = self.request(data, codec="uint8", part=part, reply_bytes=result_bytes((reply_bytes,), "uint8"))
        return reply.tensor.numpy().tobytes()

    def exchange_sealed(self, sealed: bytes, inner_reply_bytes: int | None = None) -> bytes:
        """Sends one sealed message; returns the opened reply, which may be at most `inner_reply_bytes` long (default:
        the executor's announced frame limit)."""
        limit = inner_reply_bytes or int(self.info.get("max_frame_bytes", MAX_FRAME_BYTES))
        return self.channel.open(self.send_raw(SEALED_PART, sealed, reply_bytes=limit + SEAL_OVERHEAD))

    def seal_images(self, images: torch.Tensor) -> bytes:
        return self.channel.seal(encode_frame(Frame(FrameKind.FORWARD, images.float().contiguous())))

    def send_sealed(self, sealed: bytes, *, inner_reply_bytes: int | None = None) -> torch.Tensor:
        """Sends one sealed request; returns the opened result tensor. The inner reply may be at most
        `inner_reply_bytes` long (default: the executor's announced frame limit)."""
        self.last_sealed = sealed
        limit = inner_reply_bytes or int(self.info.get("max_frame_bytes", MAX_FRAME_BYTES))
        result = decode_frame(self.exchange_sealed(sealed, limit), max_bytes=limit)
        if result.kind != FrameKind.RESULT or result.tensor is None:
            raise TransportError("the sealed result holds no tensor")
        return result.tensor

    @torch.no_grad()
    def logits(self, images: torch.Tensor, *, batch: int | None = None) -> torch.Tensor:
        """Logits [N, classes] of `images` [N, C, H, W], sealed in batches the executor accepts."""
        if self.channel is None:
            self.connect()
        batch = batch or int(self.info.get("max_batch", 64))
        return torch.cat([self.send_sealed(self.seal_images(images[i:i + batch])) for i in range(0, len(images), batch)])

    def close(self) -> None:
        super().close()
        self.transport.close()


class AcceleratorLink(ClientSession):
    """The executor's client of the accelerator (a `PartService` serving part 1): features -> logits [B, classes],
    one session (a `ClientSession`: each reply bounded by its batch's logits).

    This is where the feature map at p leaves the trusted executor, in clear (inside TLS to the accelerator).
    """

    what = "the accelerator"
    echoes_part = True

    def __init__(self, transport, *, classes: int, part: int = 1):
        super().__init__(transport)
        self.part, self.classes = part, classes

    def refused(self, message: str) -> None:
        self.session = NO_SESSION
        raise TransportError(f"the accelerator answered: {message}")

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if self.session == NO_SESSION:
            self.open()
        return self.request(features.float().contiguous(), codec="fp32", part=self.part,
                            expected_shape=(features.shape[0], self.classes)).tensor


class SealedFrameService(EnclaveService):
    """The trusted executor around any frame service (e.g. the `PartService` of an LLM trunk): each sealed message
    holds one whole frame of the inner service (OPEN, FORWARD, CLOSE), which runs inside; its reply goes back sealed.
    The host that relays the frames sees ciphertext only: no hidden state, no session id of the inner service.

    Each outer (sealed) session may hold one inner session at a time, bound to it as a connection is bound to its
    session: a second inner OPEN is refused, and the inner session is closed when the outer one closes, is evicted or
    loses its connection. Refusals inside are logged without their text (it could describe the sealed content) and
    at a bounded rate."""

    def __init__(self, inner, *, attestation: AttestationKey, measurement: bytes, info: dict | None = None,
                 max_frame_bytes: int = MAX_FRAME_BYTES, max_sessions: int = 64, observed: list | None = None):
        super().__init__(None, attestation=attestation, measurement=measurement, input_shape=(), info=info,
                         max_frame_bytes=max_frame_bytes + 64, max_sessions=max_sessions, observed=observed)
        self.inner = inner
        inner._log = RateLimitedLog(log, redact="refused a sealed inner frame (its reason stays inside the executor)")

    def _admit_forward(self, session: EnclaveSession, frame: Frame) -> EnclaveWork:
        if frame.part != SEALED_PART or session.channel is None:
            return super()._admit_forward(session, frame)  # the hello, or a refusal
        inner = session.channel.open(self._payload(session, frame))  # SealError if tampered or replayed
        return EnclaveWork(frame.session, session, frame, inner=inner)

    def _run_inner(self, session: EnclaveSession, data: bytes) -> bytes:
        """Admits and computes one inner frame with the inner session bound to this outer session. Never raises."""
        with self._lock:
            if session.closed:
                return error_reply("this session is closed", None)
            bound = session.inner_session or NO_SESSION
        opens = len(data) > 3 and data[3] == FrameKind.OPEN
        work, reply = self.inner.admit(data, owner=session.owner, bound_session=bound)
        if work is not None:
            reply = self.inner.run([work])[0]
        kind = reply[3] if len(reply) > 3 else FrameKind.ERROR
        ended = None
        with self._lock:
            if kind == FrameKind.OK and opens:
                session.inner_session = bytes(reply[8:24])
                if session.closed:  # the outer session ended while the inner one was being opened
                    ended, session.inner_session = session.inner_session, None
            elif kind in (FrameKind.OK, FrameKind.ERROR):  # its CLOSE; or a refusal, which ends it as it would end a
                ended, session.inner_session = session.inner_session, None  # plain connection and its session
        if ended is not None:  # (after its own CLOSE, closing again does nothing)
            self.inner.close_session(ended)
        return reply

    def _run_one(self, work: EnclaveWork) -> bytes:
        if work.inner is None:
            return super()._run_one(work)
        reply = self._run_inner(work.session, work.inner)
        payload = work.session.channel.seal(reply)
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        return encode_frame(Frame(FrameKind.RESULT, data, codec="uint8", session=work.session_id, seq=work.frame.seq))

    def close_session(self, session_id: bytes) -> bool:
        """Closes the outer session and the inner session it holds (a client that drops its connection, an idle
        session evicted, or a CLOSE)."""
        with self._lock:
            session = self.sessions.pop(session_id, None)
            if session is None:
                return False
            session.closed = True
            inner, session.inner_session = session.inner_session, None
        if inner is not None:
            self.inner.close_session(inner)
        return True


class SealedTransport(Transport):
    """A `Transport` whose frames travel sealed to an attested `SealedFrameService`: drop-in for any client of the
    inner service (`SplitCausalLM(..., transport=SealedTransport(...))`). Its stats count the inner frames, like every
    transport; `outer.stats` counts what crossed the host."""

    def __init__(self, outer, *, attestation: AttestationKey, expected_measurement: bytes):
        super().__init__()
        self.outer = outer
        self.client = EnclaveClient(outer, attestation=attestation, expected_measurement=expected_measurement)

    def connect(self) -> "SealedTransport":
        self.client.connect()
        return self

    def _request(self, frame: bytes) -> bytes:
        if self.client.channel is None:
            self.client.connect()
        return self.client.exchange_sealed(self.client.channel.seal(frame), self.max_reply_bytes)

    def close(self) -> None:
        self.client.close()
        self.client.channel = None
