"""Several clients mid-generation when a real `splitveil serve` gets SIGKILL and is started again (same port,
certificate and token): each client's RemoteStage replays into a new session and ends with the unsplit tokens.

The driver is the one `splitveil bench load` uses for its restart phase (64 SmolLM2 clients there).
"""

import signal

import pytest
import torch

from splitveil.edge.generate import SplitCausalLM
from splitveil.harness.load_service import restart_like, run_clients_through_restart
from splitveil.models.tiny import tiny_causal_lm
from splitveil.plan.plan import SplitPlan
from splitveil.serve.process import ServerProcess
from splitveil.transport.network import WebSocketTransport

pytestmark = pytest.mark.network
CUTS = (1, 3)
CLIENTS = 4
TOKENS = 24


def test_clients_mid_generation_survive_sigkill_and_restart_identically(tmp_path):
    model = tiny_causal_lm("llama")
    model.save_pretrained(tmp_path / "tiny-llama")
    prompts = [torch.randint(3, 101, (1, 5 + i), generator=torch.Generator().manual_seed(10 + i)) for i in range(CLIENTS)]
    unsplit = SplitCausalLM(model)
    expected = [unsplit.generate(p, max_new_tokens=TOKENS, eos_token_ids=()).token_ids for p in prompts]
    with ServerProcess(str(tmp_path / "tiny-llama"), CUTS, startup_timeout=120) as server:
        first = server.process
        clients = []
        for _ in range(CLIENTS):
            transport = WebSocketTransport(server.url, token=server.token, ca_file=server.cert, timeout=30)
            lm = SplitCausalLM(model, SplitPlan.lambda_split(*CUTS), transport=transport)
            lm.stages[1].recover_seconds = 120.0
            clients.append(lm)

        def kill():
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(10)

        def restart():
            server.process = restart_like(first, tmp_path / "restarted.log", startup_timeout=120)

        # each client holds before its 10th frame (OPEN, prefill, 7 decode steps sent) until the kill
        result = run_clients_through_restart(clients, prompts, expected, max_new_tokens=TOKENS, kill_after=10, kill=kill,
                                             restart=restart, hold=True, timeout=300)
        for lm in clients:
            lm.close()
        assert server.process is not first and server.process.poll() is None
    assert first.returncode == -signal.SIGKILL
    assert result["frames_sent_at_kill"] == [10] * CLIENTS and result["finished_before_kill"] == 0
    assert result["errors"] == [] and result["recoveries"] == [1] * CLIENTS
    assert result["all_identical"], (result["identical_to_unsplit"], expected)
