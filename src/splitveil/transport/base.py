"""The Transport base class: one verb, `request`, and the byte / round-trip accounting every backend shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass

from splitveil.core.errors import TransportError


@dataclass
class TransportStats:
    bytes_up: int = 0  # device -> remote, whole frames (header + payload)
    bytes_down: int = 0  # remote -> device
    round_trips: int = 0

    def snapshot(self) -> "TransportStats":
        return TransportStats(self.bytes_up, self.bytes_down, self.round_trips)

    def since(self, earlier: "TransportStats") -> "TransportStats":
        return TransportStats(
            self.bytes_up - earlier.bytes_up,
            self.bytes_down - earlier.bytes_down,
            self.round_trips - earlier.round_trips,
        )


class Transport(ABC):
    """Sends one frame and returns the reply frame. Subclasses implement `_request`; counting happens here.

    `max_reply_bytes` bounds the next replies (None = unbounded): the caller narrows it to what its request can
    legitimately produce. A network backend enforces it while the reply arrives; every backend checks it here.

    `observe(callback)` is the one hook through which the bench records what the party at the other end receives
    and sends: `callback(frame, reply)` is called with the bytes of every completed round trip, exactly as they
    crossed this transport (for a `SealedTransport`, observe its `outer` transport: the ciphertext the operator
    relays).
    """

    def __init__(self):
        self.stats = TransportStats()
        self.max_reply_bytes: int | None = None
        self.observers: list = []
        self._pending: deque[bytes] = deque()  # frames `post` sent whose replies `collect` has not read yet

    def request(self, frame: bytes) -> bytes:
        if self._pending:
            raise TransportError("a request cannot overtake posted requests: collect their replies first")
        self.stats.bytes_up += len(frame)
        return self._received(frame, self._request(frame))

    def post(self, frame: bytes) -> None:
        """Sends `frame` without waiting for its reply; `collect` returns the replies in the order they were posted
        (one connection answers in order). For transports that can pipeline (`WebSocketTransport`)."""
        self.stats.bytes_up += len(frame)
        self._post(frame)
        self._pending.append(frame)

    @property
    def can_pipeline(self) -> bool:
        """Whether `post` / `collect` work here (a backend that implements `_post`)."""
        return type(self)._post is not Transport._post

    def collect(self, *, overlapped: bool = False) -> bytes:
        """The reply to the oldest posted frame, counted as one round trip unless `overlapped` (its wait overlapped
        a later posted request's: e.g. a TRUNCATE posted just before a FORWARD costs no round trip of its own)."""
        if not self._pending:
            raise TransportError("no posted request is waiting for a reply")
        frame = self._pending[0]
        try:
            reply = self._collect()
        except TransportError:
            self._pending.clear()  # the connection's order is lost with it
            raise
        self._pending.popleft()
        return self._received(frame, reply, overlapped=overlapped)

    @property
    def in_flight(self) -> int:
        """Posted frames whose replies were not collected yet."""
        return len(self._pending)

    def _post(self, frame: bytes) -> None:
        raise TransportError(f"{type(self).__name__} cannot pipeline requests")

    def _collect(self) -> bytes:
        raise TransportError(f"{type(self).__name__} cannot pipeline requests")

    def _received(self, frame: bytes, reply: bytes, *, overlapped: bool = False) -> bytes:
        if self.max_reply_bytes is not None and len(reply) > self.max_reply_bytes:
            raise TransportError(f"a reply of {len(reply)} bytes exceeds the {self.max_reply_bytes} bytes this request "
                                 "can produce")
        self.stats.bytes_down += len(reply)
        self.stats.round_trips += 0 if overlapped else 1
        for observer in self.observers:
            observer(frame, reply)
        return reply

    def observe(self, callback):
        """A context manager during which `callback(frame, reply)` sees every round trip of this transport."""
        from contextlib import contextmanager

        @contextmanager
        def watching():
            self.observers.append(callback)
            try:
                yield self
            finally:
                self.observers.remove(callback)

        return watching()

    @abstractmethod
    def _request(self, frame: bytes) -> bytes:
        """Delivers `frame` and returns the reply's bytes."""

    def close(self) -> None:
        """Releases connections; the default transport holds none."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
