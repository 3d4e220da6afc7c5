"""`splitveil serve --ray --replicas 2` as a real process (SmolLM2's trunk on two Ray Serve replicas, TLS and the
token at the ingress): `splitveil generate --server` and the `openai` client through `splitveil edge --server` give
the tokens of the in-process split, a wrong token is refused, every port of the server's process tree (Ray's
included) is on loopback, and stopping the server leaves no Ray process behind."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from splitveil.serve.process import ServerProcess

from .test_ray_trunk import descendants, listening_sockets, on_loopback, ray_processes

pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.network, pytest.mark.model]
QUESTION = "Name two primary colours."


def generate_json(*args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "splitveil.cli.main", "generate", "--model", "smollm2-135m", "--chat",
                           "--prompt", QUESTION, "--max-new-tokens", "12", "--json", *args], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def chat_through_edge(server) -> list[int]:
    """A greedy chat completion through `splitveil edge --server` (with the API key it prints)."""
    import openai

    from splitveil.serve.process import free_port

    from .test_openai_edge import EdgeProcess

    with EdgeProcess(["--server", server.url, "--ca", str(server.cert), "--token-file", str(server.token_file)],
                     free_port()) as edge:
        client = openai.OpenAI(base_url=f"{edge.url}/v1", api_key=edge.key, max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}],
                                               max_tokens=12, temperature=0)
        return reply.model_extra["splitveil"]["token_ids"]


def test_generate_through_serve_ray_equals_the_local_split(smollm2):
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.plan.plan import SplitPlan

    model, tokenizer = smollm2
    expected = SplitCausalLM(model, SplitPlan.from_cuts((2, 28)), tokenizer=tokenizer).generate(
        QUESTION, chat=True, max_new_tokens=12)
    started = time.perf_counter()
    server = ServerProcess("smollm2-135m", (2, 28), extra_args=["--ray", "--replicas", "2", "--max-sessions", "8"],
                           startup_timeout=300)
    with server:
        log = server.log_path.read_text()
        print(f"serve --ray with 2 SmolLM2 replicas listening after {time.perf_counter() - started:.1f} s")
        folder = re.search(r"Ray folder (\S+?)\)", log).group(1)
        assert "2 replica(s)" in log and "limits per replica 8 sessions" in log
        got = generate_json("--server", server.url, "--ca", str(server.cert), "--token-file", str(server.token_file))
        assert got["token_ids"] == expected.token_ids and got["text"] == expected.text
        assert ray_processes(folder), "the Ray instance runs in the server's process tree"
        sockets = listening_sockets([server.process.pid, *descendants(server.process.pid)])
        assert len(sockets) > 6 and [s for s in sockets if not on_loopback(s[1])] == []  # Ray's ports on loopback only
        # the whole stack: the official openai client -> splitveil edge (head, tail) -> the Ray ingress -> replicas
        assert chat_through_edge(server) == expected.token_ids
        # a wrong token is refused at the ingress (HTTP 401), before anything reaches Ray
        wrong = server.token_file.with_name("wrong-token")
        wrong.write_text("x" * 43 + "\n")
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        refused = subprocess.run([sys.executable, "-m", "splitveil.cli.main", "generate", "--prompt", "hi", "--server",
                                  server.url, "--ca", str(server.cert), "--token-file", str(wrong)],
                                 capture_output=True, text=True, env=env, timeout=120)
        assert refused.returncode == 2 and "401" in refused.stderr
    deadline = time.monotonic() + 30
    while ray_processes(folder) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ray_processes(folder), "Ray processes outlived splitveil serve --ray"
    assert server.process.returncode == 0
