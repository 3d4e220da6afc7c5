"""The network transport: binary WebSocket frames over TLS to a `splitveil serve` process.

Synchronous (the device side runs one request at a time). Raises `ConnectionLost` when the connection drops, so
that the caller can open a new session and replay; every other failure is a `TransportError` with one clear line.

The client opens the TCP connection and does the TLS handshake itself, then checks the server's certificate
(chain and host name with `ca_file`, the SHA-256 fingerprint with a pin) before the WebSocket upgrade: the bearer
token, like every other HTTP byte, only ever goes to the server the user chose to trust.
"""

from __future__ import annotations

import hmac
import logging
import ipaddress
import socket
import ssl
import threading
import time
import weakref
from pathlib import Path
from urllib.parse import urlparse

from splitveil.core.errors import ConfigError, TransportError
from splitveil.transport.base import Transport
from splitveil.transport.tls import client_context, fingerprint_der, normalise_pin

log = logging.getLogger(__name__)
DEFAULT_MAX_REPLY_BYTES = 64 * 1024 * 1024  # a reply larger than this is refused while it arrives (callers narrow it)


class _Keepalive:
    """Answers the server's pings on idle connections. A `WebSocketTransport` reads (and so answers pings) only
    while it waits for a reply; one that waits on something else for longer than the server's ping timeout (SLIP's
    dealer connection while the device spends its buffered mask terms over a slow link) would be closed. Every
    `period` seconds one daemon thread polls each connection not in use (`WebSocketClient.poll`)."""

    def __init__(self, period: float = 5.0):
        self.period = period
        self.transports: weakref.WeakSet = weakref.WeakSet()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, transport: "WebSocketTransport") -> None:
        with self.lock:
            self.transports.add(transport)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="splitveil-keepalive", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.period)
            with self.lock:
                transports = list(self.transports)
            for transport in transports:
                transport.keep_alive()


_KEEPALIVE = _Keepalive()


class ConnectionLost(TransportError):
    """The connection to the server dropped (server restart, network, eviction)."""


def _reason(error: BaseException) -> str:
    return (error.strerror if isinstance(error, OSError) else None) or str(error) or type(error).__name__


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1): traffic that never leaves this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebSocketTransport(Transport):
    """A WebSocket connection to a splitveil server.

    Args:
        url: wss://host:port (TLS) or ws://host:port (plaintext: loopback only, unless `insecure`).
        token: the bearer token.
        ca_file: a certificate (or CA bundle) to trust, e.g. the server's own --tls-cert; the host name is checked.
        pin_sha256: trust exactly the certificate with this SHA-256 fingerprint (printed by the server).
        timeout: seconds to wait for a connection or a reply.
        insecure: allow ws:// (token and hidden states in clear) to a host beyond loopback.
    """

    def __init__(self, url: str, *, token: str, ca_file: Path | None = None, pin_sha256: str | None = None,
                 timeout: float = 60.0, insecure: bool = False):
        super().__init__()
        parsed = urlparse(url)
        try:
            port = parsed.port
        except ValueError:
            port = None
        if parsed.scheme not in ("wss", "ws") or not parsed.hostname or port is None:
            raise ConfigError(f"bad server URL {url!r}: use wss://HOST:PORT (or ws:// for an --insecure server)")
        if parsed.scheme == "ws":
            if ca_file is not None or pin_sha256:
                raise ConfigError(f"--ca/--pin check a TLS certificate, but {url} has no TLS: use wss://")
            if not is_loopback(parsed.hostname) and not insecure:
                raise ConfigError(f"refusing plaintext ws:// to the non-loopback host {parsed.hostname} (the token and "
                                  "hidden states would cross the network in clear): use wss://, or --insecure")
        if ca_file is not None and pin_sha256:
            raise ConfigError("give --ca or --pin, not both")
        self._settings = dict(token=token, ca_file=ca_file, pin_sha256=pin_sha256, timeout=timeout, insecure=insecure)
        self.url = url
        self.host, self.port, self.path = parsed.hostname, port, parsed.path or "/"
        self.token = token
        self.timeout = timeout
        self.max_reply_bytes = DEFAULT_MAX_REPLY_BYTES
        self.pin = normalise_pin(pin_sha256) if pin_sha256 else None
        self.ssl_context = client_context(ca_file=ca_file, pin_sha256=self.pin) if parsed.scheme == "wss" else None
        self._ws = None
        self._in_use = threading.Lock()  # held while a request uses the connection (the keepalive thread skips it)

    def _open_socket(self) -> socket.socket:
        """TCP, then TLS with the certificate checked; nothing of HTTP has been sent when this returns."""
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as error:
            raise ConnectionLost(f"cannot reach {self.url}: {_reason(error)}") from None
        # Without it, a frame larger than one TLS record (16 KiB: a SLIP product of a few rows) leaves in two
        # segments and the second waits for the server's delayed ACK (Nagle): 40 ms per request on loopback.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is None:
            sock.settimeout(None)
            return sock
        try:
            tls = self.ssl_context.wrap_socket(sock, server_hostname=self.host)  # handshake, within the timeout
        except ssl.SSLCertVerificationError as error:
            sock.close()
            reason = error.verify_message or error.reason or error
            raise TransportError(f"TLS with {self.url} failed: {reason}") from None
        except ssl.SSLError as error:
            sock.close()
            raise TransportError(f"TLS with {self.url} failed: {error.reason or error}") from None
        except (OSError, TimeoutError) as error:
            sock.close()
            raise ConnectionLost(f"no TLS handshake with {self.url}: {_reason(error)}") from None
        if self.pin is not None:
            der = tls.getpeercert(binary_form=True)
            if der is None or not hmac.compare_digest(fingerprint_der(der), self.pin):
                tls.close()
                raise TransportError(f"the certificate of {self.url} does not match the pinned fingerprint; "
                                     "nothing was sent to it")
        tls.settimeout(None)
        return tls

    def another(self) -> "WebSocketTransport":
        """A new, unconnected transport to the same server with the same trust (for one more concurrent session)."""
        return WebSocketTransport(self.url, **self._settings)

    def connect(self) -> None:
        """Connects (TCP, TLS and certificate check, then the WebSocket upgrade with the token)."""
        from splitveil.transport.websocket import ConnectionClosed as Closed
        from splitveil.transport.websocket import HandshakeRefused, WebSocketClient

        self.close()
        sock = self._open_socket()
        sock.settimeout(self.timeout)
        try:
            self._ws = WebSocketClient(sock, host=self._host_port(), path=self.path,
                                       headers={"Authorization": f"Bearer {self.token}"}, max_size=self.max_reply_bytes)
        except HandshakeRefused as error:
            if error.status == 401:
                raise TransportError(f"{self.url} refused the token (HTTP 401): check --token-file") from None
            raise TransportError(f"{self.url} refused the connection (HTTP {error.status})") from None
        except ssl.SSLError as error:
            raise TransportError(f"TLS with {self.url} failed: {error.reason or error}") from None
        except Closed as error:
            raise ConnectionLost(f"no WebSocket handshake with {self.url}: {error}") from None
        except (OSError, TimeoutError) as error:
            raise ConnectionLost(f"cannot reach {self.url}: {_reason(error)}") from None
        finally:
            if self._ws is None:
                sock.close()
        _KEEPALIVE.add(self)

    def _host_port(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def keep_alive(self) -> None:
        """Answers pings that arrived while this connection sat idle (called by the keepalive thread)."""
        if not self._in_use.acquire(blocking=False):
            return
        try:
            if self._ws is not None and not self._ws.closed:
                self._ws.poll()
        except Exception as error:  # noqa: BLE001 - a dead connection shows itself to the next request
            log.info("keepalive poll of %s failed: %s: %s", self.url, type(error).__name__, error)
        finally:
            self._in_use.release()

    def _request(self, frame: bytes) -> bytes:
        self._post(frame)
        return self._collect()

    def _post(self, frame: bytes) -> None:
        from splitveil.transport.websocket import ConnectionClosed as Closed

        if self._ws is None:
            self.connect()
        try:
            with self._in_use:
                self._ws.send(frame)
        except Closed as error:
            self._ws = None
            raise ConnectionLost(f"connection to {self.url} lost: {error}") from None

    def reply_ready(self) -> bool:
        """Whether the oldest posted request's reply has begun to arrive (collecting it would not wait for the
        server)."""
        with self._in_use:
            return self._ws is not None and self._ws.readable()

    def _collect(self) -> bytes:
        """The reply to the oldest request sent, at most `max_reply_bytes` long (refused while it arrives)."""
        from splitveil.transport.websocket import ConnectionClosed as Closed
        from splitveil.transport.websocket import MessageTooBig

        if self._ws is None:
            raise ConnectionLost(f"connection to {self.url} lost: no request is waiting for a reply")
        limit = self.max_reply_bytes
        try:
            with self._in_use:
                reply = self._ws.recv(max_size=limit)
        except MessageTooBig:
            self._ws = None
            raise TransportError(f"{self.url} sent a reply larger than the {limit} bytes this request can "
                                 "produce; connection closed") from None
        except Closed as error:
            self._ws = None
            raise ConnectionLost(f"connection to {self.url} lost: {error}") from None
        except TimeoutError:
            self.close()
            raise ConnectionLost(f"no reply from {self.url} within {self.timeout:g} s") from None
        except ssl.SSLError as error:
            self._ws = None
            raise ConnectionLost(f"connection to {self.url} lost: {error.reason or error}") from None
        if isinstance(reply, str):
            self.close()
            raise TransportError("the server sent a text message where a frame was expected")
        return reply

    def close(self) -> None:
        self._pending.clear()  # their replies die with the connection
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:  # closing a broken connection may fail; it is gone either way
                pass
            self._ws = None
