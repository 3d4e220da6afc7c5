"""In-process transport: hands frames to a handler in the same process (tests, in-process split runs)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from splitveil.transport.base import Transport


class LoopbackTransport(Transport):
    """Passes each frame's bytes to `handler` (e.g. `PartService.handle`) and returns its reply bytes.

    The frames are really encoded and decoded, so byte counts and codec effects equal the network's.
    """

    def __init__(self, handler: Callable[[bytes], bytes]):
        super().__init__()
        self.handler = handler
        self._replies: deque[bytes] = deque()

    def _request(self, frame: bytes) -> bytes:
        return self.handler(bytes(frame))

    def _post(self, frame: bytes) -> None:  # the handler answers at once; the reply waits for `collect`
        self._replies.append(self.handler(bytes(frame)))

    def _collect(self) -> bytes:
        return self._replies.popleft()
