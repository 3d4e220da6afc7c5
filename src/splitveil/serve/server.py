"""The network service: binary WebSocket frames over TLS, bearer-token auth, one session per connection.

A single compute thread runs the parts (one torch thread). An asyncio scheduler feeds it in rounds: each round
takes every waiting decode step (single-position frames, so concurrent sessions' steps run as one batched forward)
and at most one prefill chunk, the oldest; a decode step therefore waits behind at most one chunk, however many
sessions are prefilling; a round of steps waits (briefly) for the sessions due to send theirs, so concurrent sessions
stay in one batch (`serve.pacing`). Connections are handled on the event loop; a bad frame gets an ERROR frame and closes
only its own connection (and session). Connections, per-connection buffering and pending work are bounded
(`ServerLimits`); the background tasks log a failed iteration in one line and carry on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus

from splitveil.serve.auth import bearer, token_id, token_matches
from splitveil.serve.pacing import StepPacer
from splitveil.serve.ratelog import RateLimitedLog
from splitveil.serve.service import PartService, Work
from splitveil.wire.frame import HEADER_FIXED_BYTES, NO_SESSION, FrameKind, encode_frame, error_frame

log = logging.getLogger(__name__)
refusals = RateLimitedLog(log)  # one line per refused connection, bounded: a flood must not block the server


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _compute_thread_setup(threads: int) -> None:
    """OpenMP thread counts are per thread: give the compute thread the count the process was set up with."""
    import torch

    torch.set_num_threads(threads)


@dataclass(frozen=True)
class ServerLimits:
    idle_timeout: float = 300.0  # seconds a session may stay silent (nothing queued) before it is evicted
    batch_window: float = 0.002  # seconds the scheduler waits for more steps when other sessions are open
    step_hold: float = 0.1  # at most this long a round of steps waits for sessions due back (serve.pacing); 0: off
    step_cohorts: int = 2  # groups 4+ decoding sessions' steps are kept in (serve.pacing); 1: one round takes all
    max_queue: int = 1024  # pending work items (all connections) before new ones are refused
    max_connections: int = 128  # open WebSocket connections at most; more are refused at the upgrade (HTTP 503)
    connection_queue: int = 2  # received messages one connection may buffer before the server stops reading it
    ping_interval: float = 20.0  # seconds between the server's keepalive pings on each connection
    ping_timeout: float = 60.0  # seconds a ping may wait for its pong before the connection is closed


def take_round(steps: deque, chunks: deque, most: int | None = None) -> list:
    """What one compute round runs: every waiting decode step (the `most` oldest, when given) and at most one prefill
    chunk (the oldest).

    Each connection has at most one frame waiting, so the chunks of concurrent prefills alternate, and a decode
    step that arrives while a chunk computes runs in the very next round.
    """
    if most is None or most >= len(steps):
        items = list(steps)
        steps.clear()
    else:
        items = [steps.popleft() for _ in range(most)]
    if chunks:
        items.append(chunks.popleft())
    return items


class SplitServer:
    """Serves a PartService over WebSockets (TLS unless `ssl_context` is None).

    Args:
        service: the sessions and parts: a PartService, or any object with its contract (`admit`, `run`, `release`,
            `sessions`, `evict_idle`, `close_session`, `max_frame_bytes`) whose work items have `session_id`,
            `frame` and `is_step`.
        token: the bearer token clients must present.
        ssl_context: server TLS context; None means plaintext (only with an explicit --insecure). Serving turns its
            TLS 1.3 session tickets off (see `serve`).
        host, port: where to listen (port 0 = any free port; see `port` once started).
        limits: connections, buffering, pending work, idle time and the batching window.
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
        self.sockets: list = []  # the listening sockets, once serving
        self._open_connections: set = set()  # connections admitted at the upgrade and not closed yet
        self._steps: deque = deque()  # (work, future): waiting decode steps
        self._chunks: deque = deque()  # (work, future): waiting prefill chunks and other multi-position frames
        self._wake: asyncio.Event | None = None
        self._step_arrived: asyncio.Event | None = None
        self._pacer = StepPacer(max_hold=limits.step_hold, cohorts=limits.step_cohorts)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitveil-compute",
                                            initializer=_compute_thread_setup, initargs=(_torch_threads(),))
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
        """Checks the token and the connection limit before any WebSocket exists (never raises: a 4xx/5xx answer)."""
        try:
            values = request.headers.get_all("Authorization")
            if len(values) > 1:
                refusals.warning("refused a connection: %d Authorization headers", len(values))
                return connection.respond(HTTPStatus.BAD_REQUEST, "send exactly one Authorization header\n")
            if not token_matches(bearer(values[0] if values else None), self.token):
                refusals.warning("refused a connection: missing or wrong bearer token")
                return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token\n")
            from websockets.protocol import State

            self._open_connections = {c for c in self._open_connections if c.state is not State.CLOSED}
            if len(self._open_connections) >= self.limits.max_connections:
                refusals.warning("refused a connection: %d connections open (the limit)", len(self._open_connections))
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections; try again later\n")
            self._open_connections.add(connection)
            return None
        except Exception as error:  # a request the checks above did not foresee: refuse it, in one log line
            refusals.warning("refused a connection: %s: %s", type(error).__name__, " ".join(str(error).split()))
            return connection.respond(HTTPStatus.BAD_REQUEST, "bad request\n")

    # -- connections -----------------------------------------------------------------------------------------

    async def _connection(self, websocket) -> None:
        from websockets.exceptions import ConnectionClosed

        session_id: bytes | None = None
        try:
            async for message in websocket:
                kind_sent = message[3] if isinstance(message, bytes) and len(message) > 3 else None
                is_open, is_close = kind_sent == FrameKind.OPEN, kind_sent == FrameKind.CLOSE
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
                    elif is_close:  # CLOSE of its own session (the only one it may close); a TRUNCATE keeps it
                        self.connections.pop(session_id, None)
                        self._pacer.forget(session_id)
                        session_id = None
        except ConnectionClosed:
            pass
        finally:
            self._open_connections.discard(websocket)
            if session_id is not None:
                self.service.close_session(session_id)
                self.connections.pop(session_id, None)
                self._pacer.forget(session_id)
            await websocket.close()

    async def _compute(self, work: Work) -> bytes:
        if len(self._steps) + len(self._chunks) >= self.limits.max_queue:
            self.service.release(work)
            refusals.warning("refused a frame: %d frames wait for compute (the limit)", self.limits.max_queue)
            return encode_frame(error_frame("the server is overloaded; try again", session=work.session_id, seq=work.frame.seq))
        future = self._loop.create_future()
        (self._steps if work.is_step else self._chunks).append((work, future))
        if work.is_step:
            self._pacer.arrived(work.session_id, self._loop.time())
            self._step_arrived.set()
        self._wake.set()
        return await future

    @property
    def pending(self) -> int:
        """Frames admitted and waiting for the compute thread."""
        return len(self._steps) + len(self._chunks)

    async def _scheduler(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._round()
            except Exception as error:  # logged; the loop goes on, or nothing would ever be computed again
                log.error("scheduler round failed: %s: %s", type(error).__name__, " ".join(str(error).split()))
                await asyncio.sleep(0.05)  # a persistent fault must not spin the event loop
            if self.pending:
                self._wake.set()

    async def _round(self) -> None:
        """One compute round (`take_round`), after a short batching window when other sessions are open, and a hold
        for the sessions whose steps are due; with four or more sessions decoding, the round takes its cohort's
        share of the steps (`serve.pacing`)."""
        if self.limits.batch_window > 0 and len(self.service.sessions) > 1:
            await asyncio.sleep(self.limits.batch_window)
            await self._hold_for_due_steps()
        items = take_round(self._steps, self._chunks, self._pacer.round_cap(self._loop.time(), self._queued()))
        replies: list = []
        started = self._loop.time()
        try:
            replies = await self._loop.run_in_executor(self._executor, self.service.run, [work for work, _ in items])
            if items and all(work.is_step for work, _ in items):
                self._pacer.computed(self._loop.time() - started)
        finally:  # every taken frame gets an answer, even when the round itself failed or was cancelled
            now = self._loop.time()
            for index, (work, future) in enumerate(items):
                if work.session_id in self.service.sessions:  # a closed session's pace is forgotten, not revived
                    self._pacer.replied(work.session_id, now)
                if index >= len(replies):
                    self.service.release(work)
                if not future.done():
                    future.set_result(replies[index] if index < len(replies) else encode_frame(
                        error_frame("internal server error", session=work.session_id, seq=work.frame.seq)))
            items = None  # hold no session while idle: eviction must free its memory

    def _queued(self) -> set:
        return {work.session_id for work, _ in self._steps}

    async def _hold_for_due_steps(self) -> None:
        """Waits while sessions not in the round are due to send their steps soon (`StepPacer.hold_until`)."""
        since = self._loop.time()
        while self._steps:
            queued = self._queued()
            cap = self._pacer.round_cap(self._loop.time(), queued)
            if cap is not None and len(queued) >= cap:  # a cohort is in: the others make the next round
                return
            until = self._pacer.hold_until(self._loop.time(), queued, since)
            if until is None:
                return
            self._step_arrived.clear()
            try:
                await asyncio.wait_for(self._step_arrived.wait(), max(0.0, until - self._loop.time()))
            except TimeoutError:
                return

    async def _evictor(self) -> None:
        period = max(0.05, min(self.limits.idle_timeout / 4, 5.0))
        while True:
            await asyncio.sleep(period)
            try:
                await self._evict()
            except Exception as error:  # logged; the loop goes on, or nothing would ever be evicted again
                log.error("eviction round failed: %s: %s", type(error).__name__, " ".join(str(error).split()))

    async def _evict(self) -> None:
        for session_id in self.service.evict_idle(self.limits.idle_timeout):
            log.info("evicted an idle session")
            self._pacer.forget(session_id)
            websocket = self.connections.pop(session_id, None)
            if websocket is None:
                continue
            try:
                await websocket.send(encode_frame(error_frame(f"session evicted after {self.limits.idle_timeout:g} s idle", session=session_id)))
            except Exception:  # the peer is gone already; close below either way
                pass
            finally:
                await websocket.close()

    # -- running ---------------------------------------------------------------------------------------------

    async def serve(self, ready=None) -> None:
        """Serves until `stop()`; calls `ready(self)` once listening."""
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        if self.ssl_context is not None:
            self.ssl_context.num_tickets = 0  # also for a context not made by server_context (see there why)
        self._wake = asyncio.Event()
        self._step_arrived = asyncio.Event()
        self._stop = asyncio.Event()
        max_message = self.service.max_frame_bytes * 2  # larger frames still get our ERROR frame below this
        async with serve(self._connection, self.host, self.port, ssl=self.ssl_context, process_request=self._authorize,
                         compression=None, max_size=max_message, max_queue=self.limits.connection_queue,
                         ping_interval=self.limits.ping_interval,
                         ping_timeout=self.limits.ping_timeout) as server:
            self.sockets = list(server.sockets)
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


def serve_until_stopped(server: "SplitServer", ready, *, host: str, port: int) -> None:
    """Runs `server` until SIGINT or SIGTERM, calling `ready(server)` once it listens; an address it cannot listen on
    is a ConfigError (exit 2, one line). Used by `splitveil serve` (plain and `--ray`), `slip serve` and `partition`."""
    import signal

    from splitveil.core.errors import ConfigError

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop_from_loop)
        await server.serve(ready=ready)

    try:
        asyncio.run(main())
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
