"""A link emulator: a user-space TCP proxy on this machine that adds the delay, jitter and bandwidth of a real link.

Kernel netem is not available on these machines, so tests and benchmarks put this proxy between a client and a
server (`splitveil link` on the command line, `Link` in process). Each direction of each connection is one link:

- a chunk read from one side is *sent* when the link is free (bandwidth: a chunk of `n` bytes occupies the link for
  `8 n / bandwidth` seconds, chunks queue behind each other), then *arrives* one one-way delay later
  (`rtt / 2`, plus a jitter drawn uniformly from [-jitter, +jitter]);
- arrivals keep the stream's order (TCP never reorders), so a chunk never overtakes the one before it;
- `reset_after` bytes carried by a connection (both directions together) reset it (RST to both sides), and
  `Link.reset()` resets every live connection on demand: the clients' replay is tested against that.

Timing: delivery is scheduled on the asyncio loop, whose timers wake within about 1 ms; a measured RTT exceeds the
asked one by that much at most (tested: within 5% at the RTTs the benchmarks use).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
import threading
from dataclasses import dataclass

from splitveil.core.errors import ConfigError

log = logging.getLogger(__name__)
CHUNK = 64 * 1024


@dataclass(frozen=True)
class LinkSpec:
    """What the emulated link adds. `bandwidth_mbit` None = unlimited; `reset_after` None = never reset."""

    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_mbit: float | None = None
    reset_after: int | None = None  # bytes a connection carries before it is reset
    resets: int = 1  # connections reset by `reset_after` in all (later connections are left alone)
    seed: int | None = None  # of the jitter draws

    def __post_init__(self):
        if not self.rtt_ms >= 0:
            raise ConfigError(f"--rtt must be >= 0 ms, got {self.rtt_ms}")
        if not 0 <= self.jitter_ms <= self.rtt_ms / 2:
            raise ConfigError(f"--jitter must be between 0 and half the RTT ({self.rtt_ms / 2:g} ms), got {self.jitter_ms}")
        if self.bandwidth_mbit is not None and not self.bandwidth_mbit > 0:
            raise ConfigError(f"--bw must be > 0 Mbit/s, got {self.bandwidth_mbit}")
        if self.reset_after is not None and self.reset_after < 1:
            raise ConfigError(f"--reset-after must be at least 1 byte, got {self.reset_after}")
        if self.resets < 0:
            raise ConfigError(f"--resets must be >= 0, got {self.resets}")

    def describe(self) -> str:
        parts = [f"rtt {self.rtt_ms:g} ms"]
        if self.jitter_ms:
            parts.append(f"jitter ±{self.jitter_ms:g} ms")
        parts.append(f"{self.bandwidth_mbit:g} Mbit/s" if self.bandwidth_mbit else "unlimited bandwidth")
        if self.reset_after:
            parts.append(f"reset after {self.reset_after} bytes ({self.resets} connection(s))")
        return ", ".join(parts)


def parse_address(text: str, option: str) -> tuple[str, int]:
    """HOST:PORT -> (host, port), or a ConfigError naming `option`."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{option} must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class _Direction:
    """One direction of one connection: a link with its own queue, bandwidth clock and order."""

    def __init__(self, link: "Link", loop: asyncio.AbstractEventLoop):
        self.link, self.rng, self.loop = link, link.rng, loop
        self.link_free = 0.0  # when the link has sent everything queued so far
        self.last_arrival = 0.0

    @property
    def spec(self) -> LinkSpec:
        return self.link.spec  # read per chunk: a benchmark may change the link between runs

    def arrival(self, size: int) -> float:
        now = self.loop.time()
        sent = now
        if self.spec.bandwidth_mbit:
            sent = max(now, self.link_free) + 8 * size / (self.spec.bandwidth_mbit * 1e6)
            self.link_free = sent
        one_way = self.spec.rtt_ms / 2000
        if self.spec.jitter_ms:
            one_way += self.rng.uniform(-self.spec.jitter_ms, self.spec.jitter_ms) / 1000
        self.last_arrival = max(sent + max(one_way, 0.0), self.last_arrival)
        return self.last_arrival


class _Connection:
    def __init__(self, link: "Link", client: tuple, server: tuple):
        self.link = link
        self.client_reader, self.client_writer = client
        self.server_reader, self.server_writer = server
        self.carried = 0
        self.reset_armed = link._take_reset()
        self.tasks: list[asyncio.Task] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [
            asyncio.create_task(self._pump(self.client_reader, self.server_writer, _Direction(self.link, loop))),
            asyncio.create_task(self._pump(self.server_reader, self.client_writer, _Direction(self.link, loop))),
        ]
        try:
            await asyncio.gather(*self.tasks)
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass
        finally:
            self.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: _Direction) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(queue, writer))
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                self.carried += len(data)
                if self.reset_armed and self.carried >= self.link.spec.reset_after:
                    self.link.resets_done += 1
                    self.reset()
                    return
                queue.put_nowait((direction.arrival(len(data)), data))
            queue.put_nowait((direction.arrival(0), None))
            await deliver
        finally:
            if not deliver.done():
                deliver.cancel()

    async def _deliver(self, queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    def reset(self) -> None:
        """Resets both sides (RST, not FIN): what a dropped route or a middlebox's reset looks like to them."""
        for writer in (self.client_writer, self.server_writer):
            sock = writer.get_extra_info("socket")
            try:
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            writer.transport.abort()
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()

    def close(self) -> None:
        for writer in (self.client_writer, self.server_writer):
            if not writer.is_closing():
                writer.close()
        self.link._connections.discard(self)


class Link:
    """The emulator: listens on `listen` and forwards each connection to `target` through `spec`.

    In process: `with Link(spec, target) as link:` runs it on a thread of its own (its own event loop); `link.port`
    is where clients connect; assigning `link.spec` changes the delay and bandwidth of the connections already made
    (a benchmark sweeps conditions over one connection; `reset_after` counts are fixed at a connection's start).
    `serve_forever` runs it on the caller's loop (the `splitveil link` command).
    """

    def __init__(self, spec: LinkSpec, target: tuple[str, int], *, listen: tuple[str, int] = ("127.0.0.1", 0)):
        self.spec = spec
        self.target = target
        self.listen = listen
        self.rng = random.Random(spec.seed)
        self.port: int | None = None
        self.connections_made = 0
        self.resets_done = 0
        self._resets_left = spec.resets if spec.reset_after else 0
        self._connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    def _take_reset(self) -> bool:
        if self._resets_left > 0:
            self._resets_left -= 1
            return True
        return False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_made += 1
        try:
            server = await asyncio.open_connection(*self.target)
        except OSError as error:
            log.warning("link: cannot reach %s:%d: %s", *self.target, error)
            writer.transport.abort()
            return
        for w in (writer, server[1]):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = _Connection(self, (reader, writer), server)
        self._connections.add(connection)
        await connection.run()

    async def start(self) -> None:
        """Starts listening on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        try:
            self._server = await asyncio.start_server(self._accept, *self.listen)
        except OSError as error:
            raise ConfigError(f"cannot listen on {self.listen[0]}:{self.listen[1]}: {error.strerror or error}") from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def serve_forever(self, ready=None) -> None:
        await self.start()
        if ready is not None:
            ready(self)
        await self._stopped.wait()
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._server.close()
        for connection in list(self._connections):
            connection.reset()
        await self._server.wait_closed()

    def reset(self) -> int:
        """Resets every live connection now (thread-safe); returns how many."""
        if self._loop is None:
            return 0
        done = threading.Event()
        count = [0]

        def reset_all():
            count[0] = len(self._connections)
            for connection in list(self._connections):
                connection.reset()
            done.set()

        self._loop.call_soon_threadsafe(reset_all)
        done.wait(5)
        return count[0]

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)

    # -- in process, on a thread -----------------------------------------------------------------------------

    def __enter__(self) -> "Link":
        ready = threading.Event()
        failure: list[BaseException] = []

        def run():
            async def main():
                try:
                    await self.start()
                except BaseException as error:  # reported to the caller below
                    failure.append(error)
                    ready.set()
                    return
                ready.set()
                await self._stopped.wait()
                await self._shutdown()

            asyncio.run(main())

        self._thread = threading.Thread(target=run, name="splitveil-link", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        if self.port is None:
            raise ConfigError("the link emulator did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(5)
