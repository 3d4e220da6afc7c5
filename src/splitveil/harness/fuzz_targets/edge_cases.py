"""Hostile HTTP for `bench fuzz --target edge`: the generators (pure functions of a seeded `random.Random` and a
`Target`) and the judge of one answer, without a server.

A case is a list of `EdgeRequest`s: raw bytes for one TCP connection each (`{key}` stands for the edge's API key),
how to send them (`send`), and what a right answer is (`expect`), decided here from the bytes alone with an oracle
independent of the edge: `json.loads` for the body and the OpenAI API's JSON types for its fields (a string is not an
integer, a boolean is not a token id). `t.extra` holds what a generator needs to know of the edge under test: `host`
(its Host header value), `model` (the served id), `vocab`, `context` (tokens), `cap` (its --max-request-bytes) and
`max_tokens` (the budget of valid requests, kept small: every valid request is a generation).
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass

from splitveil.core.registry import Registry
from splitveil.harness.fuzz_service import Category, Target, register_category

KEY = "{key}"  # replaced by the edge's API key when sent
CHAT, COMPLETIONS, MODELS = "/v1/chat/completions", "/v1/completions", "/v1/models"
# what a right answer is
OK = "ok"  # 2xx (429 when too many requests are in flight); a streamed 2xx ends with `data: [DONE]`
REFUSED = "refused"  # 4xx with the OpenAI error JSON {"error": {"message", "type", "param", "code"}}
HTTP_LAYER = "http_layer"  # malformed HTTP: 4xx (uvicorn's own plain-text 400 counts) or a close, never 2xx/5xx
EITHER = "either"  # valid or not by the API's own vagueness: 2xx or an OpenAI 4xx
NO_ANSWER = "no_answer"  # the client leaves before the request is complete: nothing is owed, a 4xx or close is fine


@dataclass(frozen=True)
class EdgeRequest:
    data: bytes  # the raw HTTP request (`{key}` filled in when sent)
    expect: str = REFUSED
    statuses: tuple[int, ...] = ()  # with REFUSED: the only right statuses (empty: any 4xx)
    send: str = "whole"  # "whole"; "dribble" (byte by byte, `pause` s apart); "hold" (send, wait `pause` s, close);
    # "stream_slow" (read the answer a few bytes at a time); "stream_leave" (close after the first bytes of the answer)
    pause: float = 0.0


CATEGORIES: Registry[Category] = Registry("edge fuzz category")


def _category(name: str):
    return register_category(CATEGORIES, name, "no", transport="http")


def http_request(t: Target, method: str, path: str, body: bytes | None = None, *, host: str | None = "",
                 key: str | None = KEY, headers: tuple[str, ...] = (), length: str | None = "auto",
                 chunks: list[bytes] | None = None, version: str = "HTTP/1.1") -> bytes:
    """The bytes of one request. `host=""`: the edge's own; None: no Host header. `length="auto"`: the body's true
    Content-Length; None: none; any other text is sent as is. `chunks`: a chunked body instead of `body`."""
    lines = [f"{method} {path} {version}"]
    if host is not None:
        lines.append(f"Host: {host or t.extra['host']}")
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    if body is not None or chunks is not None:
        lines.append("Content-Type: application/json")
    if chunks is not None:
        lines.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    else:
        payload = body or b""
        if length == "auto" and body is not None:
            lines.append(f"Content-Length: {len(body)}")
        elif length not in (None, "auto"):
            lines.append(f"Content-Length: {length}")
    lines += list(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def _words(rng: random.Random, low: int = 1, high: int = 6) -> str:
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))
                    for _ in range(rng.randint(low, high)))


def valid_body(rng: random.Random, t: Target, *, chat: bool | None = None, stream: bool | None = None) -> tuple[str, dict]:
    """(path, body) of a request the edge must serve: a short prompt, a small budget, optional sampling fields."""
    chat = rng.random() < 0.5 if chat is None else chat
    stream = rng.random() < 0.3 if stream is None else stream
    body: dict = {"model": t.extra["model"], "max_tokens": rng.randint(1, t.extra["max_tokens"])}
    if chat:
        roles = ["system", "developer", "user", "assistant"]
        body["messages"] = [{"role": rng.choice(roles), "content": rng.choice([_words(rng), [{"type": "text", "text": _words(rng)}]])}
                            for _ in range(rng.randint(0, 2))] + [{"role": "user", "content": _words(rng)}]
    else:
        body["prompt"] = rng.choice([_words(rng), [_words(rng)], [rng.randrange(t.extra["vocab"]) for _ in range(rng.randint(1, 8))]])
    for name, value in (("temperature", rng.choice([0, 0.0, 0.7, 2])), ("top_p", rng.choice([0.5, 1])),
                        ("seed", rng.randint(-2**63, 2**64 - 1)), ("stop", rng.choice([".", ["x", "yz"], []])),
                        ("user", _words(rng)), ("n", 1), ("presence_penalty", 0)):
        if rng.random() < 0.25:
            body[name] = value
    if stream:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": rng.random() < 0.5}
    return (CHAT if chat else COMPLETIONS), body


def post_json(t: Target, path: str, body, **options) -> bytes:
    return http_request(t, "POST", path, json.dumps(body).encode(), **options)


@_category("valid")
def valid(rng, t):
    """Valid chat and text completions, streamed or not, with and without optional fields; now and then
    `GET /v1/models`."""
    if rng.random() < 0.1:
        return [EdgeRequest(http_request(t, "GET", rng.choice([MODELS, f"{MODELS}/{t.extra['model']}"])), OK)]
    return [EdgeRequest(post_json(t, *valid_body(rng, t)), OK)]


def _junk(rng: random.Random, depth: int = 0):
    """A random JSON value (an unknown field's value)."""
    pick = rng.randrange(6 if depth < 3 else 4)
    if pick == 0:
        return rng.choice([None, True, False])
    if pick == 1:
        return rng.choice([0, -1, 2**70, 1.5e300, -0.0])
    if pick == 2:
        return _words(rng)
    if pick == 3:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randint(0, 12)))
    if pick == 4:
        return [_junk(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_words(rng, 1, 1): _junk(rng, depth + 1) for _ in range(rng.randint(0, 4))}


@_category("unknown_fields")
def unknown_fields(rng, t):
    """A valid request with fields the API does not know, at the top and inside messages: accepted and ignored."""
    path, body = valid_body(rng, t)
    for _ in range(rng.randint(1, 5)):
        body[f"x_{_words(rng, 1, 1)}"] = _junk(rng)
    if path == CHAT:
        body["messages"][-1][f"x_{_words(rng, 1, 1)}"] = _junk(rng)
    return [EdgeRequest(post_json(t, path, body), OK)]


def must_refuse(body: bytes) -> bool:
    """Whether `body` is not a JSON object at all (then no endpoint may accept it)."""
    try:
        return not isinstance(json.loads(body), dict)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return True


@_category("malformed_json")
def malformed_json(rng, t):
    """A valid body cut short, with a byte changed or inserted, with garbage after it, in bad UTF-8, empty, or not
    an object; right only when the result is not a JSON object (`json.loads` is the oracle), else either."""
    path, body = valid_body(rng, t, stream=False)
    data = json.dumps(body).encode()
    style = rng.randrange(7)
    if style == 0:
        data = data[: rng.randrange(len(data))]
    elif style == 1:
        at = rng.randrange(len(data))
        data = data[:at] + bytes([rng.randrange(256)]) + data[at + 1:]
    elif style == 2:
        at = rng.randrange(len(data))
        data = data[:at] + rng.choice([b"\x00", b"\xff\xfe", b"{", b"]", b",", b'"', b"\\"]) + data[at:]
    elif style == 3:
        data = data + rng.choice([b"}", b"x", b" {}", b"\x00", b",1"])
    elif style == 4:
        data = data.replace(b'"model"', b'"\xc3\x28model"', 1)
    elif style == 5:
        data = rng.choice([b"", b"null", b"[]", b'"text"', b"1", b"true", json.dumps([body]).encode()])
    else:
        data = data.replace(b": ", b": NaN, \"x\": ", 1) if rng.random() < 0.5 else data.replace(b"{", b"{'", 1)
    return [EdgeRequest(http_request(t, "POST", path, data), REFUSED if must_refuse(data) else EITHER)]


WRONG = {  # field -> values of the wrong JSON type (or out of the API's range), for both endpoints
    "model": [5, None, [], {}, True, ["x"]],
    "max_tokens": ["5", True, [], {}, 1.5, 0, -1],
    "temperature": ["0", [], {}, True, -0.1, 2.5],
    "top_p": ["1", 0, 1.5, [], False],
    "seed": ["1", 1.5, True, 2**64, -(2**63) - 1, [1]],
    "stop": [5, [5], {}, ["a", "b", "c", "d", "e"], [None], True],
    "stream": ["true", 1, [], {}, "yes"],
    "stream_options": ["x", [], 5, {"include_usage": "yes"}],
    "n": [2, "1", 0, True, []],
    "presence_penalty": ["x", 0.5, []],
    "frequency_penalty": [1, {}],
    "logit_bias": [{"1": 5}, "x", 5],
    "user": [5, [], {}],
}
WRONG_CHAT = {
    "messages": ["hi", {}, [], [5], [None], [{"role": 5, "content": "x"}], [{"role": "user", "content": 5}],
                [{"role": "tool", "content": "x"}], [{"content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}],
                [{"role": "user", "content": [{"type": "text", "text": 5}]}], [{"role": "user", "content": [5]}],
                [{"role": "user", "content": "x", "name": 5}]],
    "max_completion_tokens": ["5", 0, True],
    "logprobs": [True, "x"],
    "tools": [[{"type": "function"}], "x"],
    "response_format": [{"type": "json_object"}, "x", {"type": 5}],
}
WRONG_COMPLETIONS = {
    "prompt": [5, None, {}, [], [[1]], [1, "a"], [True], [-1], [2**40], ["a", "b"], [1.5], [None]],
    "echo": [True, "x"],
    "logprobs": [1, "x"],
    "suffix": ["x", 5],
    "best_of": [2, "1"],
}


@_category("wrong_types")
def wrong_types(rng, t):
    """A valid request with one field of the wrong type or out of range (each field of each endpoint in turn):
    4xx with the error JSON; a field left out that is required, likewise."""
    path, body = valid_body(rng, t)
    table = {**WRONG, **(WRONG_CHAT if path == CHAT else WRONG_COMPLETIONS)}
    field = rng.choice(sorted(table))
    if rng.random() < 0.1 and field in ("model", "messages", "prompt"):
        body.pop(field, None)  # a required field missing
    else:
        value = rng.choice(table[field])
        body[field] = value
        if field == "stream_options":
            body["stream"] = True  # only its own type is wrong
    return [EdgeRequest(post_json(t, path, body), REFUSED)]


@_category("huge_fields")
def huge_fields(rng, t):
    """Under the body cap: a prompt far beyond the context, 100,000-digit numbers, arrays of 100,000 items, nesting
    100,000 deep, more messages or stop strings than allowed; and huge values where they are harmless (an unknown
    field, `user`, a 100,000-digit fraction as temperature): those must be served."""
    path, body = valid_body(rng, t, stream=False)
    cap, context = t.extra["cap"], t.extra["context"]
    big = min(cap // 2, 500_000)
    digits = rng.choice([1000, 100_000])
    style = rng.randrange(9)
    if style == 0:  # a prompt of far more tokens than the context (one token per few characters at least)
        text = _words(rng) * (max(context * 8, 4096) // 10)
        if path == CHAT:
            body["messages"][-1]["content"] = text[:big]
        else:
            body["prompt"] = rng.choice([text[:big], [1] * min(context * 4, big // 4)])
        return [EdgeRequest(post_json(t, path, body), REFUSED)]
    if style == 1:  # a number of 100,000 digits where an integer goes
        field = rng.choice(["max_tokens", "seed", "n"])
        data = json.dumps({**body, field: 0}).replace(f'"{field}": 0', f'"{field}": {"9" * digits}').encode()
        return [EdgeRequest(http_request(t, "POST", path, data), REFUSED)]
    if style == 2:  # exponent overflow and 100,000-digit floats out of range
        value = rng.choice(["1e999999", "-1e999999", "1" + "0" * digits + ".5"])
        data = json.dumps({**body, "temperature": 0}).replace('"temperature": 0', f'"temperature": {value}').encode()
        return [EdgeRequest(http_request(t, "POST", path, data), REFUSED)]
    if style == 3:  # a 100,000-digit fraction in range: a valid temperature
        data = json.dumps({**body, "temperature": 0}).replace('"temperature": 0', '"temperature": 0.' + "3" * digits).encode()
        return [EdgeRequest(http_request(t, "POST", path, data), OK)]
    if style == 4:  # nesting 100,000 deep where a string goes, or as an unknown field's value
        depth = rng.choice([1000, 100_000])
        nested = rng.choice(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth])
        field = rng.choice(["model", "x_nested"])
        data = json.dumps({**body, field: 0}).replace(f'"{field}": 0', f'"{field}": {nested}').encode()
        expect = REFUSED if field == "model" else EITHER  # a deep but valid unknown value: served or refused as too deep
        return [EdgeRequest(http_request(t, "POST", path, data), expect)]
    if style == 5:  # too many messages, stop strings, or a long array of token ids
        if path == CHAT:
            body["messages"] = [{"role": "user", "content": "x"}] * rng.choice([4097, 20_000])
        else:
            body["stop"] = ["x"] * rng.choice([5, 10_000])
        return [EdgeRequest(post_json(t, path, body), REFUSED)]
    if style == 6:  # a huge stop string (never in the text) and a huge user: valid
        body[rng.choice(["stop", "user"])] = "q" * (big // 2)
        return [EdgeRequest(post_json(t, path, body), OK)]
    if style == 7:  # a huge unknown field
        body["x_" + _words(rng, 1, 1)] = rng.choice(["a" * big, list(range(big // 8)), {str(i): i for i in range(big // 16)}])
        return [EdgeRequest(post_json(t, path, body), OK)]
    model = "m" * big  # a huge model name: not the served one
    return [EdgeRequest(post_json(t, path, {**body, "model": model}), REFUSED, statuses=(404,))]


@_category("method_path")
def method_path(rng, t):
    """Wrong methods on the endpoints, unknown or odd paths, query strings: 404 or 405 with the error JSON."""
    style = rng.randrange(4)
    path, body = valid_body(rng, t, stream=False)
    data = json.dumps(body).encode()
    if style == 0:
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
        return [EdgeRequest(http_request(t, method, path, data if method != "GET" else None), REFUSED, statuses=(404, 405))]
    if style == 1:
        return [EdgeRequest(http_request(t, "POST", rng.choice([MODELS, f"{MODELS}/x"]), data), REFUSED, statuses=(404, 405))]
    if style == 2:
        odd = rng.choice(["/", "/v1", "/v2/chat/completions", "/v1/embeddings", "/v1/chat/completions/x", "/v1//completions",
                          "/v1/../v1/models/../../x", "/" + "a" * rng.choice([100, 8000]),
                          "/v1/completions%00", "/V1/COMPLETIONS"])
        return [EdgeRequest(http_request(t, "POST", odd, data), REFUSED, statuses=(404, 405))]
    query = rng.choice(["?stream=true", "?" + "a=1&" * 500, "?x=%ff%00", "?model=gpt-4"])
    return [EdgeRequest(http_request(t, "POST", path + query, data), OK)]  # a query string changes nothing


@_category("auth")
def auth(rng, t):
    """Missing, wrong, repeated or malformed Authorization headers: 401 with the error JSON, body unread."""
    path, body = valid_body(rng, t, stream=False)
    data = json.dumps(body).encode()
    headers = rng.choice([(), ("Authorization: Bearer wrong",), ("Authorization: Basic {key}",), ("Authorization: Bearer",),
                          ("Authorization: Bearer {key}", "Authorization: Bearer wrong"),
                          ("Authorization: Bearer wrong", "Authorization: Bearer {key}"),
                          ("Authorization: Bearer {key}", "Authorization: Bearer {key}"),
                          ("Authorization: Bearer {key}x",), ("Authorization: Bearer " + "A" * 6000,),
                          ("Authorization: Bearer {key} extra",)])
    return [EdgeRequest(http_request(t, "POST", path, data, key=None, headers=headers), REFUSED, statuses=(401,))]


@_category("host")
def host(rng, t):
    """A Host the edge is not reached by (DNS rebinding), none, two, or malformed: 403 with the error JSON."""
    path, body = valid_body(rng, t, stream=False)
    data = json.dumps(body).encode()
    name, _, port = t.extra["host"].rpartition(":")
    style = rng.randrange(3)
    if style == 0:
        value = rng.choice(["attacker.example", f"attacker.example:{port}", f"{name}:{int(port) + 1}", f"{name}:0",
                            f"{name}.evil:{port}", f"{name}@evil:{port}", "[::1", "a" * 5000, f"{name}:{port}/x", f"{name}:99999"])
        return [EdgeRequest(http_request(t, "POST", path, data, host=value), REFUSED, statuses=(403,))]
    if style == 1:  # two Host headers (one right), or none (HTTP/1.0 has no Host)
        both = rng.choice([(t.extra["host"], "attacker.example"), ("attacker.example", t.extra["host"]), (t.extra["host"],) * 2])
        return [EdgeRequest(http_request(t, "POST", path, data, host=both[0], headers=(f"Host: {both[1]}",)), REFUSED,
                            statuses=(400, 403))]
    version = rng.choice(["HTTP/1.1", "HTTP/1.0"])
    return [EdgeRequest(http_request(t, "POST", path, data, host=None, version=version), REFUSED, statuses=(400, 403))]


@_category("content_length")
def content_length(rng, t):
    """Content-Length lies: shorter than the body (the rest is cut off and then read as the next request), longer
    (the client waits, then leaves), not a number, negative, repeated, over the cap."""
    path, body = valid_body(rng, t, stream=False)
    data = json.dumps(body).encode()
    style = rng.randrange(5)
    if style == 0:  # shorter: a prefix of an object (never valid), then the rest read as a next request, which
        cut = rng.randrange(len(data))  # uvicorn may refuse (plain-text 400, connection closed) before the app answers
        return [EdgeRequest(http_request(t, "POST", path, data, length=str(cut)), HTTP_LAYER)]
    if style == 1:  # longer: nothing more comes; the edge answers 408 once its body timeout passes, or the client leaves
        return [EdgeRequest(http_request(t, "POST", path, data, length=str(len(data) + rng.choice([1, 100, 10_000]))),
                            NO_ANSWER, send="hold", pause=rng.choice([0.2, 1.0]))]
    if style == 2:
        value = rng.choice(["abc", "-5", "1e3", "0x10", " ", "99999999999999999999999999", "5, 5"])
        return [EdgeRequest(http_request(t, "POST", path, data, length=value), HTTP_LAYER)]
    if style == 3:  # two different Content-Lengths
        return [EdgeRequest(http_request(t, "POST", path, data, headers=(f"Content-Length: {len(data) - 1}",)), HTTP_LAYER)]
    over = t.extra["cap"] + rng.choice([1, 1000, 300 * 2**20])  # declared only: the edge answers before the body
    return [EdgeRequest(http_request(t, "POST", path, data[:100], length=str(over)), REFUSED, statuses=(413,))]


@_category("chunked")
def chunked(rng, t):
    """Chunked bodies: a valid one in pieces (served), one past the cap (413 as soon as the cap is passed),
    malformed chunk sizes or Transfer-Encoding with Content-Length (the HTTP layer refuses them)."""
    path, body = valid_body(rng, t, stream=False)
    data = json.dumps(body).encode()
    style = rng.randrange(4)
    if style == 0:
        cuts = sorted(rng.sample(range(1, len(data)), min(rng.randint(1, 8), len(data) - 1)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        return [EdgeRequest(http_request(t, "POST", path, chunks=pieces), OK)]
    if style == 1:
        size = rng.choice([64 * 1024, 256 * 1024])
        count = t.extra["cap"] // size + rng.randint(2, 4)
        filler = b'{"x": "' + b"a" * (size * count) + b'"}'
        pieces = [filler[i:i + size] for i in range(0, len(filler), size)]
        return [EdgeRequest(http_request(t, "POST", path, chunks=pieces), REFUSED, statuses=(413,))]
    if style == 2:
        raw = http_request(t, "POST", path, chunks=[data])
        head, _, rest = raw.partition(b"\r\n\r\n")
        broken = rng.choice([b"zz\r\n" + rest, b"-1\r\n" + rest, b"%x\r\n" % (len(data) + 50) + rest[rest.index(b"\r\n") + 2:],
                             b"ffffffffffffffffffff\r\n" + rest])
        return [EdgeRequest(head + b"\r\n\r\n" + broken, HTTP_LAYER, send="hold", pause=0.5)]
    return [EdgeRequest(http_request(t, "POST", path, chunks=[data], headers=(f"Content-Length: {len(data)}",)), HTTP_LAYER)]


@_category("slowloris")
def slowloris(rng, t):
    """A request dribbled a byte at a time (headers, then body): answered as if sent whole; or headers or a body
    begun and abandoned (the client leaves; nothing is owed)."""
    path, body = valid_body(rng, t, stream=False, chat=rng.random() < 0.5)
    if rng.random() < 0.3:
        body["model"] = 5  # a dribbled bad request
    data = post_json(t, path, body)
    expect = REFUSED if body["model"] == 5 else OK
    if rng.random() < 0.7:
        return [EdgeRequest(data, expect, send="dribble", pause=rng.choice([0.0, 0.002, 0.01]))]
    cut = rng.randrange(1, len(data))
    return [EdgeRequest(data[:cut], NO_ANSWER, send="hold", pause=rng.choice([0.5, 2.0]))]


@_category("streams")
def streams(rng, t):
    """Streamed completions whose client reads a few bytes at a time, or leaves after the first bytes of the answer
    (its generation must end, and the next request be served exactly)."""
    path, body = valid_body(rng, t, stream=True)
    mode = rng.choice(["stream_slow", "stream_leave", "whole"])
    return [EdgeRequest(post_json(t, path, body), OK if mode != "stream_leave" else NO_ANSWER, send=mode,
                        pause=0.005 if mode == "stream_slow" else 0.0)]


@_category("flood")
def flood(rng, t):
    """Hundreds of streamed requests at once on as many connections (each client leaves after the first bytes, or
    reads slowly): 200 streams while places last, then 429, never 5xx; the bystander keeps its turn."""
    count = rng.choice([64, 200, 500, 1000])
    requests = []
    for _ in range(count):
        path, body = valid_body(rng, t, stream=True)
        body["max_tokens"] = 1
        requests.append(EdgeRequest(post_json(t, path, body), OK, send="flood"))
    return requests


#: relative frequencies: costly categories are rare (a flood is hundreds of messages, a slowloris takes seconds)
WEIGHTS = {"flood": 1, "slowloris": 4, "content_length": 8, "streams": 8, "chunked": 8, "huge_fields": 8}
DEFAULT_WEIGHT = 16
