"""`splitveil edge` as a real process, its trunk on a real `splitveil serve` over TLS, driven by the official `openai`
client: greedy chat and text completions, streaming and not, give the tokens of the split's own `generate`."""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from splitveil.serve.process import ServerProcess, free_port

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.network, pytest.mark.model]

MODEL, CUTS = "smollm2-135m", (2, 28)
QUESTION = "Name two primary colours."


@pytest.fixture(scope="module")
def edge_url():
    """`splitveil serve` (the trunk, TLS + token) and `splitveil edge --server` in front of it."""
    with ServerProcess(MODEL, CUTS) as server:
        port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "splitveil.cli.main", "edge", "--server", server.url, "--ca", str(server.cert),
                   "--token-file", str(server.token_file), "--model", MODEL, "--split", ",".join(map(str, CUTS)),
                   "--port", str(port)]
        edge = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 180
            while True:
                try:
                    urllib.request.urlopen(f"{url}/v1/models", timeout=2).read()
                    break
                except OSError:
                    if edge.poll() is not None or time.monotonic() > deadline:
                        edge.kill()
                        pytest.fail(f"splitveil edge did not start: {edge.communicate(timeout=5)[0][-2000:]}")
                    time.sleep(0.3)
            yield url
        finally:
            edge.terminate()
            try:
                edge.wait(15)
            except subprocess.TimeoutExpired:
                edge.kill()
                edge.wait(5)


@pytest.fixture(scope="module")
def reference(smollm2):
    """What `splitveil generate --split 2,28 [--chat]` generates, in-process (the same SplitCausalLM.generate)."""
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.plan.plan import SplitPlan

    model, tokenizer = smollm2
    lm = SplitCausalLM(model, SplitPlan.from_cuts(CUTS), tokenizer=tokenizer)
    return lambda prompt, **kw: lm.generate(prompt, **{"max_new_tokens": 16, **kw})


@pytest.fixture
def client(edge_url):
    return openai.OpenAI(base_url=f"{edge_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "splitveil"


def test_chat_completion_equals_generate_chat(client, reference):
    expected = reference(QUESTION, chat=True)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    split = reply.model_extra["splitveil"]
    assert split["token_ids"] == expected.token_ids
    assert reply.usage.prompt_tokens == len(expected.prompt_ids)
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == len(expected.prompt_ids) + len(expected.token_ids)
    assert split["bytes_up"] == expected.bytes_up  # the same frames (the OPEN reply's server info differs in size)
    assert split["bytes_down"] > expected.decode_bytes_down > 0 and split["round_trips"] == expected.round_trips
    assert split["cuts"] == list(CUTS)


def test_streamed_chat_completion_equals_generate_chat(client, reference):
    expected = reference(QUESTION, chat=True)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really streamed
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert final.model_extra["splitveil"]["token_ids"] == expected.token_ids
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert len({c.id for c in chunks}) == 1


def test_text_completion_with_stop_string_streaming_and_not(client, reference):
    prompt = "The capital of France is"
    expected = reference(prompt, max_new_tokens=24, stop=("."))
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=".")
    assert reply.choices[0].text == expected.text and "." not in reply.choices[0].text
    assert reply.model_extra["splitveil"]["token_ids"] == expected.token_ids
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=".", stream=True) if c.choices)
    assert streamed == expected.text


def test_concurrent_requests_are_served_one_at_a_time_exactly(client, reference):
    questions = ["What is 2+2?", "Say hello.", "Name a fruit."]
    expected = [reference(q, chat=True, max_new_tokens=8).token_ids for q in questions]
    got: dict[int, list[int]] = {}

    def ask(index: int) -> None:
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": questions[index]}],
                                               max_tokens=8, temperature=0, stream=index == 1)
        if index == 1:
            got[index] = [c for c in reply if c.choices and c.choices[0].finish_reason][-1].model_extra["splitveil"]["token_ids"]
        else:
            got[index] = reply.model_extra["splitveil"]["token_ids"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [got.get(i) for i in range(len(questions))] == expected


@pytest.mark.parametrize("change, status, param", [
    ({"temperature": 3}, 400, "temperature"),
    ({"n": 2}, 400, None),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"messages": []}, 400, "messages"),
    ({"model": "gpt-4o"}, 404, "model"),
    ({"max_tokens": 100000}, 400, "max_tokens"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
])
def test_bad_requests_get_the_openai_error_shape(edge_url, change, status, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **change}
    request = urllib.request.Request(f"{edge_url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    assert raised.value.code == status
    error = json.loads(raised.value.read())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_openai_client_raises_its_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, top_p=0)
    assert raised.value.body["param"] == "top_p"


def test_malformed_json_and_unknown_routes(edge_url):
    request = urllib.request.Request(f"{edge_url}/v1/chat/completions", data=b"{not json",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert raised.value.code == 400 and "error" in json.loads(raised.value.read())
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(f"{edge_url}/v1/embeddings", timeout=30)
    assert raised.value.code in (404, 405) and json.loads(raised.value.read())["error"]["message"]


def test_a_streaming_client_that_leaves_does_not_hold_up_the_next_request(edge_url, client, reference):
    """The generation of a client that disconnects ends at its next token; the next request is served exactly."""
    import http.client

    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
                       "max_tokens": 400, "temperature": 0, "stream": True})
    host, port = edge_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data:")
    connection.close()  # gone after the first event; 400 tokens would take about 40 s here
    started = time.monotonic()
    expected = reference("Say hello.", chat=True, max_new_tokens=6)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                           max_tokens=6, temperature=0)
    assert reply.model_extra["splitveil"]["token_ids"] == expected.token_ids
    assert time.monotonic() - started < 30
