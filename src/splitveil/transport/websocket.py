"""A small synchronous WebSocket client (RFC 6455) over a socket the caller opened (TCP, or TLS already checked).

Why not `websockets.sync`: its client reads in a background thread and hands every message over through a queue,
which costs some 0.3 ms of CPU per round trip on this machine. A masked SLIP decode step makes 121 round trips,
so the hand-over alone cost the device more CPU than running the model. This client reads in the caller's thread:
a round trip is one `sendall` and the `recv` calls of the reply, about 30 us of Python.

What it does: the opening handshake (with the caller's extra headers, e.g. the bearer token; the server's accept
key checked), binary and text messages (fragmented ones reassembled), answers pings while it waits for a message,
bounds every message by `max_size` before reading its payload, and the closing handshake. What it does not:
extensions (the servers run without compression), and reading while nobody asks for a message (a server that
pings an idle client gets its pong at the next read; splitveil servers wait 80 s for it).

Errors: `HandshakeRefused` (an HTTP status other than 101), `MessageTooBig`, `ConnectionClosed` (the peer closed or
the connection broke), `TimeoutError` from the socket.
"""

from __future__ import annotations

import base64
import hashlib
import os
import select
import socket
import struct

try:
    from websockets.speedups import apply_mask as _apply_mask  # C; the pure-Python mask below is its fallback
except ImportError:  # pragma: no cover - websockets ships the extension on every platform we install on
    _apply_mask = None

ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HANDSHAKE_BYTES = 65536
READ_AHEAD = 65536  # bytes asked of the socket for a short read
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG = 1000, 1002, 1009


class WebSocketError(Exception):
    """Base of this module's errors."""


class HandshakeRefused(WebSocketError):
    def __init__(self, status: int, reason: str):
        super().__init__(f"HTTP {status} {reason}".strip())
        self.status = status


class MessageTooBig(WebSocketError):
    pass


class ConnectionClosed(WebSocketError):
    pass


def mask_bytes(data: bytes, key: bytes) -> bytes:
    """XORs `data` with the repeated 4-byte `key` (a client's frames are masked, RFC 6455 5.3)."""
    if _apply_mask is not None:
        return _apply_mask(data, key)
    whole = key * (len(data) // 4 + 1)
    return (int.from_bytes(data, "little") ^ int.from_bytes(whole[: len(data)], "little")).to_bytes(len(data), "little")


def frame_header(opcode: int, length: int, *, fin: bool = True, mask_key: bytes | None = None) -> bytes:
    """The header of one frame carrying `length` payload bytes (masked when `mask_key` is given)."""
    first = (0x80 if fin else 0) | opcode
    masked = 0x80 if mask_key is not None else 0
    if length < 126:
        header = struct.pack("!BB", first, masked | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, masked | 126, length)
    else:
        header = struct.pack("!BBQ", first, masked | 127, length)
    return header + (mask_key or b"")


class WebSocketClient:
    """One client connection.

    Args:
        sock: a connected socket (TLS or plain), blocking; its timeout bounds every wait.
        host: the Host header (host:port).
        path: the request path.
        headers: extra request headers (e.g. {"Authorization": "Bearer ..."}).
        max_size: the largest message accepted (None: any); `recv` may narrow it per call.
    """

    def __init__(self, sock: socket.socket, *, host: str, path: str = "/", headers: dict | None = None,
                 max_size: int | None = None):
        self.sock = sock
        self.max_size = max_size
        self.closed = False
        self._buffer = bytearray()  # bytes read past the handshake
        self._handshake(host, path, headers or {})

    # -- handshake ---------------------------------------------------------------------------------------------

    def _handshake(self, host: str, path: str, headers: dict) -> None:
        key = base64.b64encode(os.urandom(16))
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key.decode()}", "Sec-WebSocket-Version: 13"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        response = bytearray()
        while b"\r\n\r\n" not in response:
            if len(response) > MAX_HANDSHAKE_BYTES:
                raise ConnectionClosed("the server's handshake response is too long")
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionClosed("the server closed the connection during the handshake")
            response += chunk
        head, _, rest = bytes(response).partition(b"\r\n\r\n")
        self._buffer += rest
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ConnectionClosed(f"not an HTTP response: {status_line[:80]!r}")
        status = int(parts[1])
        if status != 101:
            raise HandshakeRefused(status, parts[2] if len(parts) > 2 else "")
        fields = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        expected = base64.b64encode(hashlib.sha1(key + ACCEPT_GUID).digest()).decode()
        if fields.get("upgrade", "").lower() != "websocket" or fields.get("sec-websocket-accept") != expected:
            raise ConnectionClosed("the server's handshake response is not a WebSocket upgrade")

    # -- frames ------------------------------------------------------------------------------------------------

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        key = os.urandom(4)
        try:
            self.sock.sendall(frame_header(opcode, len(payload), mask_key=key) + mask_bytes(payload, key))
        except OSError as error:
            self.closed = True
            raise ConnectionClosed(f"sending failed: {error}") from None

    def send(self, data: bytes | bytearray | memoryview | str) -> None:
        """Sends one message (binary for bytes, text for str), unfragmented."""
        if self.closed:
            raise ConnectionClosed("the connection is closed")
        if isinstance(data, str):
            self._send_frame(OP_TEXT, data.encode("utf-8"))
        else:
            self._send_frame(OP_BINARY, bytes(data))

    def _receive_into(self, view: memoryview) -> int:
        try:
            count = self.sock.recv_into(view)
        except (TimeoutError, socket.timeout):
            raise TimeoutError("no data from the server in time") from None
        except OSError as error:
            self.closed = True
            raise ConnectionClosed(f"receiving failed: {error}") from None
        if not count:
            self.closed = True
            raise ConnectionClosed("the server closed the connection")
        return count

    def _read_exactly(self, count: int) -> bytearray:
        """The next `count` bytes. Short reads (headers) read ahead into the buffer; a payload is received straight
        into its own bytearray (no copies beyond the socket's)."""
        buffer = self._buffer
        if len(buffer) < count and count <= READ_AHEAD:
            chunk = bytearray(READ_AHEAD)
            while len(buffer) < count:
                got = self._receive_into(memoryview(chunk))
                buffer += memoryview(chunk)[:got]
        if len(buffer) >= count:
            data = buffer[:count]
            del buffer[:count]
            return data
        data = bytearray(count)
        view = memoryview(data)
        have = len(buffer)
        view[:have] = buffer
        buffer.clear()
        while have < count:
            have += self._receive_into(view[have:])
        return data

    def readable(self) -> bool:
        """Whether a read would find data at once (a reply, or a ping, already here)."""
        if self._buffer or (hasattr(self.sock, "pending") and self.sock.pending()):
            return True
        try:
            ready, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(ready)

    def poll(self) -> None:
        """Answers the pings that have arrived, without waiting for a message: what keeps an idle connection alive
        (the server closes one whose pings go unanswered). Stops at the first other frame, which stays unread for
        `recv` (a message, whose limit applies when it is read; a close, whose reason `recv` reports)."""
        while not self.closed and self.readable():
            if self._peek(2)[0] & 0x0F not in (OP_PING, OP_PONG):  # a message, or the server's close with its reason
                return
            _, opcode, payload = self._read_frame(None)
            if opcode == OP_PING:
                self._send_frame(OP_PONG, bytes(payload))

    def _peek(self, count: int) -> bytes:
        """The next `count` bytes (a few), left in the buffer."""
        chunk = bytearray(READ_AHEAD)
        while len(self._buffer) < count:
            got = self._receive_into(memoryview(chunk))
            self._buffer += memoryview(chunk)[:got]
        return bytes(self._buffer[:count])

    def _read_frame(self, limit: int | None) -> tuple[bool, int, bytes]:
        first, second = self._read_exactly(2)
        fin, opcode, masked, length = bool(first & 0x80), first & 0x0F, bool(second & 0x80), second & 0x7F
        if first & 0x70:
            self._fail(CLOSE_PROTOCOL_ERROR, "the server set reserved bits (no extension was agreed)")
        if masked:
            self._fail(CLOSE_PROTOCOL_ERROR, "the server masked a frame")
        if length == 126:
            (length,) = struct.unpack("!H", self._read_exactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read_exactly(8))
        if opcode >= OP_CLOSE and (length > 125 or not fin):
            self._fail(CLOSE_PROTOCOL_ERROR, "a control frame longer than 125 bytes or fragmented")
        if opcode < OP_CLOSE and limit is not None and length > limit:
            self._fail(CLOSE_TOO_BIG, f"a message of {length} bytes exceeds the limit of {limit}", MessageTooBig)
        return fin, opcode, self._read_exactly(length)

    def recv(self, *, max_size: int | None = -1) -> bytearray | str:
        """The next message (a bytearray, or str for a text message), answering pings on the way. `max_size`: this message's limit (-1: the
        connection's)."""
        if self.closed:
            raise ConnectionClosed("the connection is closed")
        limit = self.max_size if max_size == -1 else max_size
        parts: list[bytes] = []
        message_opcode = None
        while True:
            fin, opcode, payload = self._read_frame(None if limit is None else limit - sum(map(len, parts)))
            if opcode == OP_PING:
                self._send_frame(OP_PONG, bytes(payload))
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                self._reply_close(payload)
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                raise ConnectionClosed(f"the server closed the connection (code {code}"
                                       f"{': ' + payload[2:].decode('utf-8', 'replace') if len(payload) > 2 else ''})")
            if opcode in (OP_TEXT, OP_BINARY):
                if message_opcode is not None:
                    self._fail(CLOSE_PROTOCOL_ERROR, "a new message began inside a fragmented one")
                message_opcode = opcode
            elif opcode == OP_CONTINUATION:
                if message_opcode is None:
                    self._fail(CLOSE_PROTOCOL_ERROR, "a continuation frame without a message")
            else:
                self._fail(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
            parts.append(payload)
            if fin:
                data = parts[0] if len(parts) == 1 else bytearray(b"".join(parts))
                return data.decode("utf-8") if message_opcode == OP_TEXT else data

    # -- closing -----------------------------------------------------------------------------------------------

    def _fail(self, code: int, reason: str, error=ConnectionClosed):
        self.close(code, reason[:100])
        raise error(reason)

    def _reply_close(self, payload: bytes) -> None:
        try:
            self._send_frame(OP_CLOSE, payload[:2])
        except ConnectionClosed:
            pass
        self._shutdown()

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Sends a close frame (best effort) and closes the socket; waits for nothing."""
        if not self.closed:
            try:
                self._send_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:120])
            except ConnectionClosed:
                pass
        self._shutdown()

    def _shutdown(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
