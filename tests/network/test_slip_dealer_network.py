"""SLIP's prompt deployment with a mask dealer over the real stack: `generate --protect prompt --dealer local` starts
the executor and the dealer as TLS child processes; and the small WebSocket client against a real server that
pings, fragments and oversizes its messages."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from splitveil.core.errors import TransportError
from splitveil.transport.network import WebSocketTransport

pytestmark = [pytest.mark.network, pytest.mark.model]
PROMPT = "Write a short note to my doctor about my blood pressure readings this week: 150/95 on Monday."


def generate(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "splitveil.cli.main", "generate", "--model", "smollm2-135m",
                           "--prompt", PROMPT, "--max-new-tokens", "6", "--json", *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_generate_with_a_local_dealer_equals_the_unsplit_model_and_reports_its_costs():
    dealt = generate("--split", "0,30", "--protect", "prompt", "--dealer", "local", "--chat")
    plain = generate("--no-split", "--chat")
    assert dealt["token_ids"] == plain["token_ids"]
    for report in (dealt, plain):
        for key in ("cpu_seconds_decode", "cpu_seconds_prefill", "decode_tokens", "peak_rss_bytes", "weight_bytes_resident"):
            assert report[key] is not None, key
    assert dealt["weight_bytes_resident"] < 0.25 * plain["weight_bytes_resident"]
    assert dealt["fused"] and dealt["round_trips_per_decode_step"] == 62  # layer 0's q/k/v, 30 layers x 2, the head
    assert dealt["dealer_bytes_down"] > 0 and dealt["executor_cpu_seconds"] > 0
    assert "collude" in dealt["trust"]


def test_bad_dealer_flags_exit_2_with_one_line():
    for args, says in ((["--split", "0,30", "--dealer", "local"], "--protect prompt"),
                       (["--split", "0,30", "--protect", "prompt", "--dealer", "nowhere"], "--dealer takes"),
                       (["--split", "0,30", "--protect", "prompt", "--head", "masked"], "--dealer local"),
                       (["--split", "0,30", "--protect", "prompt", "--dealer", "local", "--head", "cloud"], "--head"),
                       (["--split", "0,30", "--protect", "prompt", "--dealer", "local", "--fuse", "maybe"], "--fuse takes"),
                       (["--split", "0,30", "--protect", "prompt", "--fuse", "on"], "--dealer local")):
        done = subprocess.run([sys.executable, "-m", "splitveil.cli.main", "generate", "--prompt", "hi", *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (args, done.stderr)
        assert says in done.stderr, (args, done.stderr)


@pytest.fixture
def raw_server(tls_files):
    """A websockets server (TLS, token) whose handler the test writes: pings, fragments, oversized messages."""
    from websockets.sync.server import serve

    from splitveil.transport.tls import server_context

    servers = []

    def start(handler):
        server = serve(handler, "127.0.0.1", 0, ssl=server_context(tls_files["cert"], tls_files["key"]),
                       compression=None, max_size=None)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"wss://127.0.0.1:{server.socket.getsockname()[1]}"

    yield start
    for server in servers:
        server.shutdown()


def test_the_websocket_client_answers_pings_and_reassembles_fragments(raw_server, tls_files):
    def handler(connection):
        for count, message in enumerate(connection):
            connection.ping(b"are you there %d" % count)
            connection.send([message[:3], message[3:], b"!"])  # one message in three fragments

    transport = WebSocketTransport(raw_server(handler), token=tls_files["token"], ca_file=tls_files["cert"], timeout=10)
    try:
        assert transport.request(b"hello world") == b"hello world!"
        assert transport.request(b"again") == b"again!"
        transport.post(b"one")
        transport.post(b"two")
        assert (transport.collect(), transport.collect()) == (b"one!", b"two!")  # pipelined, answered in order
        assert transport.stats.round_trips == 4
    finally:
        transport.close()


def test_the_websocket_client_refuses_an_oversized_reply_before_reading_it(raw_server, tls_files):
    def handler(connection):
        for _ in connection:
            connection.send(bytes(1 << 20))

    transport = WebSocketTransport(raw_server(handler), token=tls_files["token"], ca_file=tls_files["cert"], timeout=10)
    transport.max_reply_bytes = 4096
    with pytest.raises(TransportError, match="larger than the 4096 bytes"):
        transport.request(b"x")
    transport.close()
