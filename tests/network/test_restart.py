"""A real `splitveil serve` process killed mid-generation and restarted: the client replays and ends identically."""

import os
import signal

import pytest
import torch

from splitveil.edge.generate import SplitCausalLM
from splitveil.models.tiny import tiny_causal_lm

from .conftest import free_port, start_serve_process

pytestmark = pytest.mark.network


@pytest.fixture
def tiny_dir(tmp_path):
    model = tiny_causal_lm("llama")
    model.save_pretrained(tmp_path / "tiny-llama")
    return tmp_path / "tiny-llama", model


def test_killed_server_restarts_and_client_recovers_identically(tiny_dir, tls_files):
    model_dir, model = tiny_dir
    port = free_port()
    args = ["--model", str(model_dir), "--split", "1,3", "--tls-cert", str(tls_files["cert"]), "--tls-key",
            str(tls_files["key"]), "--token-file", str(tls_files["token_file"])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    servers = [start_serve_process(args, port, env)]
    try:
        lm = SplitCausalLM.connect(f"wss://127.0.0.1:{port}", token=tls_files["token"], model=str(model_dir), tokenizer=None,
                                   ca_file=tls_files["cert"], recover_seconds=90)
        request, calls = lm.transport.request, {"n": 0}

        def kill_then_request(frame):
            calls["n"] += 1
            if calls["n"] == 12:  # mid-generation: kill -9 the server and start a new one on the same port
                servers[-1].send_signal(signal.SIGKILL)
                servers[-1].wait(10)
                servers.append(start_serve_process(args, port, env))
            return request(frame)

        lm.transport.request = kill_then_request
        ids = torch.randint(3, 101, (1, 8), generator=torch.Generator().manual_seed(4))
        result = lm.generate(ids, max_new_tokens=30, eos_token_ids=())
        expected = SplitCausalLM(model).generate(ids, max_new_tokens=30, eos_token_ids=()).token_ids
        assert len(servers) == 2 and servers[0].returncode == -signal.SIGKILL
        assert lm.stages[1].recoveries == 1
        assert result.token_ids == expected
        lm.close()
    finally:
        for proc in servers:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except Exception:
                    proc.kill()
