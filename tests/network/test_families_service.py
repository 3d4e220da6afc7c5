"""Layer-typed families (sliding-window and full layers, per-type RoPE) through the real TLS service: concurrent
sessions with their decode steps batched, and the same with batching off, each equal to the unsplit model."""

import threading

import pytest

from splitveil.edge.generate import SplitCausalLM
from splitveil.models.tiny import TINY_WINDOW, tiny_causal_lm
from splitveil.plan.plan import SplitPlan
from splitveil.serve.server import ServerLimits
from splitveil.transport.network import WebSocketTransport

from .conftest import CUTS, prompt, tiny_service

pytestmark = pytest.mark.network
FAMILIES = ["gemma3", "qwen2-swa", "gpt-oss"]
PROMPT_LENGTH = 5 * TINY_WINDOW  # longer than every sliding window
NEW_TOKENS = 3 * TINY_WINDOW  # decode steps run past the window too


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return tiny_causal_lm(request.param)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "single"])
def test_concurrent_sessions_equal_unsplit(family_model, batched, serve_service, tls_files):
    server = serve_service(tiny_service(family_model, batch_steps=batched), limits=ServerLimits(batch_window=0.005))
    expected = {seed: SplitCausalLM(family_model).generate(prompt(seed, PROMPT_LENGTH), max_new_tokens=NEW_TOKENS,
                                                           eos_token_ids=()).token_ids for seed in range(3)}
    results, errors = {}, []

    def run(seed):
        transport = WebSocketTransport(server.url, token=tls_files["token"], ca_file=tls_files["cert"], timeout=30)
        lm = SplitCausalLM(family_model, SplitPlan.lambda_split(*CUTS), transport=transport)
        try:
            results[seed] = lm.generate(prompt(seed, PROMPT_LENGTH), max_new_tokens=NEW_TOKENS, eos_token_ids=()).token_ids
        except Exception as error:  # surfaced below
            errors.append(error)
        finally:
            lm.close()

    threads = [threading.Thread(target=run, args=(seed,)) for seed in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert results == expected
    sizes = server.service.batch_sizes
    assert (max(sizes) > 1) == batched, sizes  # batching really ran (or really did not)
