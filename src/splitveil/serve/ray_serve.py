"""The trunk as a Ray Serve deployment: replicas of `PartService` behind our own TLS ingress.

```
client ══ wss (TLS, bearer token) ══► RayIngress (SplitServer: token, connection limits)
                                         │ frame bytes, routed by session id (Ray Serve model multiplexing)
                                         ▼
                         TrunkReplica x N (each: PartService + compute rounds + idle eviction)
```

- **TLS and the token stay at the ingress**: the replicas receive frame bytes and the token's digest (the owner
  sessions are bound to), never the token; nothing but the ingress faces clients (Ray Serve's HTTP proxy is off,
  and every port of Ray's own processes listens on loopback: `ray_loopback.py`).
- **Session affinity**: the ingress draws each session's id (16 random bytes) and sends every frame of the session
  with `multiplexed_model_id = id.hex()`. The replica that takes the OPEN registers that id with Ray Serve's
  multiplexing (`serve.multiplexed` loader), so the router sends the session's later frames to it. Ray learns the
  id asynchronously (the replica pushes its ids every 0.1 s), so a frame may still reach another replica: that
  replica answers "not here" without touching anything, and the ingress retries with a short back-off for up to
  `affinity_wait` seconds. Closed and evicted sessions are dropped from the replica's multiplexed ids.
- **Per-replica limits**: each replica's `PartService` has its own sessions, positions per session and KV budget;
  `max_ongoing_requests` per replica is sessions + slack (a session has at most one frame in flight).
- **A replica dies**: the frames of its sessions fail at the ingress, which answers "session evicted: ..."; the
  client's `RemoteStage` then replays its history into a new session on a live replica (the same replay as after a
  server restart), and Ray Serve starts a replacement replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

from ray import serve

from splitveil.serve.ray_loopback import keep_ray_on_loopback, keep_replica_grpc_on_loopback
from splitveil.serve.server import SplitServer, take_round
from splitveil.serve.service import error_reply
from splitveil.wire.frame import HEADER_FIXED_BYTES, NO_SESSION, FrameKind, encode_frame, error_frame

log = logging.getLogger(__name__)
APP_NAME = "splitveil-trunk"
# a replica's answer: its reply frame; this session is not on this replica; this replica cannot take a new session
HERE, NOT_HERE, FULL = "ok", "not-here", "full"


@dataclass(frozen=True)
class ReplicaSettings:
    """What each replica serves, and its own limits (the `splitveil serve` flags, per replica)."""

    model: str
    cuts: tuple[int, ...]
    max_sessions: int = 64
    max_tokens: int | None = None
    max_kv_mb: float | None = None  # None: half the machine's memory divided among the replicas
    max_frame_bytes: int = 4 * 2**20
    batch_steps: bool = True
    batch_window: float = 0.002  # seconds a round waits for more steps when other sessions are open
    idle_timeout: float = 300.0
    threads: int = 1
    dtype: str = "float32"  # the trunk's weights (replicas run on the CPU: Ray gives them no GPU here)
    load_format: str = "auto"

    def for_replicas(self, replicas: int) -> "ReplicaSettings":
        """These settings with the KV budget each of `replicas` replicas gets: as given, or (None) half the machine's
        memory (`default_max_kv_mb`) divided among them."""
        if self.max_kv_mb is not None:
            return self
        from splitveil.serve.build import default_max_kv_mb

        return replace(self, max_kv_mb=default_max_kv_mb() / max(1, replicas))


# -- the replica -------------------------------------------------------------------------------------------------


class ComputeRounds:
    """One replica's compute: the `SplitServer` schedule (every waiting decode step + at most one prefill chunk per
    round, on one compute thread), fed by the replica's concurrent requests, and its idle-session eviction."""

    def __init__(self, service, settings: ReplicaSettings, on_evict):
        self.service, self.settings, self.on_evict = service, settings, on_evict
        self.steps: deque = deque()
        self.chunks: deque = deque()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitveil-replica",
                                           initializer=_set_threads, initargs=(settings.threads,))
        self.wake: asyncio.Event | None = None
        self.tasks: list = []

    def _start(self) -> None:
        if self.wake is None:
            self.wake = asyncio.Event()
            loop = asyncio.get_running_loop()
            self.tasks = [loop.create_task(self._rounds()), loop.create_task(self._evictor())]

    async def compute(self, work) -> bytes:
        self._start()
        future = asyncio.get_running_loop().create_future()
        (self.steps if work.is_step else self.chunks).append((work, future))
        self.wake.set()
        return await future

    async def _rounds(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.settings.batch_window > 0 and len(self.service.sessions) > 1:
                await asyncio.sleep(self.settings.batch_window)
            items = take_round(self.steps, self.chunks)
            replies: list = []
            try:
                replies = await loop.run_in_executor(self.executor, self.service.run, [work for work, _ in items])
            except Exception as error:  # logged; every frame still gets an answer below
                log.error("compute round failed: %s: %s", type(error).__name__, error)
            for index, (work, future) in enumerate(items):
                if index >= len(replies):
                    self.service.release(work)
                if not future.done():
                    future.set_result(replies[index] if index < len(replies) else encode_frame(
                        error_frame("internal server error", session=work.session_id, seq=work.frame.seq)))
            if self.steps or self.chunks:
                self.wake.set()

    async def _evictor(self) -> None:
        period = max(0.05, min(self.settings.idle_timeout / 4, 5.0))
        while True:
            await asyncio.sleep(period)
            try:
                for session_id in self.service.evict_idle(self.settings.idle_timeout):
                    self.on_evict(session_id)
            except Exception as error:  # logged; eviction goes on
                log.error("eviction round failed: %s: %s", type(error).__name__, error)


@serve.deployment(name="trunk", max_ongoing_requests=80)
class TrunkReplica:
    """One replica: the cloud parts' weights, a `PartService` with this replica's limits, compute rounds."""

    def __init__(self, settings: dict):
        from splitveil.core.runtime import set_threads
        from splitveil.serve.build import build_cloud_service

        keep_replica_grpc_on_loopback()
        self.settings = ReplicaSettings(**{**settings, "cuts": tuple(settings["cuts"])})
        set_threads(self.settings.threads)
        s = self.settings
        self.service = build_cloud_service(s.model, s.cuts, max_sessions=s.max_sessions, max_tokens=s.max_tokens,
                                           max_frame_bytes=s.max_frame_bytes, batch_steps=s.batch_steps,
                                           max_kv_mb=s.max_kv_mb, dtype=s.dtype, load_format=s.load_format)
        self.rounds = ComputeRounds(self.service, self.settings, on_evict=lambda sid: self._forget(sid.hex()))

    @serve.multiplexed(max_num_models_per_replica=-1)  # sessions are bounded by the PartService, not by eviction
    async def _hold(self, route: str) -> str:
        """Registers a session id with Ray Serve's router: its frames come to this replica from now on."""
        return route

    def _forget(self, route: str) -> None:
        """Drops a closed or evicted session's id from this replica's multiplexed ids (so the router stops sending it
        here and counts only live sessions when it places new ones). Uses Ray Serve's multiplex wrapper."""
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        if wrapper is not None and wrapper.models.pop(route, None) is not None:
            wrapper._push_multiplexed_replica_info = True

    async def frame(self, data: bytes, owner: bytes, opening: bool) -> tuple[str, bytes]:
        """Admits and computes one frame of the session named by the multiplexed id."""
        route = serve.get_multiplexed_model_id()
        session_id = bytes.fromhex(route)
        if opening:
            return await self._open(session_id, route, data, owner)
        if session_id not in self.service.sessions:
            return NOT_HERE, b""
        await self._hold(route)  # keeps the id registered here
        work, reply = self.service.admit(data, owner=owner, bound_session=session_id)
        if work is not None:
            reply = await self.rounds.compute(work)
        if session_id not in self.service.sessions:  # closed by this frame
            self._forget(route)
        return HERE, reply

    async def _open(self, session_id: bytes, route: str, data: bytes, owner: bytes) -> tuple[str, bytes]:
        """OPEN under the id the ingress drew: the service opens a session, which is then filed under that id.
        A refusal for lack of room (sessions or KV memory) is answered FULL, so the ingress can try elsewhere."""
        from splitveil.wire.frame import decode_frame

        if session_id in self.service.sessions or session_id == NO_SESSION:
            return FULL, encode_frame(error_frame("session id collision; open again"))
        _, reply = self.service.admit(data, owner=owner, bound_session=NO_SESSION)
        if len(reply) < HEADER_FIXED_BYTES or reply[3] != FrameKind.OK:
            try:
                full = " full " in f" {decode_frame(reply).message} "
            except Exception:  # noqa: BLE001 - not a refusal for room
                full = False
            return (FULL if full else HERE), reply
        drawn = bytes(reply[8:24])
        self.service.sessions[session_id] = self.service.sessions.pop(drawn)
        await self._hold(route)
        return HERE, reply[:8] + session_id + reply[24:]

    async def drop(self, session_id: bytes) -> bool:
        """Closes a session whose client connection ended without CLOSE."""
        if session_id not in self.service.sessions:
            return False
        self.service.close_session(session_id)
        self._forget(session_id.hex())
        return True

    async def stats(self, session_id: bytes | None = None) -> dict:
        """This replica's process id, sessions, KV bytes and batch sizes (and whether it holds `session_id`)."""
        return {"pid": os.getpid(), "sessions": len(self.service.sessions), "kv_bytes": self.service.kv_bytes,
                "batch_sizes": dict(self.service.batch_sizes), "holds": session_id in self.service.sessions}


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# -- the ingress -------------------------------------------------------------------------------------------------


@dataclass
class RelayWork:
    """A frame on its way to a replica: the session it belongs to and who sent it."""

    session_id: bytes
    data: bytes
    owner: bytes
    opening: bool = False

    @property
    def is_step(self) -> bool:
        return False


class RelayService:
    """What `SplitServer` needs of a service, for an ingress that computes nothing: `admit` checks only what routing
    needs (the frame kind, the connection's session) and hands every frame on; the replicas validate the rest."""

    def __init__(self, handle, *, max_frame_bytes: int, affinity_wait: float = 5.0):
        self.handle = handle
        self.max_frame_bytes = max_frame_bytes
        self.affinity_wait = affinity_wait
        self.sessions: dict[bytes, float] = {}  # live sessions of this ingress -> time opened
        self.reroutes = 0  # frames that reached a replica without their session and were sent again
        self.longest_reroute = 0.0  # seconds the longest-rerouted frame took to find its session's replica
        self.failures = 0  # frames lost with a replica

    def admit(self, data: bytes, *, owner: bytes = b"", bound_session: bytes | None = None):
        if len(data) < HEADER_FIXED_BYTES or data[:2] != b"SV":
            return None, error_reply("malformed frame", None)
        if data[3] == FrameKind.OPEN:
            if bound_session not in (None, NO_SESSION):
                return None, error_reply("this connection already has a session", None)
            return RelayWork(secrets.token_bytes(16), bytes(data), owner, opening=True), None
        if bound_session in (None, NO_SESSION):
            return None, error_reply("open a session on this connection first", None)
        return RelayWork(bound_session, bytes(data), owner), None

    async def forward(self, work: RelayWork) -> bytes:
        """Sends `work` to the replica holding its session (an OPEN: to one with room); returns the reply, or an
        ERROR frame after which the client replays when its session is lost."""
        route = work.session_id.hex()
        target = self.handle.options(multiplexed_model_id=route)
        deadline, delay = time.monotonic() + self.affinity_wait, 0.005
        while True:
            try:
                status, reply = await target.frame.remote(work.data, work.owner, work.opening)
            except Exception as error:  # the replica died or Ray could not reach it: the client replays
                self.failures += 1
                self.sessions.pop(work.session_id, None)
                log.warning("a replica failed a frame: %s: %s", type(error).__name__, " ".join(str(error).split())[:200])
                return encode_frame(error_frame("session evicted: the replica holding it failed", session=work.session_id))
            if status == HERE:
                if delay > 0.005:
                    self.longest_reroute = max(self.longest_reroute, time.monotonic() - deadline + self.affinity_wait)
                    log.debug("rerouted a frame: %d reroutes so far, longest %.3f s", self.reroutes, self.longest_reroute)
                if work.opening and len(reply) >= HEADER_FIXED_BYTES and reply[3] == FrameKind.OK:
                    self.sessions[work.session_id] = time.monotonic()
                elif reply[3:4] == bytes([FrameKind.OK]) and work.data[3:4] == bytes([FrameKind.CLOSE]):  # CLOSE answered
                    self.sessions.pop(work.session_id, None)
                return reply
            if status == FULL:  # Ray placed the new session by stale counts: draw a new id, so it is placed again
                if time.monotonic() > deadline:
                    return reply  # every replica stayed full: the client gets the refusal
                work = RelayWork(secrets.token_bytes(16), work.data, work.owner, opening=True)
                route = work.session_id.hex()
                target = self.handle.options(multiplexed_model_id=route)
            elif time.monotonic() > deadline:
                log.info("no replica holds a session after %.1f s: the client replays", self.affinity_wait)
                self.sessions.pop(work.session_id, None)
                return encode_frame(error_frame("unknown session", session=work.session_id))
            self.reroutes += 1
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.1)

    def release(self, work) -> None:
        """Nothing is reserved at the ingress."""

    def close_session(self, session_id: bytes) -> bool:
        """The client's connection ended: the replica holding the session drops it (fire and forget)."""
        if self.sessions.pop(session_id, None) is None:
            return False
        try:
            self.handle.options(multiplexed_model_id=session_id.hex()).drop.remote(session_id)
        except Exception as error:  # the replica's idle eviction frees it later
            log.warning("could not drop a session: %s", error)
        return True

    def evict_idle(self, idle_seconds: float) -> list[bytes]:
        return []  # each replica evicts its own idle sessions


class RayIngress(SplitServer):
    """`SplitServer` (TLS, token check at the upgrade, connection limits, one session per connection) whose frames
    go to the Ray Serve replicas instead of a local compute thread; each connection awaits its own frame."""

    async def _compute(self, work: RelayWork) -> bytes:
        return await self.service.forward(work)


# -- starting it ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RayOptions:
    replicas: int = 2
    object_store_mb: int = 128  # Ray's shared-memory object store (frames are small; 75 MiB is Ray's minimum)
    affinity_wait: float = 5.0  # seconds the ingress retries a frame that reached a replica without its session
    temp_dir: str | None = None  # Ray's session folder (logs, sockets); default: a fresh one under /tmp


def start_ray(options: RayOptions, *, cpus: int) -> str:
    """Starts a local Ray instance with every port on loopback: no dashboard, no usage reporting, a small object
    store. Returns its folder."""
    import tempfile

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    keep_ray_on_loopback()
    temp_dir = options.temp_dir or tempfile.mkdtemp(prefix="svray-", dir="/tmp")  # short: Ray puts sockets in it
    ray.init(address="local", num_cpus=cpus, object_store_memory=options.object_store_mb * 2**20,
             include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=False, namespace="splitveil",
             _temp_dir=temp_dir, configure_logging=False)
    return temp_dir


def deploy_trunk(settings: ReplicaSettings, options: RayOptions):
    """Runs the trunk deployment with `options.replicas` replicas; returns its handle once every replica is ready."""
    from ray.serve.config import ProxyLocation

    settings = settings.for_replicas(options.replicas)

    serve.start(proxy_location=ProxyLocation.Disabled)
    deployment = TrunkReplica.options(
        num_replicas=options.replicas, max_ongoing_requests=settings.max_sessions + 16,
        ray_actor_options={"num_cpus": 1}, graceful_shutdown_timeout_s=1, health_check_period_s=2,
        health_check_timeout_s=30)
    return serve.run(deployment.bind(asdict(settings)), name=APP_NAME, route_prefix=None)


def replica_stats(handle, samples: int = 8) -> list[dict]:
    """What the replicas report (pid, sessions, KV bytes, batch sizes); sampled through the router, so not every
    replica need answer."""
    seen: dict[int, dict] = {}
    for _ in range(samples):
        stats = handle.stats.remote().result(timeout_s=30)
        seen[stats["pid"]] = stats
    return list(seen.values())


def serve_on_ray(settings: ReplicaSettings, options: RayOptions, *, token: str, ssl_context, host: str, port: int,
                 limits, announce, fingerprint: str | None = None, cert_path=None, token_path=None,
                 report=None) -> None:
    """`splitveil serve --ray`: starts Ray, deploys the trunk, serves the ingress until SIGINT/SIGTERM, then stops
    Ray (every replica with it). `announce(line)` prints a status line; the last says where it listens."""
    import shutil

    import ray

    from splitveil.serve.server import serve_until_stopped

    settings = settings.for_replicas(options.replicas)
    started = time.perf_counter()
    temp_dir = start_ray(options, cpus=options.replicas)
    try:
        ray_seconds = time.perf_counter() - started
        handle = deploy_trunk(settings, options)
        deploy_seconds = time.perf_counter() - started - ray_seconds
        service = RelayService(handle, max_frame_bytes=settings.max_frame_bytes, affinity_wait=options.affinity_wait)
        server = RayIngress(service, token=token, ssl_context=ssl_context, host=host, port=port, limits=limits)

        def ready(srv: RayIngress) -> None:
            kv = f"{settings.max_kv_mb:.4g} MiB" if settings.max_kv_mb else "default"
            announce(f"splitveil serve: {settings.model} trunk on Ray Serve, {options.replicas} replica(s) (Ray started "
                     f"in {ray_seconds:.1f} s, replicas ready in {deploy_seconds:.1f} s; Ray folder {temp_dir})")
            if fingerprint:
                announce(f"splitveil serve: TLS certificate {cert_path} sha256 {fingerprint}")
            else:
                announce("splitveil serve: WARNING plaintext (--insecure): anyone on this host can read the traffic")
            announce(f"splitveil serve: token file {token_path}")
            announce(f"splitveil serve: limits per replica {settings.max_sessions} sessions, "
                     f"{settings.max_tokens or 'the model context'} positions per session, KV cache {kv}; "
                     f"{limits.max_connections} connections at the ingress")
            announce(f"splitveil serve: listening on {srv.url}")
            if report is not None:  # the one JSON ready line of `--ready-fd`
                report({"ready": True, "url": srv.url, "port": srv.port, "fingerprint": fingerprint})

        serve_until_stopped(server, ready, host=host, port=port)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
