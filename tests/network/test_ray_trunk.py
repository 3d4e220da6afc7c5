"""The trunk on Ray Serve (2 replicas of a tiny Llama's trunk) behind the TLS ingress, in this process: concurrent
sessions stay exact, a replica's death is survived by replay with identical tokens, the limits hold per replica, and
every port of Ray's processes is on loopback.

Starting Ray and two replicas takes about 25-40 s on a 2-core machine; the module does it once."""

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from splitveil.edge.generate import SplitCausalLM
from splitveil.models.tiny import tiny_causal_lm
from splitveil.plan.plan import SplitPlan
from splitveil.transport.network import WebSocketTransport
from splitveil.transport.tls import server_context

pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.network]
CUTS = (1, 3)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state held by one of `pids` (from /proc/net/tcp{,6})."""
    import ipaddress

    listening = {}  # socket inode -> (address, port)
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
                listening[fields[9]] = (str(ipaddress.ip_address(raw)), int(port, 16))
    found = []
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # gone meanwhile
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in listening:
                found.append((pid, *listening[target[8:-1]]))
    return found


def on_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def ray_processes(folder: str) -> list[int]:
    """Processes still running from the Ray instance whose folder is `folder` (its command lines name it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if folder.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_causal_lm("llama")
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def trunk(tiny, tls_files):
    """Ray with the trunk deployment (2 replicas, 3 sessions each) and the TLS ingress in a thread."""
    import ray

    from splitveil.serve.ray_serve import RayIngress, RayOptions, RelayService, ReplicaSettings, deploy_trunk, start_ray

    options = RayOptions(replicas=2)
    started = time.perf_counter()
    folder = start_ray(options, cpus=2)
    server = None
    try:
        settings = ReplicaSettings(model=str(tiny[0]), cuts=CUTS, max_sessions=3, max_kv_mb=64, idle_timeout=60)
        handle = deploy_trunk(settings, options)
        print(f"Ray and 2 replicas ready in {time.perf_counter() - started:.1f} s")
        service = RelayService(handle, max_frame_bytes=settings.max_frame_bytes)
        server = RayIngress(service, token=tls_files["token"],
                            ssl_context=server_context(tls_files["cert"], tls_files["key"])).start_in_thread()
        yield server, handle
    finally:
        if server is not None:
            server.stop()
        ray.shutdown()
        deadline = time.monotonic() + 30
        while ray_processes(folder) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = ray_processes(folder)
        shutil.rmtree(folder, ignore_errors=True)
        assert not left, f"Ray processes left running: {left}"


def connect(server, tiny, tls_files, recover_seconds=120.0) -> SplitCausalLM:
    transport = WebSocketTransport(server.url, token=tls_files["token"], ca_file=tls_files["cert"], timeout=60)
    lm = SplitCausalLM(tiny[1], SplitPlan.lambda_split(*CUTS), transport=transport)
    lm.stages[1].recover_seconds = recover_seconds
    return lm


def prompt(seed: int) -> torch.Tensor:
    return torch.randint(3, 101, (1, 8), generator=torch.Generator().manual_seed(seed))


def expected_tokens(model, seed: int, tokens: int) -> list[int]:
    return SplitCausalLM(model).generate(prompt(seed), max_new_tokens=tokens, eos_token_ids=()).token_ids


def replica_of(handle, session: bytes) -> dict:
    """The stats of the replica holding `session` (routed there by its multiplexed id)."""
    return handle.options(multiplexed_model_id=session.hex()).stats.remote(session).result(timeout_s=30)


def run_clients(clients, tokens: int, on_request=None) -> dict[int, list[int]]:
    got, errors = {}, []
    barrier = threading.Barrier(len(clients))

    def generate(index: int) -> None:
        try:
            barrier.wait(60)
            got[index] = clients[index].generate(prompt(index), max_new_tokens=tokens, eos_token_ids=()).token_ids
        except Exception as error:  # reported below
            errors.append(f"client {index}: {type(error).__name__}: {error}")

    if on_request is not None:
        request = clients[0].transport.request
        calls = {"n": 0}

        def counted(frame):
            calls["n"] += 1
            on_request(calls["n"])
            return request(frame)

        clients[0].transport.request = counted
    threads = [threading.Thread(target=generate, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    return got


def test_every_ray_port_listens_on_loopback_only(trunk, tiny, tls_files):
    """Ray's servers (GCS, raylet, object manager, workers, the dashboard agent's HTTP, gRPC and metrics ports, the
    runtime-env agent, the dashboard's and autoscaler's Prometheus ports) listen on loopback only: several of them
    answer without Ray's token. They used to listen on every interface or the machine's address."""
    server, _ = trunk
    lm = connect(server, tiny, tls_files)
    try:
        lm.generate(prompt(0), max_new_tokens=2, eos_token_ids=())  # the replicas and their workers are up
    finally:
        lm.close()
    sockets = listening_sockets([os.getpid(), *descendants(os.getpid())])
    assert len({pid for pid, _, _ in sockets}) >= 6, sockets  # GCS, raylet, agents, workers: Ray's processes were seen
    assert [s for s in sockets if not on_loopback(s[1])] == []


def test_concurrent_sessions_on_two_replicas_are_exact(trunk, tiny, tls_files):
    server, handle = trunk
    clients = [connect(server, tiny, tls_files) for _ in range(5)]
    try:
        got = run_clients(clients, tokens=40)
        assert got == {i: expected_tokens(tiny[1], i, 40) for i in range(5)}
        batched = {}
        for _ in range(30):  # sample the replicas through the router until both answered
            stats = handle.stats.remote().result(timeout_s=30)
            batched[stats["pid"]] = stats["batch_sizes"]
            if len(batched) == 2:
                break
        assert len(batched) == 2 and all(sum(b.values()) > 0 for b in batched.values()), batched  # both replicas computed
    finally:
        for lm in clients:
            lm.close()


def test_a_killed_replica_is_survived_by_replay_with_identical_tokens(trunk, tiny, tls_files):
    server, handle = trunk
    clients = [connect(server, tiny, tls_files) for _ in range(4)]
    killed = {}

    def kill_when(n: int) -> None:
        if n == 12 and not killed:  # client 0 is mid-generation (and so are the others): kill its replica
            stats = replica_of(handle, clients[0].stages[1].session)
            assert stats["holds"], "the router sent the session's frames elsewhere"
            killed.update(stats)
            os.kill(stats["pid"], signal.SIGKILL)

    try:
        got = run_clients(clients, tokens=60, on_request=kill_when)
        assert killed, "the replica was never killed"
        assert got == {i: expected_tokens(tiny[1], i, 60) for i in range(4)}
        assert clients[0].stages[1].recoveries >= 1
        # Ray Serve replaces the replica; sessions then open on it again
        deadline, pids = time.monotonic() + 120, set()
        while time.monotonic() < deadline and len(pids - {killed["pid"]}) < 2:
            pids.add(handle.stats.remote().result(timeout_s=60)["pid"])
        assert len(pids - {killed["pid"]}) == 2
    finally:
        for lm in clients:
            lm.close()


def test_limits_hold_per_replica(trunk, tiny, tls_files):
    """3 sessions per replica, 2 replicas: 6 sessions open (opened one by one, so the router sees each placement),
    the 7th is refused by the replica it reaches, and closing one makes room again."""
    from splitveil.core.errors import TransportError

    server, _ = trunk
    clients = [connect(server, tiny, tls_files, recover_seconds=0) for _ in range(7)]
    try:
        for lm in clients[:6]:
            lm._begin()
            lm.step(prompt(0))
            time.sleep(0.5)
        with pytest.raises(TransportError, match="full"):
            clients[6]._begin()
        clients[0].close()
        time.sleep(1.0)
        fresh = connect(server, tiny, tls_files)
        try:
            assert fresh.generate(prompt(3), max_new_tokens=10, eos_token_ids=()).token_ids == expected_tokens(tiny[1], 3, 10)
        finally:
            fresh.close()
    finally:
        for lm in clients:
            lm.close()


def test_replica_settings_divide_the_default_kv_budget_among_the_replicas_as_documented():
    from splitveil.serve.build import default_max_kv_mb
    from splitveil.serve.ray_serve import ReplicaSettings

    settings = ReplicaSettings(model="m", cuts=(1, 3))
    assert settings.for_replicas(4).max_kv_mb == pytest.approx(default_max_kv_mb() / 4)
    given = ReplicaSettings(model="m", cuts=(1, 3), max_kv_mb=64)
    assert given.for_replicas(4) is given  # a budget given is each replica's own
