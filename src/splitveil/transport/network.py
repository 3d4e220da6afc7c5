"""The network transport: binary WebSocket frames over TLS to a `splitveil serve` process.

Synchronous (the device side runs one request at a time). Raises `ConnectionLost` when the connection drops, so
that the caller can open a new session and replay; every other failure is a `TransportError` with one clear line.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import urlparse

from splitveil.core.errors import ConfigError, TransportError
from splitveil.transport.tls import client_context, fingerprint_der, normalise_pin
from splitveil.transport.base import Transport


class ConnectionLost(TransportError):
    """The connection to the server dropped (server restart, network, eviction)."""


class WebSocketTransport(Transport):
    """A WebSocket connection to a splitveil server.

    Args:
        url: wss://host:port (TLS) or ws://host:port (plaintext, only to a server started with --insecure).
        token: the bearer token.
        ca_file: a certificate (or CA bundle) to trust, e.g. the server's own --tls-cert.
        pin_sha256: trust exactly the certificate with this SHA-256 fingerprint (printed by the server).
        timeout: seconds to wait for a connection or a reply.
    """

    def __init__(self, url: str, *, token: str, ca_file: Path | None = None, pin_sha256: str | None = None,
                 timeout: float = 60.0):
        super().__init__()
        parsed = urlparse(url)
        if parsed.scheme not in ("wss", "ws") or not parsed.hostname or parsed.port is None:
            raise ConfigError(f"bad server URL {url!r}: use wss://HOST:PORT (or ws:// for an --insecure server)")
        self.url = url
        self.token = token
        self.timeout = timeout
        self.pin = normalise_pin(pin_sha256) if pin_sha256 else None
        self.ssl_context = client_context(ca_file=ca_file, pin_sha256=self.pin) if parsed.scheme == "wss" else None
        self._ws = None

    def connect(self) -> None:
        from websockets.exceptions import InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        self.close()
        try:
            self._ws = connect(self.url, ssl=self.ssl_context, additional_headers={"Authorization": f"Bearer {self.token}"},
                               compression=None, max_size=None, open_timeout=self.timeout, close_timeout=2, legacy=True)
        except InvalidStatus as error:
            status = error.response.status_code
            if status == 401:
                raise TransportError(f"{self.url} refused the token (HTTP 401): check --token-file") from None
            raise TransportError(f"{self.url} refused the connection (HTTP {status})") from None
        except ssl.SSLError as error:
            raise TransportError(f"TLS with {self.url} failed: {error.reason or error}") from None
        except (InvalidHandshake, EOFError) as error:
            raise ConnectionLost(f"no WebSocket handshake with {self.url}: {error}") from None
        except (OSError, TimeoutError) as error:
            raise ConnectionLost(f"cannot reach {self.url}: {error.strerror if isinstance(error, OSError) and error.strerror else error}") from None
        if self.pin is not None:
            der = self._ws.socket.getpeercert(binary_form=True)
            if der is None or fingerprint_der(der) != self.pin:
                self.close()
                raise TransportError(f"the certificate of {self.url} does not match the pinned fingerprint")

    def _request(self, frame: bytes) -> bytes:
        from websockets.exceptions import ConnectionClosed

        if self._ws is None:
            self.connect()
        try:
            self._ws.send(frame)
            reply = self._ws.recv(timeout=self.timeout)
        except (ConnectionClosed, OSError, EOFError) as error:
            self._ws = None
            raise ConnectionLost(f"connection to {self.url} lost: {error}") from None
        except TimeoutError:
            self.close()
            raise ConnectionLost(f"no reply from {self.url} within {self.timeout:g} s") from None
        if isinstance(reply, str):
            raise TransportError("the server sent a text message where a frame was expected")
        return reply

    def close(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:  # closing a broken connection may fail; it is gone either way
                pass
            self._ws = None
