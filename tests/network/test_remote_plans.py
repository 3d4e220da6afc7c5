"""Whole-sequence logits (`forward_logits`, `score`) through a real TLS server, for plans whose remote part holds
the LM head (edge | cloud) and for the Λ-split: equal to the unsplit model's logits. A remote LM head returns the
last position's logits only, so it gets the positions one at a time: the KV-cached decoding path, which differs from
the one-pass forward by float summation order (hence rtol 1e-4)."""

import pytest
import torch

from splitveil.edge.generate import SplitCausalLM
from splitveil.models.causal_lm import CausalLMSplittable
from splitveil.plan.plan import Placement, SplitPlan, apply
from splitveil.serve.server import SplitServer
from splitveil.serve.service import PartService
from splitveil.transport.network import WebSocketTransport
from splitveil.transport.tls import server_context

from .conftest import prompt

pytestmark = pytest.mark.network


@pytest.mark.parametrize("plan", [SplitPlan.two_way(2), SplitPlan.two_way(0), SplitPlan.lambda_split(1, 3)],
                         ids=lambda p: p.describe())
def test_logits_over_the_network_equal_unsplit(tiny_model, tls_files, plan):
    splittable = CausalLMSplittable(tiny_model)
    parts = apply(splittable, plan)
    remote = {i: part for i, part in enumerate(parts) if plan.placement[i] != Placement.EDGE}
    for part in remote.values():
        part.last_logits_only = True  # as `splitveil serve` runs them
    service = PartService(remote, hidden_size=splittable.hidden_size, info={"cuts": list(plan.cuts)})
    server = SplitServer(service, token=tls_files["token"], ssl_context=server_context(tls_files["cert"], tls_files["key"]))
    server.start_in_thread()
    lm = SplitCausalLM(tiny_model, plan, transport=WebSocketTransport(server.url, token=tls_files["token"],
                                                                     ca_file=tls_files["cert"], timeout=20))
    try:
        ids = prompt(3, length=8)
        with torch.inference_mode():
            unsplit = tiny_model(ids).logits
        torch.testing.assert_close(lm.forward_logits(ids), unsplit, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lm.score(ids[0].tolist()), unsplit[0], rtol=1e-4, atol=1e-5)
        assert lm.generate(ids, max_new_tokens=5, eos_token_ids=()).token_ids == \
            SplitCausalLM(tiny_model).generate(ids, max_new_tokens=5, eos_token_ids=()).token_ids
        assert not service.sessions
    finally:
        lm.close()
        server.stop()
