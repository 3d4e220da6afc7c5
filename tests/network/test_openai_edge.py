"""`splitveil edge` as a real process, its trunk on a real `splitveil serve` over TLS, driven by the official `openai`
client: greedy chat and text completions, streaming and not, give the tokens of the split's own `generate`; the API
key (printed, or written to a new --api-key-file) and the Host allow-list hold on the real process."""

import json
import os
import re
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


class EdgeProcess:
    """A `splitveil edge` child on 127.0.0.1: its URL, and the API key it printed (None when it printed none)."""

    def __init__(self, args: list[str], port: int, *, startup_timeout: float = 180):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.url, self.lines = f"http://127.0.0.1:{port}", []
        command = [sys.executable, "-m", "splitveil.cli.main", "edge", "--port", str(port), *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()
        deadline = time.monotonic() + startup_timeout
        while not any("OpenAI API on" in line for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"splitveil edge did not start: {''.join(self.lines)[-2000:]}")
            time.sleep(0.2)
        printed = [re.search(r"API key: (\S+)", line) for line in self.lines]
        self.key = next((found.group(1) for found in printed if found), None)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def __enter__(self) -> "EdgeProcess":
        return self

    def __exit__(self, *_) -> None:
        self.stop()


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    """`splitveil serve` (the trunk, TLS + token) and `splitveil edge --server` in front of it, with its API key in a
    file that it creates."""
    key_file = tmp_path_factory.mktemp("edge") / "api-key"
    with ServerProcess(MODEL, CUTS) as server:
        with EdgeProcess(["--server", server.url, "--ca", str(server.cert), "--token-file", str(server.token_file),
                          "--model", MODEL, "--split", ",".join(map(str, CUTS)), "--api-key-file", str(key_file)],
                         free_port()) as process:
            process.key_file = key_file
            yield process


def post(url: str, body: bytes, *, key: str | None, host: str | None = None):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if host is not None:
        headers["Host"] = host
    return urllib.request.Request(url, data=body, headers=headers)


@pytest.fixture(scope="module")
def reference(smollm2):
    """What `splitveil generate --split 2,28 [--chat]` generates, in-process (the same SplitCausalLM.generate)."""
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.plan.plan import SplitPlan

    model, tokenizer = smollm2
    lm = SplitCausalLM(model, SplitPlan.from_cuts(CUTS), tokenizer=tokenizer)
    return lambda prompt, **kw: lm.generate(prompt, **{"max_new_tokens": 16, **kw})


@pytest.fixture
def client(edge):
    return openai.OpenAI(base_url=f"{edge.url}/v1", api_key=edge.key_file.read_text().strip(), max_retries=0,
                         timeout=120)


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


def test_concurrent_requests_are_served_at_once_exactly(client, reference):
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
def test_bad_requests_get_the_openai_error_shape(edge, change, status, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **change}
    request = post(f"{edge.url}/v1/chat/completions", json.dumps(body).encode(), key=edge.key_file.read_text().strip())
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


def test_malformed_json_and_unknown_routes(edge):
    key = edge.key_file.read_text().strip()
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(post(f"{edge.url}/v1/chat/completions", b"{not json", key=key), timeout=30)
    assert raised.value.code == 400 and "error" in json.loads(raised.value.read())
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(urllib.request.Request(f"{edge.url}/v1/embeddings",
                                                      headers={"Authorization": f"Bearer {key}"}), timeout=30)
    assert raised.value.code in (404, 405) and json.loads(raised.value.read())["error"]["message"]


def test_a_streaming_client_that_leaves_does_not_hold_up_the_next_request(edge, client, reference):
    """The generation of a client that disconnects ends at its next token; the next request is served exactly."""
    import http.client

    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
                       "max_tokens": 400, "temperature": 0, "stream": True})
    host, port = edge.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/v1/chat/completions", body=body, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {edge.key_file.read_text().strip()}"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data:")
    connection.close()  # gone after the first event; 400 tokens would take about 40 s here
    started = time.monotonic()
    expected = reference("Say hello.", chat=True, max_new_tokens=6)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                           max_tokens=6, temperature=0)
    assert reply.model_extra["splitveil"]["token_ids"] == expected.token_ids
    assert time.monotonic() - started < 30


def test_the_key_file_is_made_mode_0600_and_wrong_hosts_and_keys_are_refused(edge):
    """The edge wrote a new random key to --api-key-file (it did not exist); a DNS-rebinding Host gets 403 and a
    request without the key 401, each without a completion."""
    key = edge.key_file.read_text().strip()
    assert len(key) >= 40 and edge.key_file.stat().st_mode & 0o777 == 0o600 and edge.key is None
    assert any(f"new API key written to {edge.key_file}" in line for line in edge.lines)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    for request, status in ((post(f"{edge.url}/v1/chat/completions", body, key=key, host="attacker.example"), 403),
                            (post(f"{edge.url}/v1/chat/completions", body, key=None), 401),
                            (post(f"{edge.url}/v1/chat/completions", body, key="x" * 43), 401)):
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=30)
        assert raised.value.code == status and json.loads(raised.value.read())["error"]["message"]
    port = edge.url.rsplit(":", 1)[1]
    reply = json.loads(urllib.request.urlopen(post(f"{edge.url}/v1/chat/completions", body, key=key,
                                                   host=f"localhost:{port}"), timeout=60).read())
    assert reply["usage"]["completion_tokens"] == 2


def test_by_default_a_random_key_is_printed_and_allow_host_adds_names():
    """`edge --local` without key options prints a new key, as Jupyter prints its token; `--allow-host` serves a
    proxy's name."""
    port = free_port()
    with EdgeProcess(["--local", "--model", MODEL, "--allow-host", "edge.internal"], port) as edge:
        assert edge.key and len(edge.key) >= 40
        for host, key, status in (("edge.internal", edge.key, 200), (f"127.0.0.1:{port}", edge.key, 200),
                                  (f"127.0.0.1:{port}", None, 401), ("attacker.example", edge.key, 403)):
            request = urllib.request.Request(f"{edge.url}/v1/models", headers={"Host": host, **(
                {"Authorization": f"Bearer {key}"} if key else {})})
            try:
                got = urllib.request.urlopen(request, timeout=30).status
            except urllib.error.HTTPError as error:
                got = error.code
            assert got == status, (host, key)


@pytest.mark.parametrize("args, words", [
    (["--no-auth", "--host", "0.0.0.0"], "refusing --no-auth on the non-loopback address 0.0.0.0"),
    (["--no-auth", "--api-key-file", "key"], "give --no-auth or --api-key-file, not both"),
    (["--allow-host", "bad host/x"], "bad --allow-host"),
])
def test_no_auth_only_on_loopback(args, words):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "splitveil.cli.main", "edge", "--local", "--port", "0", *args],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
