"""The TLS service on 127.0.0.1: exactness, authentication, hostile frames, limits, batching, eviction."""

import gc
import json
import socket
import ssl
import struct
import threading
import time
import weakref

import pytest
import torch
from websockets.sync.client import connect

from splitveil.core.errors import TransportError
from splitveil.edge.generate import SplitCausalLM
from splitveil.plan.plan import SplitPlan
from splitveil.serve.server import ServerLimits
from splitveil.transport.network import ConnectionLost, WebSocketTransport
from splitveil.wire.frame import Frame, FrameKind, decode_frame, encode_frame

from .conftest import CUTS, prompt

pytestmark = pytest.mark.network


def unsplit_tokens(model, ids, n=24):
    return SplitCausalLM(model).generate(ids, max_new_tokens=n, eos_token_ids=()).token_ids


def test_tls_split_equals_unsplit(make_server, client, tiny_model):
    server = make_server()
    assert server.url.startswith("wss://127.0.0.1:")
    lm = client(server)
    for seed in range(3):
        result = lm.generate(prompt(seed), max_new_tokens=24, eos_token_ids=())
        assert result.token_ids == unsplit_tokens(tiny_model, prompt(seed))
        assert result.bytes_per_decode_step == (32 * 4 + 40, 32 * 4 + 40)
    assert not server.service.sessions  # every generation closed its session


def test_wrong_token_is_refused(make_server, tls_files):
    server = make_server()
    transport = WebSocketTransport(server.url, token="x" * 40, ca_file=tls_files["cert"])
    with pytest.raises(TransportError, match="401"):
        transport.request(encode_frame(Frame(FrameKind.OPEN)))
    assert not server.service.sessions


def test_missing_token_is_refused(make_server, tls_files):
    server = make_server()
    context = ssl.create_default_context(cafile=str(tls_files["cert"]))
    with pytest.raises(Exception, match="401"):
        connect(server.url, ssl=context, legacy=True)


def test_plaintext_client_is_refused(make_server, tls_files):
    server = make_server()
    transport = WebSocketTransport(server.url.replace("wss://", "ws://"), token=tls_files["token"], timeout=5)
    with pytest.raises(TransportError):
        transport.request(encode_frame(Frame(FrameKind.OPEN)))
    assert not server.service.sessions


def test_untrusted_certificate_is_refused(make_server, tls_files, tmp_path):
    from splitveil.transport.tls import generate_self_signed

    server = make_server()
    other_cert = tmp_path / "other.pem"
    generate_self_signed(other_cert, tmp_path / "other.key")
    transport = WebSocketTransport(server.url, token=tls_files["token"], ca_file=other_cert, timeout=5)
    with pytest.raises(TransportError, match="TLS"):
        transport.request(encode_frame(Frame(FrameKind.OPEN)))


def test_fingerprint_pin(make_server, tls_files):
    from splitveil.transport.tls import fingerprint_pem

    server = make_server()
    good = WebSocketTransport(server.url, token=tls_files["token"], pin_sha256=fingerprint_pem(tls_files["cert"]))
    assert decode_frame(good.request(encode_frame(Frame(FrameKind.OPEN)))).kind == FrameKind.OK
    good.close()
    bad = WebSocketTransport(server.url, token=tls_files["token"], pin_sha256="ab" * 32)
    with pytest.raises(TransportError, match="pinned fingerprint"):
        bad.request(encode_frame(Frame(FrameKind.OPEN)))


class RawClient:
    """A client that speaks frames by hand (to send hostile ones)."""

    def __init__(self, server, tls_files):
        context = ssl.create_default_context(cafile=str(tls_files["cert"]))
        self.ws = connect(server.url, ssl=context, additional_headers={"Authorization": f"Bearer {tls_files['token']}"},
                          max_size=None, legacy=True)
        reply = self.send(encode_frame(Frame(FrameKind.OPEN)))
        assert reply.kind == FrameKind.OK
        self.session = reply.session
        self.info = json.loads(reply.message)

    def send(self, data: bytes) -> Frame:
        self.ws.send(data)
        return decode_frame(self.ws.recv(timeout=10), finite=False)

    def closed(self) -> bool:
        try:
            self.ws.recv(timeout=10)
        except Exception as error:  # ConnectionClosed
            return "ConnectionClosed" in type(error).__name__
        return False


def _raw_frame(session: bytes, codec: int, shape: tuple, payload: bytes = b"") -> bytes:
    header = struct.pack("<2sBBBBBB16sI", b"SV", 1, int(FrameKind.FORWARD), codec, len(shape), 1, 0, session, 0)
    return header + struct.pack(f"<{len(shape)}I", *shape) + payload


def _hostile_frames(session: bytes, other_session: bytes, max_frame: int) -> dict[str, bytes]:
    good = encode_frame(Frame(FrameKind.FORWARD, torch.randn(1, 2, 32), session=session, seq=0, part=1))
    nan = torch.randn(1, 1, 32)
    nan[0, 0, 3] = float("nan")
    return {
        "zero-size shape with huge dims": _raw_frame(session, 1, (0, 2**32 - 1, 2**32 - 1)),
        "zero-size fp16 shape": _raw_frame(session, 2, (2**31, 0, 32)),
        "zero batch": _raw_frame(session, 1, (0, 1, 32)),
        "shape product overflowing 64 bits": _raw_frame(session, 1, (2**32 - 1,) * 4, b"\0" * 16),
        "garbage": b"hello, server",
        "bad header": b"XX" + good[2:],
        "bad version": good[:2] + bytes([9]) + good[3:],
        "wrong dtype": encode_frame(Frame(FrameKind.FORWARD, torch.ones(1, 2, 32, dtype=torch.int64), codec="int64", session=session, part=1)),
        "wrong shape": encode_frame(Frame(FrameKind.FORWARD, torch.randn(1, 2, 31), session=session, part=1)),
        "shape mismatch": good[:-4],
        "nan": encode_frame(Frame(FrameKind.FORWARD, nan, session=session, part=1), ),
        "inf": encode_frame(Frame(FrameKind.FORWARD, torch.full((1, 1, 32), float("inf")), session=session, part=1)),
        "oversized": encode_frame(Frame(FrameKind.FORWARD, torch.randn(1, max_frame // 128 + 1, 32), session=session, part=1)),
        "unknown session": encode_frame(Frame(FrameKind.FORWARD, torch.randn(1, 2, 32), session=bytes(range(16)), part=1)),
        "another client's session": encode_frame(Frame(FrameKind.FORWARD, torch.randn(1, 2, 32), session=other_session, part=1)),
        "wrong part": encode_frame(Frame(FrameKind.FORWARD, torch.randn(1, 2, 32), session=session, part=7)),
    }


@pytest.mark.parametrize("case", ["garbage", "bad header", "bad version", "wrong dtype", "wrong shape", "shape mismatch",
                                  "nan", "inf", "oversized", "unknown session", "another client's session", "wrong part",
                                  "zero-size shape with huge dims", "zero-size fp16 shape", "zero batch",
                                  "shape product overflowing 64 bits"])
def test_hostile_frame_gets_an_error_and_only_its_connection_closes(make_server, client, tls_files, tiny_model, case, caplog):
    caplog.set_level("INFO")
    server = make_server(max_frame_bytes=4096)
    bystander = RawClient(server, tls_files)  # another client, mid-session
    before = bystander.send(encode_frame(Frame(FrameKind.FORWARD, torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(1)),
                                               session=bystander.session, seq=0, part=1)))
    assert before.kind == FrameKind.RESULT
    attacker = RawClient(server, tls_files)
    frames = _hostile_frames(attacker.session, bystander.session, 4096)
    if case == "nan":  # NaN must be refused even when the NaN sits in a valid frame
        assert torch.isnan(decode_frame(frames[case], finite=False).tensor).any()
    reply = attacker.send(frames[case])
    assert reply.kind == FrameKind.ERROR and reply.message and "\n" not in reply.message
    assert attacker.closed()
    # the server logged one line for the refusal, and no traceback anywhere
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert len([r for r in caplog.records if r.getMessage().startswith("refused a frame")]) == 1
    assert attacker.session not in server.service.sessions  # its session is gone with its connection
    # the bystander's session is untouched and the server still serves new clients exactly
    after = bystander.send(encode_frame(Frame(FrameKind.FORWARD, torch.randn(1, 1, 32), session=bystander.session, seq=1, part=1)))
    assert after.kind == FrameKind.RESULT and after.tensor.shape == (1, 1, 32)
    lm = client(server)
    assert lm.generate(prompt(5), max_new_tokens=12, eos_token_ids=()).token_ids == unsplit_tokens(tiny_model, prompt(5), 12)


def test_max_sessions(make_server, tls_files):
    server = make_server(max_sessions=2)
    a, b = RawClient(server, tls_files), RawClient(server, tls_files)
    ws = RawClient.__new__(RawClient)
    ws.ws = connect(server.url, ssl=ssl.create_default_context(cafile=str(tls_files["cert"])),
                    additional_headers={"Authorization": f"Bearer {tls_files['token']}"}, legacy=True)
    reply = ws.send(encode_frame(Frame(FrameKind.OPEN)))
    assert reply.kind == FrameKind.ERROR and "full" in reply.message
    assert len(server.service.sessions) == 2 and a.session != b.session


def test_tokens_per_session_limit(make_server, client):
    server = make_server(max_tokens=10)
    lm = client(server)
    with pytest.raises(TransportError, match="limit of 10 positions"):
        lm.generate(prompt(1, length=6), max_new_tokens=12, eos_token_ids=())


def test_long_prompt_prefill_is_chunked_under_the_frame_limit(make_server, client, tiny_model):
    server = make_server(max_frame_bytes=1024)  # (1024 - 40 header bytes) // 128 = 7 positions per frame
    lm = client(server)
    sizes = []
    request = lm.transport.request
    lm.transport.request = lambda frame: sizes.append(len(frame)) or request(frame)
    long_prompt = prompt(9, length=100)
    result = lm.generate(long_prompt, max_new_tokens=16, eos_token_ids=())
    assert result.round_trips == 2 + 15 + 15  # open, ceil(100 / 7) prefill chunks, 15 decode steps, close
    assert max(sizes) <= 1024
    assert result.token_ids == unsplit_tokens(tiny_model, long_prompt, 16)


def test_idle_sessions_are_evicted_and_their_memory_freed(make_server, tls_files):
    server = make_server(limits=ServerLimits(idle_timeout=0.3))
    raw = RawClient(server, tls_files)
    raw.send(encode_frame(Frame(FrameKind.FORWARD, torch.randn(1, 4, 32), session=raw.session, seq=0, part=1)))
    cache = weakref.ref(server.service.sessions[raw.session].parts[1].cache)
    deadline = time.monotonic() + 5
    while raw.session in server.service.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert raw.session not in server.service.sessions
    notice = decode_frame(raw.ws.recv(timeout=5))
    assert notice.kind == FrameKind.ERROR and "evicted" in notice.message
    gc.collect()
    assert cache() is None  # the KV cache is gone, not just unlisted


def test_evicted_client_replays_and_continues_identically(make_server, client, tiny_model):
    server = make_server(limits=ServerLimits(idle_timeout=0.3))
    lm = client(server, recover_seconds=10)
    remote = lm.stages[1]
    original_forward = remote._forward
    calls = {"n": 0}

    def slow_forward(hidden):
        calls["n"] += 1
        if calls["n"] == 8:
            time.sleep(1.0)  # the session goes idle long enough to be evicted
        return original_forward(hidden)

    remote._forward = slow_forward
    result = lm.generate(prompt(3), max_new_tokens=20, eos_token_ids=())
    assert remote.recoveries == 1
    assert result.token_ids == unsplit_tokens(tiny_model, prompt(3), 20)


def generate_concurrently(server, client, tiny_model, sessions: int, tokens: int) -> None:
    """`sessions` clients generate at once through `server`; each gets the unsplit model's tokens."""
    results, errors = {}, []

    def run(seed):
        try:
            results[seed] = client(server).generate(prompt(seed), max_new_tokens=tokens, eos_token_ids=()).token_ids
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not errors
    for seed in range(sessions):
        assert results[seed] == unsplit_tokens(tiny_model, prompt(seed), tokens), seed


def test_concurrent_sessions_are_batched_and_stay_exact(make_server, client, tiny_model):
    server = make_server(limits=ServerLimits(batch_window=0.005))
    generate_concurrently(server, client, tiny_model, 4, 30)
    assert max(server.service.batch_sizes) > 1  # steps of different sessions really ran together


def test_eight_sessions_run_in_two_cohorts_and_stay_exact(make_server, client, tiny_model):
    server = make_server(limits=ServerLimits(batch_window=0.005))  # two cohorts: the default
    generate_concurrently(server, client, tiny_model, 8, 20)
    sizes = server.service.batch_sizes
    assert 1 < max(sizes) <= 4, sizes  # batched, and no round took more than its cohort's half of the eight


def test_server_only_binds_loopback(make_server):
    server = make_server()
    bound = [sock.getsockname() for sock in server.sockets]  # the listening sockets themselves
    assert bound and all(address[0] == "127.0.0.1" for address in bound), bound
    assert {address[1] for address in bound} == {server.port}
    # and nothing answers on this host's other addresses at that port
    others = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    for address in others:
        if address.startswith("127."):
            continue
        with pytest.raises(OSError):
            socket.create_connection((address, server.port), timeout=1).close()


@pytest.mark.parametrize("headers, status", [
    (["Bearer {token}", "Bearer x"], 400),
    (["Bearer {token}", "Bearer {token}"], 400),
    (["Basic {token}"], 401),
    (["Bearer"], 401),
    ([], 401),
])
def test_bad_authorization_headers_get_a_4xx_without_a_traceback(make_server, tls_files, headers, status, caplog):
    caplog.set_level("INFO")
    server = make_server(tls=False)
    with socket.create_connection(("127.0.0.1", server.port), 5) as sock:
        lines = [f"Authorization: {h.format(token=tls_files['token'])}" for h in headers]
        sock.sendall(("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                      + "".join(line + "\r\n" for line in lines) + "\r\n").encode())
        answer = sock.recv(4096).decode(errors="replace")
    assert answer.split("\r\n")[0].startswith(f"HTTP/1.1 {status} ")
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert not server.service.sessions


def test_connection_lost_without_recovery_is_reported(make_server, client):
    server = make_server()
    lm = client(server, recover_seconds=0)
    lm._begin()
    server.stop()
    with pytest.raises((ConnectionLost, TransportError)):
        lm.step(prompt(1))


@pytest.mark.parametrize("kind", [FrameKind.FORWARD, FrameKind.CLOSE])
def test_a_connection_without_a_session_cannot_touch_another(make_server, tls_files, kind):
    """Same token, stolen session id: a fresh connection may only OPEN, never use or close another's session."""
    server = make_server()
    victim = RawClient(server, tls_files)
    ws = connect(server.url, ssl=ssl.create_default_context(cafile=str(tls_files["cert"])),
                 additional_headers={"Authorization": f"Bearer {tls_files['token']}"}, legacy=True)
    tensor = torch.randn(1, 1, 32) if kind == FrameKind.FORWARD else None
    ws.send(encode_frame(Frame(kind, tensor, session=victim.session, seq=0, part=1)))
    reply = decode_frame(ws.recv(timeout=10))
    assert reply.kind == FrameKind.ERROR and "open a session" in reply.message
    assert victim.session in server.service.sessions
    assert victim.send(encode_frame(Frame(FrameKind.FORWARD, torch.randn(1, 2, 32), session=victim.session, seq=0, part=1))).kind == FrameKind.RESULT


def test_client_refuses_a_server_running_another_model(make_server, client, tiny_model):
    server = make_server()
    server.service.info["model_config_sha256"] = "0" * 64
    lm = client(server)
    for stage in lm.stages:
        if hasattr(stage, "expect"):
            stage.expect["model_config_sha256"] = "f" * 64
    from splitveil.core.errors import ConfigError

    with pytest.raises(ConfigError, match="model_config_sha256"):
        lm.generate(prompt(0), max_new_tokens=2, eos_token_ids=())
