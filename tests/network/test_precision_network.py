"""A trunk served in bf16 (`serve --dtype bfloat16`): a bf16 device gets the bf16 unsplit model's tokens over TLS; a
float32 device may use it too (the wire converts at the cut) and learns the server's precision at OPEN."""

import pytest
import torch

from splitveil.edge.generate import GenerationConfig, SplitCausalLM
from splitveil.models.loading import load_causal_lm
from splitveil.plan.plan import SplitPlan
from splitveil.serve.build import build_cloud_service

pytestmark = [pytest.mark.model, pytest.mark.network]
PROMPT = "The three most common causes of a headache are"


@pytest.fixture(scope="module")
def bf16_trunk():
    return build_cloud_service("smollm2-135m", (2, 28), max_sessions=4, max_kv_mb=256, dtype="bfloat16")


def test_the_service_holds_the_trunk_in_bf16_and_says_so(bf16_trunk):
    part = bf16_trunk.parts[1]
    assert part.dtype == torch.bfloat16
    assert {"dtype": "bfloat16", "device": "cpu"}.items() <= bf16_trunk.info.items()
    weights = [p for layer in part.owner.layers[2:28] for p in layer.parameters()]
    assert weights and all(p.dtype == torch.bfloat16 for p in weights)
    assert all(p.device.type == "meta" for p in part.owner.layers[0].parameters())  # the head is not here


@pytest.mark.parametrize("wire", ["fp32", "bf16"])
def test_bf16_device_and_bf16_trunk_equal_the_bf16_unsplit_model(bf16_trunk, serve_service, tls_files, wire):
    model, tokenizer = load_causal_lm("smollm2-135m", dtype="bfloat16")
    config = GenerationConfig(max_new_tokens=16)
    expected = SplitCausalLM(model, None, tokenizer=tokenizer).generate(PROMPT, config).token_ids
    server = serve_service(bf16_trunk)
    lm = SplitCausalLM.connect(server.url, token=tls_files["token"], ca_file=tls_files["cert"],
                               plan=SplitPlan.lambda_split(2, 28), wire=wire, dtype="bfloat16")
    try:
        assert lm.generate(PROMPT, config).token_ids == expected
        assert lm.server_info() == {"dtype": "bfloat16", "device": "cpu"}
        assert all(p.dtype == torch.bfloat16 for p in lm.splittable.layers[0].parameters())
    finally:
        lm.close()


def test_a_float32_device_uses_a_bf16_trunk(bf16_trunk, serve_service, tls_files):
    """Mixed precision is allowed (the device keeps float32, the cloud bf16) and equals neither model exactly; its
    first token is the float32 or the bf16 model's (they differ on this prompt)."""
    config = GenerationConfig(max_new_tokens=8)
    first = {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_causal_lm("smollm2-135m", dtype=dtype)
        first[dtype] = SplitCausalLM(model, None, tokenizer=tokenizer).generate(PROMPT, config).token_ids[0]
    server = serve_service(bf16_trunk)
    lm = SplitCausalLM.connect(server.url, token=tls_files["token"], ca_file=tls_files["cert"],
                               plan=SplitPlan.lambda_split(2, 28))
    try:
        mixed = lm.generate(PROMPT, config).token_ids
        assert lm.server_info()["dtype"] == "bfloat16"
        assert all(p.dtype == torch.float32 for p in lm.splittable.layers[0].parameters())
    finally:
        lm.close()
    assert len(mixed) == 8 and mixed[0] in first.values()


def test_serve_and_generate_commands_in_bf16_with_dummy_weights(tls_files, tmp_path):
    """`serve --load-format dummy --dtype bfloat16` (its own process) and `generate --server ... --dtype bfloat16`:
    the tiny dummy Llama's tokens equal `generate --no-split` in bf16, and the JSON names both sides' precision."""
    import json
    import subprocess
    import sys

    from .conftest import free_port, start_serve_process

    port = free_port()
    server = start_serve_process(["--model", "llama-tiny", "--load-format", "dummy", "--split", "1,2", "--dtype",
                                  "bfloat16", "--insecure", "--token-file", str(tls_files["token_file"])], port)
    common = ["--model", "llama-tiny", "--load-format", "dummy", "--dtype", "bfloat16", "--prompt", "hello there",
              "--max-new-tokens", "12", "--json"]
    try:
        runs = {}
        for name, extra in (("unsplit", ["--no-split"]), ("served", ["--server", f"ws://127.0.0.1:{port}",
                                                                     "--token-file", str(tls_files["token_file"])])):
            proc = subprocess.run([sys.executable, "-m", "splitveil.cli.main", "generate", *common, *extra],
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
            runs[name] = json.loads(proc.stdout)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert runs["served"]["token_ids"] == runs["unsplit"]["token_ids"] and len(runs["served"]["token_ids"]) == 12
    assert runs["served"]["dtype"] == "bfloat16" and runs["served"]["server_precision"] == {"dtype": "bfloat16",
                                                                                            "device": "cpu"}
