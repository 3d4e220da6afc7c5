"""The generators and judges of `bench fuzz --target enclave|slip|accelerator|edge` without a server: every category's
messages decode or raise `WireError` (never anything else), a target's valid FORWARD is accepted by its judge, and
its malformed ones never are."""

import random

import pytest

from splitveil.core.errors import WireError
from splitveil.harness.fuzz_service import CATEGORIES as SERVE_CATEGORIES
from splitveil.harness.fuzz_service import FrameKind, Target, _accepts, float_shape, valid_forward
from splitveil.harness.fuzz_targets import TARGETS
from splitveil.harness.fuzz_targets import accelerator, enclave, slip
from splitveil.harness.fuzz_targets.common import PROTOCOL_CATEGORIES, replay, reorder, weighted
from splitveil.wire.frame import decode_frame

SESSION = bytes(range(16))
GROUPS = {0: (24, 8), 1: (8, 16), 2: (101, 8)}  # group id -> (m, n)


def decodes_or_refuses(message) -> None:
    if isinstance(message, bytes):
        try:
            decode_frame(message, max_bytes=1 << 20)
        except WireError as error:
            assert error.message and "\n" not in error.message


def slip_target(**fields) -> Target:
    return Target(**{"session": SESSION, "seq": 3, "hidden": 16, "part": 0, "max_frame_bytes": 1 << 20,
                     "make_forward": slip.make_forward, "extra": {"groups": GROUPS}, **fields})


def test_every_target_is_registered_with_categories():
    assert {"serve", "enclave", "slip", "accelerator"} <= set(TARGETS.names())
    for name in ("enclave", "slip", "accelerator"):
        categories = TARGETS.get(name).categories()
        assert set(PROTOCOL_CATEGORIES) | {"replay", "reorder"} <= set(categories.names()), name
    assert "replay" not in SERVE_CATEGORIES.names()  # the serve target's record stays what it was


@pytest.mark.parametrize("seed", range(40))
def test_slip_generators_decode_or_refuse_and_only_valid_frames_are_accepted(seed):
    rng = random.Random(seed)
    t = slip_target()
    assert slip.slip_accepts(slip.make_forward(rng, t), t, FrameKind.RESULT)
    for name in slip.CATEGORIES.names():
        messages = slip.CATEGORIES.get(name).generate(rng, slip_target(foreign=bytes(16)))
        for message in messages:
            decodes_or_refuses(message)
        if name in ("slip_header", "slip_form"):
            assert not any(slip.slip_accepts(m, t, FrameKind.RESULT) for m in messages), name


def test_slip_judge_refuses_a_wrong_sequence_session_or_count():
    rng, t = random.Random(0), slip_target()
    assert not slip.slip_accepts(slip.make_forward(rng, slip_target(seq=4)), t, FrameKind.RESULT)
    assert not slip.slip_accepts(slip.make_forward(rng, slip_target(session=bytes(16))), t, FrameKind.RESULT)
    assert not slip.slip_accepts(slip.slip_forward(rng, t, group=0, positions=1, count=7), t, FrameKind.RESULT)


def test_replay_and_reorder_send_a_spent_or_future_sequence_number():
    rng, t = random.Random(1), slip_target()
    first, again = replay(rng, t)
    assert first == again and slip.slip_accepts(first, t, FrameKind.RESULT)
    ahead, _ = reorder(rng, t)
    assert not slip.slip_accepts(ahead, t, FrameKind.RESULT)


@pytest.mark.parametrize("seed", range(20))
def test_accelerator_frames_have_the_feature_map_shape(seed):
    rng = random.Random(seed)
    t = Target(session=SESSION, seq=2, hidden=4 * 3 * 3, part=1, row_shape=(4, 3, 3), extra={"max_batch": 64})
    frame = valid_forward(rng, t)
    assert decode_frame(frame).shape[1:] == (4, 3, 3) and _accepts(frame, t, FrameKind.RESULT)
    assert float_shape(t, 5) == (5, 4, 3, 3)
    assert not _accepts(valid_forward(rng, Target(session=SESSION, seq=2, hidden=36, part=1)), t, FrameKind.RESULT)
    for name in accelerator.CATEGORIES.names():
        for message in accelerator.CATEGORIES.get(name).generate(rng, t):
            decodes_or_refuses(message)


def test_accelerator_oversize_is_rare_in_the_case_plan():
    plan = weighted(accelerator.CATEGORIES.names(), accelerator.WEIGHTS, default=64)
    assert plan.count("oversize") == 1 and plan.count("bit_flip") == 64


@pytest.fixture
def keyed():
    """An enclave connection's Target with keys agreed against a local executor handshake."""
    from splitveil.tee.channel import AttestationKey, Hello, Quote, executor_handshake

    key, measurement = AttestationKey.generate(), bytes(32)
    public = AttestationKey.from_public_bytes(key.public_bytes())
    t = Target(session=SESSION, seq=1, hidden=enclave.HELLO_BYTES, part=enclave.HELLO_PART,
               make_forward=enclave.make_forward,
               extra={"attestation": public, "measurement": measurement, "channel": None, "honest": {},
                      "inner": Target(hidden=32, part=1)})
    hello = enclave.hello(t)
    quote, executor = executor_handshake(Hello.from_bytes(hello), SESSION, attestation=key, measurement=measurement)
    t.extra["channel"] = t.extra["handshake"].finish(Quote.from_bytes(quote.to_bytes()))
    t.part = enclave.SEALED_PART
    return t, executor


def test_enclave_valid_messages_are_accepted_and_open_on_the_executor_side(keyed):
    t, executor = keyed
    rng = random.Random(0)
    client = enclave.EnclaveFuzzClient("ws://127.0.0.1:1", token="t", ca_file=None, hidden=64)
    message = enclave.make_forward(rng, t)
    assert client.accepts(message, t, FrameKind.RESULT)
    inner = executor.open(decode_frame(message).tensor.numpy().tobytes())
    assert decode_frame(inner).kind == FrameKind.OPEN  # no inner session yet: the inner OPEN


@pytest.mark.parametrize("seed", range(30))
def test_enclave_tampered_messages_are_never_accepted(keyed, seed):
    t, _ = keyed
    rng = random.Random(seed)
    client = enclave.EnclaveFuzzClient("ws://127.0.0.1:1", token="t", ca_file=None, hidden=64)
    for name in ("bad_tag", "wrong_part", "second_hello"):
        for message in enclave.CATEGORIES.get(name).generate(rng, t):
            decodes_or_refuses(message)
            assert not client.accepts(message, t, FrameKind.RESULT), name
    for name in enclave.CATEGORIES.names():
        for message in enclave.CATEGORIES.get(name).generate(rng, t):
            decodes_or_refuses(message)


# -- the edge target (`splitveil edge`, hostile HTTP) -------------------------------------------------------------


def edge_target() -> Target:
    return Target(extra={"host": "127.0.0.1:8000", "model": "tiny", "vocab": 101, "context": 256, "cap": 2**20,
                         "max_tokens": 2})


def edge_body(request) -> bytes:
    return request.data.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("seed", range(12))
def test_edge_cases_are_http_requests_with_a_verdict(seed):
    from splitveil.harness.fuzz_targets import edge_cases

    rng = random.Random(seed)
    verdicts = {edge_cases.OK, edge_cases.REFUSED, edge_cases.HTTP_LAYER, edge_cases.EITHER, edge_cases.NO_ANSWER}
    for name in edge_cases.CATEGORIES.names():
        requests = edge_cases.CATEGORIES.get(name).generate(rng, edge_target())
        assert requests, name
        for request in requests:
            line = request.data.split(b"\r\n", 1)[0]
            whole = b"\r\n\r\n" in request.data or request.expect == edge_cases.NO_ANSWER  # or begun and abandoned
            assert line.endswith((b" HTTP/1.1", b" HTTP/1.0")) and whole, (name, line[:60])
            assert request.expect in verdicts and len(request.data) < 3 * 2**20, name


@pytest.mark.parametrize("seed", range(30))
def test_edge_valid_requests_pass_the_schemas_and_wrong_types_never_do(seed):
    """The generators' verdicts against the edge's own schemas (strict JSON types): a request called valid is valid,
    a wrong type is refused, a body called malformed is no JSON object."""
    import json

    from splitveil.edge.openai.schemas import ChatCompletionRequest, CompletionRequest
    from splitveil.harness.fuzz_targets import edge_cases

    rng, t = random.Random(seed), edge_target()
    schemas = {edge_cases.CHAT: ChatCompletionRequest, edge_cases.COMPLETIONS: CompletionRequest}
    for name in ("valid", "unknown_fields", "wrong_types", "malformed_json"):
        for request in edge_cases.CATEGORIES.get(name).generate(rng, t):
            path = request.data.split(b" ")[1].decode()
            if path not in schemas:
                continue
            body = edge_body(request)
            if name == "malformed_json":
                assert request.expect == edge_cases.EITHER or edge_cases.must_refuse(body)
                continue
            data = json.loads(body)
            valid = data.get("model") == "tiny"
            try:
                parsed = schemas[path].model_validate(data)
            except ValueError:
                valid = False
            else:  # token ids are checked against the vocabulary by the engine
                prompt = getattr(parsed, "prompt", "")
                valid = valid and not (isinstance(prompt, list) and not all(0 <= i < 101 for i in prompt if isinstance(i, int)))
            assert valid == (request.expect == edge_cases.OK), (name, body[:300])


def test_edge_judge():
    from splitveil.harness.fuzz_core import Outcome
    from splitveil.harness.fuzz_targets.edge import Answer, judge
    from splitveil.harness.fuzz_targets.edge_cases import HTTP_LAYER, NO_ANSWER, OK, REFUSED, EdgeRequest

    error = b'{"error": {"message": "no", "type": "invalid_request_error", "param": null, "code": null}}'
    completion = b'{"choices": [{"text": "x"}]}'

    def verdict(request, answer):
        outcome = Outcome("c")
        return judge(request, answer, outcome), outcome.failure

    assert verdict(EdgeRequest(b"", OK), Answer(200, {}, completion, True)) == (True, None)
    assert verdict(EdgeRequest(b"", OK), Answer(429, {}, error, True)) == (True, None)
    assert verdict(EdgeRequest(b"", OK), Answer(400, {}, error, True)) == (False, "bad_reply")
    assert verdict(EdgeRequest(b"", REFUSED), Answer(200, {}, completion, True)) == (False, "accepted_malformed")
    assert verdict(EdgeRequest(b"", REFUSED), Answer(500, {}, error, True)) == (False, "http_5xx")
    assert verdict(EdgeRequest(b"", REFUSED), Answer(400, {}, b"Invalid HTTP request received.", True)) == (False, "bad_reply")
    assert verdict(EdgeRequest(b"", HTTP_LAYER), Answer(400, {}, b"Invalid HTTP request received.", True)) == (True, None)
    assert verdict(EdgeRequest(b"", REFUSED, statuses=(401,)), Answer(429, {}, error, True)) == (False, "bad_reply")
    assert verdict(EdgeRequest(b"", REFUSED, statuses=(401,)), Answer(403, {}, error, True)) == (False, "bad_reply")
    assert verdict(EdgeRequest(b"", REFUSED), Answer()) == (False, "closed_without_error")
    assert verdict(EdgeRequest(b"", NO_ANSWER, send="hold"), Answer()) == (True, None)
    stream = {"content-type": "text/event-stream"}
    assert verdict(EdgeRequest(b"", OK), Answer(200, stream, b'data: {"choices": []}\n\ndata: [DONE]\n\n', True))[0]
    assert verdict(EdgeRequest(b"", OK), Answer(200, stream, b'data: {"choices": []}\n\n', True)) == (False, "bad_reply")


def test_edge_answers_are_read_from_the_socket_as_sent():
    import socket
    import threading

    from splitveil.harness.fuzz_targets.edge import read_answer

    ours, theirs = socket.socketpair()
    events = b'data: {"a": 1}\n\ndata: [DONE]\n\n'
    reply = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
             + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (events[:9], events[9:])) + b"0\r\n\r\n")
    threading.Thread(target=lambda: [theirs.sendall(reply[i:i + 7]) for i in range(0, len(reply), 7)]).start()
    answer = read_answer(ours, 5.0, slow=0.001)
    assert answer.status == 200 and answer.complete and answer.body == events
    theirs.sendall(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\n{}")
    assert read_answer(ours, 5.0).body == b"{}"
    theirs.sendall(b"garbage\r\n\r\n")
    assert read_answer(ours, 5.0).malformed
    ours.close()
    theirs.close()


def test_edge_flood_is_hundreds_of_streams_and_rare():
    from splitveil.harness.fuzz_targets import edge_cases

    requests = edge_cases.flood(random.Random(3), edge_target())
    assert len(requests) >= 64 and all(r.send == "flood" and b'"stream": true' in edge_body(r) for r in requests)
    plan = weighted(edge_cases.CATEGORIES.names(), edge_cases.WEIGHTS, default=edge_cases.DEFAULT_WEIGHT)
    assert plan.count("flood") == 1 and plan.count("valid") == edge_cases.DEFAULT_WEIGHT
    assert "edge" in TARGETS.names() and TARGETS.get("edge").categories() is edge_cases.CATEGORIES
