"""What the OpenAI edge checks before it reads a request's body: the Host header, the API key, the body's size and
the number of requests in flight.

`RequestGuard` is ASGI middleware in front of the FastAPI app. It answers from the headers alone, so a refused
client costs the edge no body bytes:

- **Host allow-list** (403, `code: host_not_allowed`): a DNS-rebinding page reaches the edge under the attacker's
  own name (`Host: attacker.example`); only the names the edge is reached by (its bound address and `localhost`,
  with its port, plus the operator's `--allow-host` names) are served. When the edge listens on every interface, any
  IP-address Host is also served: a browser sends an IP literal only when it connected to that very address, so it
  cannot come from a rebound name.
- **API key** (401, `code: invalid_api_key`): `Authorization: Bearer KEY`, compared in constant time.
- **Request size** (413, `code: request_too_large`): a `Content-Length` above the cap is refused at once; a chunked
  body is counted as it arrives and refused as soon as it passes the cap, so at most the cap is ever buffered.
- **Requests in flight** (429, `code: rate_limit_exceeded`): generations run one at a time; past `max_pending`
  waiting or running requests (each holding its body and parsed request) new ones are refused.
- **Bodies being sent** (429 past `max_pending` at once; 408, `code: request_timeout`, when one takes longer than
  `body_timeout` seconds): a body is read before its request counts as in flight, under a deadline, so clients that
  announce a body and never finish it hold no generation place and each hold a reading place for `body_timeout` at
  most (before, 32 such connections locked every other client out for good).

Refusals carry `Connection: close`, so the server drops the rest of an unread body instead of parsing through it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json

from splitveil.edge.openai.schemas import error_body
from splitveil.serve.auth import bearer, token_matches

HTTP_DEFAULT_PORT = 80  # the port of a Host header without one


def parse_host(value: str) -> tuple[str, int | None] | None:
    """(name, port) of a Host header value or an allow-list entry: the name lower-cased, without a trailing dot or an
    IPv6 address's brackets (IP literals in their canonical form); None when it is not a host[:port]."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, colon, port_text = value.rpartition(":")
        if not colon:
            name, port_text = value, None
        if ":" in name:  # a bare IPv6 address is not a valid Host
            return None
    if name.endswith("."):  # the fully qualified form of a name is the same name
        name = name[:-1]
    if not name or any(c in name for c in "/\\@ \t") or (port_text is not None and not port_text.isdigit()):
        return None
    port = int(port_text) if port_text is not None else None
    if port is not None and not 0 < port < 65536:
        return None
    try:
        name = ipaddress.ip_address(name).compressed
    except ValueError:
        pass
    return name, port


def host_entry(host: str, port: int | None) -> str:
    """An allow-list entry naming `host` at `port` (None: any port)."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


def host_allowed(header: str | None, allowed: tuple[str, ...], *, any_ip: bool = False) -> bool:
    """Whether a request with this Host header is served. `allowed` holds "name" (any port) or "name:port" entries;
    `any_ip` also serves every IP-literal Host (an edge bound to all interfaces)."""
    if header is None:
        return False
    parsed = parse_host(header)
    if parsed is None:
        return False
    name, port = parsed
    port = HTTP_DEFAULT_PORT if port is None else port
    if any_ip:
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            pass
    for entry in allowed:
        wanted = parse_host(entry)
        if wanted is not None and wanted[0] == name and wanted[1] in (None, port):
            return True
    return False


class RequestGuard:
    """ASGI middleware: Host, API key, body size and requests in flight, checked before the app runs (see module).

    Args:
        app: the ASGI app behind it.
        allowed_hosts: Host entries served ("name" for any port, "name:port"); None serves every Host.
        any_ip_host: also serve every IP-literal Host.
        api_key: the key requests must carry as a bearer token; None: no key.
        max_request_bytes: the largest body read.
        max_pending: the most requests past the checks at once (waiting for the generation lock or running), and
            the most bodies being read at once.
        body_timeout: seconds a client may take to send its whole body.
    """

    def __init__(self, app, *, allowed_hosts: tuple[str, ...] | None, any_ip_host: bool, api_key: str | None,
                 max_request_bytes: int, max_pending: int, body_timeout: float = 30.0):
        self.app = app
        self.allowed_hosts, self.any_ip_host = allowed_hosts, any_ip_host
        self.api_key = api_key
        self.max_request_bytes, self.max_pending, self.body_timeout = max_request_bytes, max_pending, body_timeout
        self.pending = 0  # requests whose body is read: waiting for the generation or running
        self.receiving = 0  # requests whose body is being read

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, list[bytes]] = {}
        for key, value in scope.get("headers", ()):
            headers.setdefault(key.lower(), []).append(value)
        refusal = self._refusal(headers)
        if refusal is not None:
            await _answer(send, *refusal)
            return
        self.receiving += 1
        try:
            body = await asyncio.wait_for(_read_body(receive, self.max_request_bytes), self.body_timeout)
        except asyncio.TimeoutError:
            await _answer(send, 408, f"the request body did not arrive within {self.body_timeout:g} s",
                          "request_timeout")
            return
        finally:
            self.receiving -= 1
        if body is None:  # the client left
            return
        if len(body) > self.max_request_bytes:
            await _answer(send, *self._too_large())
            return
        if self.pending >= self.max_pending:
            await _answer(send, *self._busy())
            return
        self.pending += 1
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.pending -= 1

    def _refusal(self, headers: dict[bytes, list[bytes]]) -> tuple | None:
        """(status, message, code, extra headers) for a request refused on its headers; None to serve it."""
        hosts = headers.get(b"host", [])
        host = hosts[0].decode("latin-1") if len(hosts) == 1 else None
        if self.allowed_hosts is not None and not host_allowed(host, self.allowed_hosts, any_ip=self.any_ip_host):
            return (403, f"Host {host!r} is not served by this edge (a DNS-rebinding page would send its own name); "
                    "add the name the edge is reached by with --allow-host", "host_not_allowed", ())
        if self.api_key is not None:
            values = headers.get(b"authorization", [])
            presented = bearer(values[0].decode("latin-1")) if len(values) == 1 else None
            if not token_matches(presented, self.api_key):
                return (401, "Incorrect API key provided: send 'Authorization: Bearer KEY' with the key splitveil edge "
                        "printed or wrote to --api-key-file", "invalid_api_key", ((b"www-authenticate", b"Bearer"),))
        lengths = headers.get(b"content-length", [])
        if lengths:
            try:
                length = int(lengths[0])
            except ValueError:
                return 400, "Content-Length: not a number", "invalid_content_length", ()
            if length > self.max_request_bytes:
                return self._too_large()
        if self.pending >= self.max_pending or self.receiving >= self.max_pending:
            return self._busy()
        return None

    def _busy(self) -> tuple:
        return (429, f"too many requests in flight ({self.max_pending}); generations run one at a time, retry "
                "later", "rate_limit_exceeded", ())

    def _too_large(self) -> tuple:
        return (413, f"request body larger than {self.max_request_bytes} bytes (--max-request-bytes)",
                "request_too_large", ())


async def _read_body(receive, limit: int) -> bytes | None:
    """The request's body, read up to `limit` + 1 bytes (longer: the caller refuses it); None if the client left."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            return bytes(body[: limit + 1])
        if not message.get("more_body", False):
            return bytes(body)


def _replay(body: bytes, receive):
    """A `receive` that hands the app the body already read, then the client's later messages (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send, status: int, message: str, code: str, extra: tuple = ()) -> None:
    """An OpenAI-shaped error; `Connection: close` so that an unread body is dropped with the connection."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    payload = json.dumps(error_body(message, type=kind, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               (b"connection", b"close"), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
