"""The network service: binary WebSocket frames over TLS, bearer-token auth, one session per connection.

A single compute thread runs the parts (one torch thread); an asyncio scheduler hands it everything that is
waiting, so single-position decode steps of concurrent sessions run as one batched forward. Connections are
handled on the event loop; a bad frame gets an ERROR frame and closes only its own connection (and session).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus

from splitveil.serve.auth import bearer, token_id, token_matches
from splitveil.serve.service import PartService
from splitveil.wire.frame import HEADER_FIXED_BYTES, NO_SESSION, FrameKind, encode_frame, error_frame

log = logging.getLogger(__name__)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _compute_thread_setup(threads: int) -> None:
    """OpenMP thread counts are per thread: give the compute thread the count the process was set up with."""
    import torch

    torch.set_num_threads(threads)


@dataclass(frozen=True)
class ServerLimits:
    idle_timeout: float = 300.0  # seconds a session may stay silent before it is evicted
    batch_window: float = 0.002  # seconds the scheduler waits for more steps when other sessions are open
    max_queue: int = 1024  # pending work items before new ones are refused


class SplitServer:
    """Serves a PartService over WebSockets (TLS unless `ssl_context` is None).

    Args:
        service: the sessions and parts.
        token: the bearer token clients must present.
        ssl_context: server TLS context; None means plaintext (only with an explicit --insecure).
        host, port: where to listen (port 0 = any free port; see `port` once started).
    """

    def __init__(self, service: PartService, *, token: str, ssl_context=None, host: str = "127.0.0.1", port: int = 0,
                 limits: ServerLimits = ServerLimits()):
        self.service = service
        self.token = token
        self.owner = token_id(token)
        self.ssl_context = ssl_context
        self.host = host
        self.port = port
        self.limits = limits
        self.connections: dict[bytes, object] = {}  # session id -> its connection
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitveil-compute",
                                            initializer=_compute_thread_setup, initargs=(_torch_threads(),))
        self._queue: asyncio.Queue | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._startup_error: BaseException | None = None

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl_context is not None else "ws"
        return f"{scheme}://{self.host}:{self.port}"

    # -- HTTP upgrade: authentication ------------------------------------------------------------------------

    def _authorize(self, connection, request):
        if not token_matches(bearer(request.headers.get("Authorization")), self.token):
            log.warning("refused a connection: missing or wrong bearer token")
            return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token\n")
        return None

    # -- connections -----------------------------------------------------------------------------------------

    async def _connection(self, websocket) -> None:
        from websockets.exceptions import ConnectionClosed

        session_id: bytes | None = None
        try:
            async for message in websocket:
                is_open = isinstance(message, bytes) and len(message) > 3 and message[3] == FrameKind.OPEN
                if isinstance(message, str):
                    await websocket.send(encode_frame(error_frame("frames must be binary messages")))
                    break
                work, reply = self.service.admit(message, owner=self.owner, bound_session=session_id or NO_SESSION)
                if work is not None:
                    reply = await self._compute(work)
                    work = None  # hold no session between frames: eviction must free its memory
                kind = reply[3] if len(reply) >= HEADER_FIXED_BYTES else FrameKind.ERROR
                await websocket.send(reply)
                if kind == FrameKind.ERROR:
                    break  # a refused frame ends the connection and its session
                if kind == FrameKind.OK:
                    if is_open:  # this connection now owns the new session
                        session_id = bytes(reply[8:24])
                        self.connections[session_id] = websocket
                    else:  # CLOSE of its own session (the only one it may close)
                        self.connections.pop(session_id, None)
                        session_id = None
        except ConnectionClosed:
            pass
        finally:
            if session_id is not None:
                self.service.close_session(session_id)
                self.connections.pop(session_id, None)
            await websocket.close()

    async def _compute(self, work) -> bytes:
        future = self._loop.create_future()
        if self._queue.qsize() >= self.limits.max_queue:
            return encode_frame(error_frame("the server is overloaded; try again", session=work.session_id, seq=work.frame.seq))
        await self._queue.put((work, future))
        return await future

    async def _scheduler(self) -> None:
        while True:
            first = await self._queue.get()
            await self._run_batch(first)
            first = None  # hold no session while idle: eviction must free its memory

    async def _run_batch(self, first) -> None:
        """Runs `first` together with everything else waiting (after a short window when others are open)."""
        items = [first]
        if self.limits.batch_window > 0 and len(self.service.sessions) > 1:
            await asyncio.sleep(self.limits.batch_window)
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        replies = await self._loop.run_in_executor(self._executor, self.service.run, [work for work, _ in items])
        for (_, future), reply in zip(items, replies):
            if not future.done():
                future.set_result(reply)

    async def _evictor(self) -> None:
        period = max(0.05, min(self.limits.idle_timeout / 4, 5.0))
        while True:
            await asyncio.sleep(period)
            for session_id in self.service.evict_idle(self.limits.idle_timeout):
                log.info("evicted an idle session")
                websocket = self.connections.pop(session_id, None)
                if websocket is not None:
                    try:
                        await websocket.send(encode_frame(error_frame(f"session evicted after {self.limits.idle_timeout:g} s idle", session=session_id)))
                    finally:
                        await websocket.close()

    # -- running ---------------------------------------------------------------------------------------------

    async def serve(self, ready=None) -> None:
        """Serves until `stop()`; calls `ready(self)` once listening."""
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._stop = asyncio.Event()
        max_message = self.service.max_frame_bytes * 2  # larger frames still get our ERROR frame below this
        async with serve(self._connection, self.host, self.port, ssl=self.ssl_context, process_request=self._authorize,
                         compression=None, max_size=max_message, ping_interval=20, ping_timeout=60) as server:
            self.port = server.sockets[0].getsockname()[1]
            tasks = [asyncio.create_task(self._scheduler()), asyncio.create_task(self._evictor())]
            if ready is not None:
                ready(self)
            try:
                await self._stop.wait()
            finally:
                for task in tasks:
                    task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def start_in_thread(self) -> "SplitServer":
        """Runs the server on its own event loop in a daemon thread; returns once it listens."""

        def run():
            try:
                asyncio.run(self.serve(ready=lambda _: self._started.set()))
            except BaseException as error:  # surfaced to the caller of start_in_thread
                self._startup_error = error
                self._started.set()

        self._thread = threading.Thread(target=run, name="splitveil-server", daemon=True)
        self._thread.start()
        self._started.wait(30)
        if self._startup_error is not None:
            raise self._startup_error
        return self

    def stop_from_loop(self) -> None:
        """Stops serving; call from the server's own event loop (e.g. a signal handler)."""
        if self._stop is not None:
            self._stop.set()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop closed in between: already stopped
                pass
        if self._thread is not None:
            self._thread.join(10)
