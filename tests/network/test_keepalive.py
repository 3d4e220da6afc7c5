"""An idle client connection answers the server's keepalive pings (a keepalive thread polls it), so a device that
waits on something else for longer than the ping timeout keeps its connection and session."""

import time

import pytest

from splitveil.serve.server import ServerLimits
from splitveil.transport import network

pytestmark = pytest.mark.network

FAST_PINGS = ServerLimits(ping_interval=0.3, ping_timeout=0.6)


def idle_then_generate(make_server, client) -> list[int]:
    server = make_server(limits=FAST_PINGS)
    lm = client(server)  # recover_seconds 0: a lost connection fails the generation
    first = lm.generate([5, 6, 7], max_new_tokens=4).token_ids
    time.sleep(2.5)  # several ping timeouts
    assert lm.generate([5, 6, 7], max_new_tokens=4).token_ids == first
    return first


def test_an_idle_connection_survives_the_servers_ping_timeout(make_server, client, monkeypatch):
    monkeypatch.setattr(network, "_KEEPALIVE", network._Keepalive(period=0.1))
    idle_then_generate(make_server, client)


def test_without_the_keepalive_the_server_drops_it(make_server, client, monkeypatch):
    """The failure the keepalive prevents (so the test above can fail)."""
    class Nothing(network._Keepalive):
        def add(self, transport):
            pass

    monkeypatch.setattr(network, "_KEEPALIVE", Nothing())
    with pytest.raises(network.ConnectionLost):
        idle_then_generate(make_server, client)


def test_polling_leaves_a_reply_for_the_request_that_waits_for_it(make_server, tls_files):
    """The keepalive answers pings only: a reply that arrived meanwhile (larger than the connection's opening limit)
    stays for `collect`, checked against its own request's bound."""
    import torch

    from splitveil.transport.network import WebSocketTransport
    from splitveil.transport.session import ClientSession

    server = make_server(limits=FAST_PINGS)
    transport = WebSocketTransport(server.url, token=tls_files["token"], ca_file=tls_files["cert"])
    session = ClientSession(transport)
    session.open()  # connects lazily, under the OPEN reply's 64 KiB bound
    hidden = torch.randn(1, 600, 32)  # a 76.8 KB reply
    frame = session.post(hidden, codec="fp32", part=1)
    time.sleep(1.5)  # the reply and some pings arrive
    transport.keep_alive()
    reply = session.collect(frame, expected_shape=(1, 600, 32))
    assert reply.tensor.shape == (1, 600, 32)
    transport.close()
