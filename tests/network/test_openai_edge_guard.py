"""What the OpenAI edge refuses before it reads a body: a Host it is not reached by (DNS rebinding), a missing or wrong
API key, a body over the cap (declared or chunked), more requests in flight than allowed; and the huge fields a
hostile client can put in a small body get 400. The app runs under uvicorn on 127.0.0.1 over a stand-in split LM
(these tests are about the HTTP front; the tokens through a real split are `test_openai_edge.py`'s)."""

import json
import socket
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from splitveil.edge.openai import EdgeSettings, build_app
from splitveil.edge.openai.guard import host_allowed, host_entry

pytestmark = pytest.mark.network

KEY = "k" * 43
CONTEXT, VOCAB = 64, 100
HUGE = 300 * 2**20  # the 300 MiB body of the review's reproduction


class StandInTokenizer:
    """One token per character (id = code point mod 100)."""

    chat_template = "stand-in"

    def apply_chat_template(self, messages, **_):
        return [ord(c) % VOCAB for m in messages for c in m["role"] + m["content"]]

    def __call__(self, text, **_):
        return {"input_ids": [ord(c) % VOCAB for c in text]}

    def decode(self, ids, **_):
        return "".join(chr(97 + i % 26) for i in ids)


@dataclass
class StandInResult:
    prompt_ids: list
    token_ids: list
    text: str
    finish_reason: str = "length"
    bytes_up: int = 0
    bytes_down: int = 0
    round_trips: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


class StandInLM:
    """What the OpenAI front uses of a `SplitCausalLM`; `hold` (when set) keeps each generation running until set."""

    def __init__(self):
        self.tokenizer = StandInTokenizer()
        self.splittable = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=CONTEXT),
                                          lm_head=SimpleNamespace(weight=SimpleNamespace(shape=(VOCAB, 8))))
        self.plan, self.wire = SimpleNamespace(cuts=(1, 3)), "fp32"
        self.hold: threading.Event | None = None
        self.running = threading.Semaphore(0)

    def generate(self, prompt_ids, config, on_token=None):
        self.running.release()
        if self.hold is not None:
            self.hold.wait(30)
        tokens = [1, 2, 3][: config.max_new_tokens]
        return StandInResult(list(prompt_ids), tokens, self.tokenizer.decode(tokens))

    def close(self):
        pass


@pytest.fixture
def edge():
    """Starts the app under uvicorn on 127.0.0.1 with the given settings; returns (lm, port)."""
    import uvicorn

    started = []

    def start(**settings):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        defaults = {"model_name": "stand-in", "api_key": KEY,
                    "allowed_hosts": (host_entry("127.0.0.1", port), host_entry("localhost", port))}
        lm = StandInLM()
        server = uvicorn.Server(uvicorn.Config(build_app(lm, EdgeSettings(**{**defaults, **settings})),
                                               log_level="warning", access_log=False))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
        thread.start()
        started.append((server, thread, lm))
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return lm, port

    yield start
    for server, thread, lm in started:
        if lm.hold is not None:
            lm.hold.set()
        server.should_exit = True
        thread.join(10)


def raw_request(port: int, head: str, body: bytes = b"", *, timeout: float = 5.0) -> tuple[int, dict, socket.socket]:
    """Sends `head` (request line and headers) and `body`, then reads one response: (status, JSON body, socket)."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    connection.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(65536)
        assert chunk, f"connection closed without a response: {received!r}"
        received += chunk
    header, _, rest = received.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in header.split(b"\r\n") if line.lower().startswith(b"content-length")]
    length = int(lengths[0])
    while len(rest) < length:
        rest += connection.recv(65536)
    return int(header.split()[1]), json.loads(rest[:length]), connection


def head(port: int, *, host: str | None = None, key: str | None = KEY, length: int | None = None,
         method: str = "POST /v1/chat/completions", extra: str = "") -> str:
    lines = [f"{method} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Content-Type: application/json"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return "\n".join(lines) + "\n" + extra  # raw_request ends the head with its blank line


def chat(**change) -> bytes:
    return json.dumps({"model": "stand-in", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                       **change}).encode()


def test_host_allowed():
    allowed = ("127.0.0.1:8000", "localhost:8000", "edge.internal")
    for header in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST:8000", "localhost.:8000", "edge.internal",
                   "edge.internal:443", "Edge.Internal:8000"):
        assert host_allowed(header, allowed), header
    for header in (None, "", "attacker.example", "attacker.example:8000", "localhost:8001", "localhost", "127.0.0.1",
                   "127.0.0.1:8000@attacker.example", "localhost:80:8000", "[::1]:8000", "127.0.0.1:x"):
        assert not host_allowed(header, allowed), header
    assert host_allowed("[0:0::1]:8000", (host_entry("::1", 8000),))
    assert host_allowed("edge.internal", ("edge.internal:80",))  # no port in the header: the default port
    # listening on every interface: any IP literal, never a name that is not on the list
    assert host_allowed("192.0.2.7:8000", allowed, any_ip=True) and host_allowed("[2001:db8::1]:8000", (), any_ip=True)
    assert not host_allowed("attacker.example:8000", allowed, any_ip=True)


def test_a_rebinding_host_is_refused_without_reading_the_body(edge):
    _, port = edge()
    for method in ("GET /v1/models", "POST /v1/chat/completions"):
        status, body, _ = raw_request(port, head(port, host="attacker.example", length=HUGE, method=method))
        assert status == 403 and body["error"]["code"] == "host_not_allowed", body
    status, body, _ = raw_request(port, head(port, host=f"localhost:{port}", method="GET /v1/models"))
    assert status == 200 and body["data"][0]["id"] == "stand-in"


@pytest.mark.parametrize("key", [None, "wrong" * 9])
def test_no_or_wrong_key_gets_401_before_the_body_is_read(edge, key):
    """The 300 MiB body is never sent: the 401 must come on the headers alone (it used to come after the body)."""
    _, port = edge()
    started = time.monotonic()
    status, body, connection = raw_request(port, head(port, key=key, length=HUGE))
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and time.monotonic() - started < 5
    assert connection.recv(1) == b""  # the connection is closed: the rest of the body is not read


def test_a_body_over_the_cap_gets_413_declared_or_chunked(edge):
    _, port = edge(max_request_bytes=4096)
    status, body, _ = raw_request(port, head(port, length=HUGE))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # chunked, no Content-Length: refused once the body passes the cap, with no final chunk ever sent
    chunk = b"x" * 1024
    chunks = (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") * 8
    status, body, connection = raw_request(port, head(port, extra="Transfer-Encoding: chunked\n"), chunks)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert connection.recv(1) == b""
    # under the cap, chunked or not, the request is served
    whole = chat()
    status, body, _ = raw_request(port, head(port, extra="Transfer-Encoding: chunked\n"),
                                  f"{len(whole):x}\r\n".encode() + whole + b"\r\n0\r\n\r\n")
    assert status == 200 and body["choices"][0]["message"]["content"] == "bcd", body
    status, body, _ = raw_request(port, head(port, length=len(whole)), whole)
    assert status == 200


def test_the_openai_client_works_with_the_key_and_is_refused_without_it(edge):
    openai = pytest.importorskip("openai")
    _, port = edge()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data] == ["stand-in"]
    reply = client.chat.completions.create(model="stand-in", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.choices[0].message.content == "bcd"
    stranger = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


@pytest.mark.parametrize("body, param, words", [
    (chat(max_tokens=10**12), "max_tokens", "maximum context length"),
    (chat(max_completion_tokens=2**70), "max_tokens", "maximum context length"),
    (chat(n=10**9), None, "n=1"),
    (chat(messages=[{"role": "user", "content": ""}] * 5000), "messages", "at most 4096"),
    (chat(messages=[{"role": "user", "content": "x" * 500}]), "max_tokens", "maximum context length"),
    (chat(seed=2**80), "seed", "less than or equal"),
    (chat(stop=["x"] * 1000), "stop", "at most 4 stop strings"),
    (json.dumps({"model": "stand-in", "prompt": list(range(50)) * 40, "max_tokens": 3}).encode(), "max_tokens",
     "maximum context length"),
    (b'{"model": "stand-in", "messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", None, "parsing the body"),
    (b'{"model": "stand-in", "max_tokens": ' + b"9" * 100000 + b', "messages": []}', None, ""),
])
def test_huge_fields_get_400_with_a_clear_message(edge, body, param, words):
    _, port = edge()
    path = "POST /v1/completions" if b'"prompt"' in body else "POST /v1/chat/completions"
    status, reply, _ = raw_request(port, head(port, length=len(body), method=path), body)
    assert status == 400, reply
    assert reply["error"]["param"] == param and words in reply["error"]["message"], reply


def test_requests_in_flight_are_capped(edge):
    lm, port = edge(max_pending=2)
    lm.hold = threading.Event()
    answers = []

    def ask():
        answers.append(raw_request(port, head(port, length=len(chat())), chat(), timeout=30)[0])

    askers = [threading.Thread(target=ask) for _ in range(2)]
    for asker in askers:
        asker.start()
    assert lm.running.acquire(timeout=10)  # one generation runs, the other request waits for the lock
    deadline = time.monotonic() + 10
    while True:  # the second request reaches the guard a moment later; until then /v1/models is served
        status, body, _ = raw_request(port, head(port, method="GET /v1/models"))
        if status == 429 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    lm.hold.set()
    for asker in askers:
        asker.join(30)
    assert answers == [200, 200]
    assert raw_request(port, head(port, length=len(chat())), chat())[0] == 200


def test_bodies_that_never_finish_hold_no_place_for_long(edge):
    """Before: each request announcing a body it never finished took one of the places in flight, with no deadline; as
    many as the cap locked every other client out for good. Now they get 408 after the body deadline, and meanwhile
    hold reading places only."""
    _, port = edge(max_pending=3, body_timeout=1.0)
    stalled = []
    for _ in range(3):
        connection = socket.create_connection(("127.0.0.1", port), timeout=10)
        connection.sendall(head(port, length=1000).replace("\n", "\r\n").encode() + b"\r\n" + b'{"model": ')
        stalled.append(connection)
    time.sleep(0.3)
    status, body, _ = raw_request(port, head(port, length=len(chat())), chat())
    assert status == 429  # every reading place is taken, for at most the deadline
    for connection in stalled:
        received = connection.recv(65536)
        assert received.split()[1] == b"408", received[:80]
        connection.close()
    assert raw_request(port, head(port, length=len(chat())), chat())[0] == 200
