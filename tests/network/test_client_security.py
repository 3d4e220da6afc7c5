"""The client against hostile or wrong servers, over real sockets and real TLS on 127.0.0.1.

A pinned client sends nothing (no token, no HTTP byte) to a server whose certificate does not match the pin;
`--ca` still checks the host name; ws:// is refused beyond loopback without --insecure; a server that answers with
a wrong or oversized RESULT gets one clear TransportError, never a crash in torch.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time

import pytest
import torch

from splitveil.core.errors import ConfigError, TransportError
from splitveil.edge.generate import SplitCausalLM
from splitveil.plan.plan import SplitPlan
from splitveil.transport.network import WebSocketTransport
from splitveil.transport.tls import fingerprint_pem, generate_self_signed, server_context
from splitveil.wire.frame import Frame, FrameKind, encode_frame, text_frame

from .conftest import CUTS, prompt

pytestmark = pytest.mark.network

HIDDEN = 32  # the tiny llama's hidden size (conftest's tiny_model)


class RecordingTLSListener:
    """A TLS server with its own certificate that records every byte clients send and never answers."""

    def __init__(self, cert, key):
        self.context = server_context(cert, key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.connections = 0
        self.handshakes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            raw.settimeout(3)
            conn = raw
            try:
                conn = self.context.wrap_socket(raw, server_side=True)
                self.handshakes += 1
                while b"\r\n\r\n" not in self.received:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    self.received += chunk
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def wrong_cert_listener(tmp_path):
    cert, key = tmp_path / "other.pem", tmp_path / "other.key"
    generate_self_signed(cert, key)
    listener = RecordingTLSListener(cert, key)
    yield listener
    listener.close()


# --------------------------------------------------------------------------------------------------- pinning


def test_pinned_client_sends_nothing_to_a_server_with_another_certificate(wrong_cert_listener, tls_files):
    token = tls_files["token"]
    transport = WebSocketTransport(wrong_cert_listener.url, token=token, pin_sha256=fingerprint_pem(tls_files["cert"]),
                                   timeout=10)
    with pytest.raises(TransportError) as caught:
        transport.request(encode_frame(Frame(FrameKind.OPEN)))
    time.sleep(0.3)  # let the listener read whatever the client might have sent
    assert token.encode() not in wrong_cert_listener.received
    assert wrong_cert_listener.handshakes == 1  # the TLS handshake happened: the pin was checked after it
    assert "does not match the pinned fingerprint" in str(caught.value) and "\n" not in str(caught.value)
    assert bytes(wrong_cert_listener.received) == b""  # not one HTTP byte


@pytest.mark.model
def test_pinned_cli_exits_2_without_sending_the_token(wrong_cert_listener, tls_files, capsys):
    from splitveil.cli.main import main

    args = ["generate", "--server", wrong_cert_listener.url, "--pin", fingerprint_pem(tls_files["cert"]),
            "--token-file", str(tls_files["token_file"]), "--model", "smollm2-135m", "--split", "2,28",
            "--prompt", "hi", "--max-new-tokens", "1"]
    assert main(args) == 2
    time.sleep(0.3)
    assert tls_files["token"].encode() not in wrong_cert_listener.received
    assert b"Authorization" not in wrong_cert_listener.received
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pinned fingerprint" in err, err


def test_ca_mode_checks_the_host_name(tmp_path):
    """A certificate trusted through --ca but issued for another name is refused before any HTTP byte."""
    cert, key = tmp_path / "named.pem", tmp_path / "named.key"
    generate_self_signed(cert, key, hosts=("example.test",))
    listener = RecordingTLSListener(cert, key)
    try:
        transport = WebSocketTransport(listener.url, token="secret-token-123", ca_file=cert, timeout=10)
        with pytest.raises(TransportError, match="TLS") as caught:
            transport.request(encode_frame(Frame(FrameKind.OPEN)))
        assert "127.0.0.1" in str(caught.value)
        time.sleep(0.3)
        assert bytes(listener.received) == b""
    finally:
        listener.close()


def test_ca_mode_with_the_right_certificate_and_name_works(make_server, client, tiny_model):
    server = make_server()
    lm = client(server)
    assert lm.generate(prompt(0), max_new_tokens=3, eos_token_ids=()).token_ids == \
        SplitCausalLM(tiny_model).generate(prompt(0), max_new_tokens=3, eos_token_ids=()).token_ids


# ------------------------------------------------------------------------------------------------ plaintext


@pytest.mark.parametrize("host", ["192.0.2.1", "example.test", "[2001:db8::1]", "10.0.0.7"])
def test_plaintext_beyond_loopback_is_refused_without_insecure(host):
    with pytest.raises(ConfigError, match="refusing plaintext ws:// to the non-loopback host") as caught:
        WebSocketTransport(f"ws://{host}:8080", token="t" * 32)
    assert "\n" not in str(caught.value)
    WebSocketTransport(f"ws://{host}:8080", token="t" * 32, insecure=True)  # the user said so: accepted (not connected)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.3.4.5", "[::1]"])
def test_plaintext_to_loopback_is_accepted(host):
    WebSocketTransport(f"ws://{host}:8080", token="t" * 32)


def test_pin_or_ca_with_plaintext_is_refused(tls_files):
    with pytest.raises(ConfigError, match="use wss://"):
        WebSocketTransport("ws://127.0.0.1:8080", token="t" * 32, pin_sha256="ab" * 32)
    with pytest.raises(ConfigError, match="use wss://"):
        WebSocketTransport("ws://127.0.0.1:8080", token="t" * 32, ca_file=tls_files["cert"])
    with pytest.raises(ConfigError, match="not both"):
        WebSocketTransport("wss://127.0.0.1:8080", token="t" * 32, ca_file=tls_files["cert"], pin_sha256="ab" * 32)


def test_cli_refuses_plaintext_beyond_loopback(tmp_path, capsys):
    from splitveil.cli.main import main

    token = tmp_path / "token"
    token.write_text("t" * 32)
    assert main(["generate", "--server", "ws://192.0.2.1:8080", "--token-file", str(token), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing plaintext ws://" in err and "--insecure" in err, err


def test_plaintext_to_an_insecure_loopback_server_works(make_server, tiny_model, tls_files):
    server = make_server(tls=False)
    assert server.url.startswith("ws://127.0.0.1:")
    lm = SplitCausalLM(tiny_model, SplitPlan.lambda_split(*CUTS),
                       transport=WebSocketTransport(server.url, token=tls_files["token"], timeout=20))
    try:
        assert lm.generate(prompt(1), max_new_tokens=3, eos_token_ids=()).token_ids == \
            SplitCausalLM(tiny_model).generate(prompt(1), max_new_tokens=3, eos_token_ids=()).token_ids
    finally:
        lm.close()


# ------------------------------------------------------------------------------------------ hostile replies


class FakeServer:
    """A TLS WebSocket server that answers OPEN and CLOSE properly and FORWARD with `reply(frame)`."""

    def __init__(self, tls_files, reply, *, vocab: int | None = None):
        from websockets.sync.server import serve

        from splitveil.wire.frame import decode_frame

        self.session = bytes(range(16))
        self.reply = reply
        self.info = {"cuts": list(CUTS), "parts": [1], "hidden_size": HIDDEN, "max_frame_bytes": 4 << 20,
                     "max_tokens": 8192}

        def handler(ws):
            try:
                for message in ws:
                    frame = decode_frame(message)
                    if frame.kind == FrameKind.OPEN:
                        ws.send(encode_frame(text_frame(FrameKind.OK, json.dumps(self.info), session=self.session)))
                    elif frame.kind == FrameKind.CLOSE:
                        ws.send(encode_frame(Frame(FrameKind.OK, session=frame.session, seq=frame.seq)))
                    else:
                        ws.send(self.reply(frame))
            except Exception:  # the client hung up on a bad reply: expected
                pass

        self.server = serve(handler, "127.0.0.1", 0, ssl=server_context(tls_files["cert"], tls_files["key"]),
                            max_size=None, compression=None)
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(5)


def result(frame: Frame, tensor=None, **changes) -> bytes:
    fields = {"codec": frame.codec, "session": frame.session, "seq": frame.seq, "part": frame.part, **changes}
    return encode_frame(Frame(FrameKind.RESULT, frame.tensor if tensor is None else tensor, **fields))


HOSTILE_REPLIES = {
    "an OK frame": (lambda f: encode_frame(Frame(FrameKind.OK, session=f.session, seq=f.seq)), "a OK frame where RESULT"),
    "fp16 instead of fp32": (lambda f: result(f, codec="fp16"), "a fp16 tensor where fp32"),
    "another part": (lambda f: result(f, part=2), "a result of part 2 where part 1"),
    "another session": (lambda f: result(f, session=bytes(16 * [7])), "a reply for another session"),
    "another sequence number": (lambda f: result(f, seq=f.seq + 5), "sequence number"),
    "a wider hidden state": (lambda f: result(f, torch.zeros(1, f.tensor.shape[1], HIDDEN + 1)), "of shape [1, 6, 33]"),
    "more positions": (lambda f: result(f, torch.zeros(1, f.tensor.shape[1] + 1, HIDDEN)), "of shape [1, 7, 32]"),
    "a batch of two": (lambda f: result(f, torch.zeros(2, f.tensor.shape[1], HIDDEN)), "of shape [2, 6, 32]"),
    "a flat tensor": (lambda f: result(f, torch.zeros(f.tensor.numel())), "of shape [192]"),
    "NaN": (lambda f: result(f, torch.full_like(f.tensor, float("nan"))), "malformed reply: tensor holds NaN"),
    "garbage": (lambda f: b"\x00" * 64, "malformed reply"),
    "a text message": (lambda f: "hello", "text message"),
    "8 MiB": (lambda f: result(f, torch.zeros(1, 65536, HIDDEN)), "larger than the"),
}


@pytest.mark.parametrize("case", list(HOSTILE_REPLIES))
def test_a_wrong_result_is_one_clear_transport_error(case, tiny_model, tls_files):
    reply, expected = HOSTILE_REPLIES[case]
    fake = FakeServer(tls_files, reply)
    lm = SplitCausalLM(tiny_model, SplitPlan.lambda_split(*CUTS),
                       transport=WebSocketTransport(fake.url, token="t" * 32, ca_file=tls_files["cert"], timeout=20))
    try:
        started = time.monotonic()
        with pytest.raises(TransportError) as caught:
            lm.generate(prompt(0), max_new_tokens=3, eos_token_ids=())
        message = str(caught.value)
        assert type(caught.value).__name__ == "TransportError"  # not ConnectionLost: no replay of a bad server
        assert expected in message and "\n" not in message, message
        assert time.monotonic() - started < 15  # refused at once, not retried
    finally:
        lm.close()
        fake.close()


def test_a_well_formed_fake_reply_passes_the_checks(tiny_model, tls_files):
    fake = FakeServer(tls_files, lambda f: result(f))  # the identity trunk: well formed, wrong maths
    lm = SplitCausalLM(tiny_model, SplitPlan.lambda_split(*CUTS),
                       transport=WebSocketTransport(fake.url, token="t" * 32, ca_file=tls_files["cert"], timeout=20))
    try:
        assert len(lm.generate(prompt(0), max_new_tokens=3, eos_token_ids=()).token_ids) == 3
    finally:
        lm.close()
        fake.close()
