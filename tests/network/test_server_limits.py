"""What bounds a server under load and abuse: connections, per-connection buffering, fairness between prefill and
decode, background tasks that survive their own failures, and a server-wide KV budget measured in RSS."""

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from splitveil.models.splittable import Part
from splitveil.serve.server import ServerLimits
from splitveil.serve.service import PartService
from splitveil.wire.frame import Frame, FrameKind, decode_frame, encode_frame

from .conftest import free_port, start_serve_process

pytestmark = pytest.mark.network

HIDDEN = 32


class _StandInPart(Part):
    """A part that returns its input, optionally after a delay per call, and reports every call to `on_call`."""

    start, end = 2, 4

    def __init__(self, on_call=None, *, chunk_seconds: float = 0.0, gate: threading.Event | None = None):
        self.on_call, self.chunk_seconds, self.gate = on_call, chunk_seconds, gate

    def forward(self, x):
        if self.on_call is not None:
            self.on_call(tuple(x.shape))
        if self.gate is not None:
            self.gate.wait(30)
        if x.shape[1] > 1:
            time.sleep(self.chunk_seconds)
        return x.clone()

    def clone(self):
        return _StandInPart(self.on_call, chunk_seconds=self.chunk_seconds, gate=self.gate)


class _Client:
    """A plaintext frame-by-frame client with its own session."""

    def __init__(self, server, token: str, *, open_session: bool = True):
        self.ws = connect(server.url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=None, open_timeout=20, legacy=True)
        self.seq = 0
        if open_session:
            reply = self.request(encode_frame(Frame(FrameKind.OPEN)))
            assert reply.kind == FrameKind.OK, reply.message
            self.session = reply.session

    def request(self, data: bytes, timeout: float = 20) -> Frame:
        self.ws.send(data)
        return decode_frame(self.ws.recv(timeout=timeout), max_bytes=2**30)

    def forward(self, positions: int, *, hidden: int = HIDDEN, rows: int = 1, timeout: float = 20) -> Frame:
        frame = Frame(FrameKind.FORWARD, torch.ones(rows, positions, hidden), session=self.session, seq=self.seq, part=1)
        self.seq += 1
        return self.request(encode_frame(frame), timeout)

    def close(self):
        self.ws.close()


# ------------------------------------------------------------------------------------------------- connections


def test_connections_beyond_the_limit_get_http_503(serve_service, tls_files, caplog):
    caplog.set_level("INFO")
    server = serve_service(PartService({1: _StandInPart()}, hidden_size=HIDDEN), limits=ServerLimits(max_connections=2), tls=False)
    first, second = _Client(server, tls_files["token"]), _Client(server, tls_files["token"], open_session=False)
    with pytest.raises(InvalidStatus) as refused:
        _Client(server, tls_files["token"], open_session=False)
    assert refused.value.response.status_code == 503
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert any(r.getMessage() == "refused a connection: 2 connections open (the limit)" for r in caplog.records)
    # the open ones keep working, and a closed one frees its place
    assert first.forward(3).kind == FrameKind.RESULT
    second.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            third = _Client(server, tls_files["token"])
            break
        except InvalidStatus:
            assert time.monotonic() < deadline, "a closed connection never freed its place"
            time.sleep(0.05)
    assert third.forward(2).kind == FrameKind.RESULT


def test_a_wrong_token_is_refused_before_the_connection_limit_counts_it(serve_service, tls_files):
    server = serve_service(PartService({1: _StandInPart()}, hidden_size=HIDDEN), limits=ServerLimits(max_connections=1), tls=False)
    for _ in range(3):
        with pytest.raises(InvalidStatus) as refused:
            _Client(server, "x" * 40)
        assert refused.value.response.status_code == 401
    assert _Client(server, tls_files["token"]).forward(1).kind == FrameKind.RESULT


def test_a_connection_buffers_a_bounded_number_of_messages(serve_service, tls_files):
    """A client that pipelines frames while its first one computes: the server stops reading its socket after
    `connection_queue` messages instead of buffering up to websockets' default 16 x 2 x max_frame_bytes."""
    gate = threading.Event()
    server = serve_service(PartService({1: _StandInPart(gate=gate)}, hidden_size=HIDDEN, max_tokens=10**6), tls=False)
    client = _Client(server, tls_files["token"])
    positions = 2048  # 256 KiB frames: more than one socket read, so buffering is counted in whole frames
    frames = [encode_frame(Frame(FrameKind.FORWARD, torch.ones(1, positions, HIDDEN), session=client.session, seq=seq, part=1))
              for seq in range(30)]
    sender = threading.Thread(target=lambda: [client.ws.send(frame) for frame in frames])  # blocks once the kernel's buffers are full
    sender.start()
    (connection,) = [c for c in server._open_connections if c.state.name == "OPEN"]
    deadline = time.monotonic() + 10
    while not connection.recv_messages.paused and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # let it read whatever it would still read
    buffered = len(connection.recv_messages.frames)
    gate.set()
    # a paused reader holds its high-water mark plus what the last socket read completed (default: 16 + 1)
    assert connection.recv_messages.paused and buffered <= ServerLimits().connection_queue + 2, buffered
    # nothing is lost: every pipelined frame is answered, in order
    replies = [decode_frame(client.ws.recv(timeout=30)) for _ in frames]
    sender.join(30)
    assert [(r.kind, r.seq) for r in replies] == [(FrameKind.RESULT, seq) for seq in range(30)]


# ---------------------------------------------------------------------------------------------------- fairness


def test_a_decode_step_waits_behind_at_most_one_prefill_chunk(serve_service, tls_files):
    """8 clients prefill in 8-position chunks while a victim decodes: between a victim step's admission and its
    computation at most one chunk starts (before: every prefilling client's waiting chunk ran first)."""
    events = []  # appended from the event loop (admissions) and the compute thread (starts), in real-time order
    service = PartService({1: _StandInPart(lambda shape: events.append(("start", shape[1])), chunk_seconds=0.02)}, hidden_size=HIDDEN)
    admit = service.admit

    def recording_admit(data, **kwargs):
        work, reply = admit(data, **kwargs)
        if work is not None and work.frame.tensor.shape[1] == 1:
            events.append(("admit-step", 1))
        return work, reply

    service.admit = recording_admit
    server = serve_service(service, tls=False)
    victim = _Client(server, tls_files["token"])
    assert victim.forward(4).kind == FrameKind.RESULT  # its prompt, before the others arrive
    prefillers = [_Client(server, tls_files["token"]) for _ in range(8)]
    done, errors = threading.Event(), []

    def prefill(client):
        try:
            while not done.is_set():
                assert client.forward(8).kind == FrameKind.RESULT
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=prefill, args=(client,)) for client in prefillers]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # every prefiller has a chunk waiting
    for _ in range(15):
        assert victim.forward(1).kind == FrameKind.RESULT
    done.set()
    for thread in threads:
        thread.join(30)
    assert not errors

    waits, waiting = [], None
    for kind, positions in events:
        if kind == "admit-step":
            waiting = 0
        elif waiting is not None and positions > 1:
            waiting += 1
        elif waiting is not None and positions == 1:
            waits.append(waiting)
            waiting = None
    assert len(waits) == 15
    assert max(waits) <= 1, waits
    chunks_during = sum(1 for kind, positions in events if kind == "start" and positions > 1)
    assert chunks_during >= 15  # the prefills really competed with the victim


# ------------------------------------------------------------------------------------------ background tasks


def test_the_scheduler_survives_an_exception_in_a_round(serve_service, tls_files, caplog):
    caplog.set_level("INFO")
    service = PartService({1: _StandInPart()}, hidden_size=HIDDEN)
    server = serve_service(service, tls=False)
    run, calls = service.run, {"n": 0}

    def failing_once(works):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return run(works)

    service.run = failing_once
    hit = _Client(server, tls_files["token"])
    reply = hit.forward(2, timeout=10)  # before: no answer at all, and no frame was ever computed again
    assert reply.kind == FrameKind.ERROR and reply.message == "internal server error"
    for _ in range(3):
        other = _Client(server, tls_files["token"])
        assert other.forward(2, timeout=10).kind == FrameKind.RESULT
    failures = [r for r in caplog.records if "scheduler round failed" in r.getMessage()]
    assert [r.getMessage() for r in failures] == ["scheduler round failed: RuntimeError: injected fault"]
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def test_the_evictor_survives_an_exception_in_a_round(serve_service, tls_files, caplog):
    caplog.set_level("INFO")
    service = PartService({1: _StandInPart()}, hidden_size=HIDDEN)
    evict, calls = service.evict_idle, {"n": 0}

    def failing_once(idle_seconds):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return evict(idle_seconds)

    service.evict_idle = failing_once
    server = serve_service(service, limits=ServerLimits(idle_timeout=0.3), tls=False)
    client = _Client(server, tls_files["token"])
    deadline = time.monotonic() + 10
    while client.session in service.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.session not in service.sessions  # before: the evictor had ended, nothing was evicted again
    notice = decode_frame(client.ws.recv(timeout=5))
    assert notice.kind == FrameKind.ERROR and "evicted" in notice.message
    assert calls["n"] >= 2
    assert [r.getMessage() for r in caplog.records if "eviction round failed" in r.getMessage()] == [
        "eviction round failed: RuntimeError: injected fault"]
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def test_a_session_waiting_for_compute_is_not_evicted(serve_service, tls_files):
    gate = threading.Event()
    service = PartService({1: _StandInPart(gate=gate)}, hidden_size=HIDDEN)
    server = serve_service(service, limits=ServerLimits(idle_timeout=0.2), tls=False)
    client = _Client(server, tls_files["token"])
    client.ws.send(encode_frame(Frame(FrameKind.FORWARD, torch.ones(1, 2, HIDDEN), session=client.session, seq=0, part=1)))
    time.sleep(1.0)  # five idle timeouts, all of them spent waiting for the compute thread
    assert client.session in service.sessions
    gate.set()
    assert decode_frame(client.ws.recv(timeout=10)).kind == FrameKind.RESULT


# --------------------------------------------------------------------------------------------- KV budget, RSS

_MEMORY_SERVER = textwrap.dedent('''
    import sys, torch
    from splitveil.models.splittable import Part
    from splitveil.serve.server import ServerLimits, SplitServer
    from splitveil.serve.service import PartService

    class KeepingPart(Part):
        """Keeps every input, like a KV cache of the same size; state_bytes() is exactly what it keeps."""
        start, end = 2, 4
        def __init__(self):
            self.kept = []
        def forward(self, x):
            self.kept.append(x.clone())
            return x[:, -1:].clone()
        def state_bytes(self):
            return sum(t.numel() * t.element_size() for t in self.kept)
        def clone(self):
            return KeepingPart()

    port, token, budget = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    service = PartService({1: KeepingPart()}, hidden_size=1024, max_frame_bytes=2 * 2**20, max_tokens=10**6,
                          max_kv_bytes=None if budget == "none" else int(budget) * 2**20)
    SplitServer(service, token=token, port=port, limits=ServerLimits(idle_timeout=600)).start_in_thread()
    print("ready", flush=True)
    sys.stdin.read()
''')


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _fill_until_refused(port: int, token: str, pid: int) -> dict:
    """16 sessions prefill 1 MiB chunks in turn (16 MiB each, 256 MiB in all) until each is refused or done."""

    class Server:
        url = f"ws://127.0.0.1:{port}"

    clients = [_Client(Server, token) for _ in range(16)]
    warm = clients[0].forward(256, hidden=1024)
    assert warm.kind == FrameKind.RESULT
    baseline = _rss_mib(pid) - 1  # the first chunk is held state, not baseline
    held = {0: 1}
    peak, refusals, live_peak = baseline, [], 1
    for _ in range(16):
        for index, client in enumerate(clients):
            if client is None:
                continue
            reply = client.forward(256, hidden=1024)  # 256 positions x 1024 x fp32 = 1 MiB kept per chunk
            if reply.kind == FrameKind.ERROR:
                refusals.append(reply.message)
                held.pop(index, None)
                clients[index] = None  # the server closed the connection, and dropped its session
            else:
                held[index] = held.get(index, 0) + 1
            live_peak = max(live_peak, sum(held.values()))
            peak = max(peak, _rss_mib(pid))
    return {"baseline": baseline, "peak": peak, "refusals": refusals, "live_peak_mib": live_peak}


@pytest.mark.parametrize("budget_mib", [32])
def test_kv_budget_bounds_the_server_rss(tls_files, budget_mib):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _MEMORY_SERVER, str(port), tls_files["token"], str(budget_mib)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        result = _fill_until_refused(port, tls_files["token"], proc.pid)
    finally:
        proc.kill()
        proc.wait(10)
    assert result["refusals"] and all("KV memory is full (32 MiB)" in m for m in result["refusals"]), result["refusals"][:3]
    assert result["live_peak_mib"] <= budget_mib  # what the clients were allowed to keep on the server at once
    # RSS: the budget, plus frames in flight and allocator slack, over the baseline (without the budget: +256 MiB)
    assert result["peak"] - result["baseline"] <= budget_mib + 48, result


# ----------------------------------------------------------------------------------------------- the CLI


def test_serve_cli_limits(tmp_path, tls_files):
    from splitveil.models.causal_lm import CausalLMPart
    from splitveil.models.tiny import tiny_causal_lm

    model_dir = tmp_path / "tiny-llama"
    tiny_causal_lm("llama").save_pretrained(model_dir)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = start_serve_process(["--model", str(model_dir), "--split", "1,3", "--insecure", "--token-file", str(tls_files["token_file"]),
                                "--max-connections", "2", "--max-kv-mb", "0.05", "--max-sessions", "8"], port, env)
    try:

        class Server:
            url = f"ws://127.0.0.1:{port}"

        a, b = _Client(Server, tls_files["token"]), _Client(Server, tls_files["token"])
        with pytest.raises(InvalidStatus) as refused:
            _Client(Server, tls_files["token"], open_session=False)
        assert refused.value.response.status_code == 503
        if CausalLMPart.state_bytes is Part.state_bytes:
            pytest.skip("CausalLMPart does not report state_bytes() yet")
        # 0.05 MiB of KV: the tiny trunk (2 layers, 2 KV heads of 8 values, fp32) keeps 256 bytes per position
        replies = []
        while len(replies) < 4 and (not replies or replies[-1].kind == FrameKind.RESULT):
            replies.append(a.forward(64))
        assert replies[0].kind == FrameKind.RESULT
        assert any(r.kind == FrameKind.ERROR and "KV memory is full" in r.message for r in replies), [r.message for r in replies]
        full = b.forward(64)
        assert full.kind == FrameKind.RESULT or "KV memory is full" in full.message
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert "limits 8 sessions, 2 connections," in out and "0.05 MiB of KV cache" in out, out
    assert "Traceback" not in out
