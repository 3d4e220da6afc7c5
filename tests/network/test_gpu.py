"""On a CUDA GPU (`pytest -m gpu`, which benchmarks/device/run.sh runs; deselected by default, skipped without CUDA):
splits on the GPU give the unsplit model's tokens on the same GPU and dtype, a bf16 trunk served from the GPU over
TLS too, batched steps stay batched, and SLIP's ring products on the GPU equal the CPU's bit for bit. Models that
need no download (tiny families, the dummy llama-tiny), so the GPU machine needs only the carried tokenizer."""

import copy

import pytest
import torch

from splitveil.edge.generate import GenerationConfig, SplitCausalLM
from splitveil.plan.plan import SplitPlan

pytestmark = pytest.mark.gpu
PROMPT = [5, 17, 3, 9, 11, 40, 60, 7]  # ids below the tiny families' vocabulary (101)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_split_on_the_gpu_equals_the_unsplit_model_there(tiny_models, family, dtype):
    model = copy.deepcopy(tiny_models[family]).to("cuda", dtype)
    expected = model.generate(torch.tensor([PROMPT], device="cuda"), max_new_tokens=16, do_sample=False)
    expected = expected[0, len(PROMPT):].tolist()
    config = GenerationConfig(max_new_tokens=16)
    assert SplitCausalLM(model, None).generate(PROMPT, config).token_ids == expected
    layers = model.config.num_hidden_layers
    for head in range(1, layers):
        lm = SplitCausalLM(model, SplitPlan.lambda_split(head, layers))
        assert lm.generate(PROMPT, config).token_ids == expected, head


def test_a_bf16_trunk_served_from_the_gpu(serve_service, tls_files):
    from splitveil.models.loading import load_causal_lm
    from splitveil.serve.build import build_cloud_service

    service = build_cloud_service("llama-tiny", (1, 2), max_sessions=4, load_format="dummy", dtype="bfloat16",
                                  device="cuda")
    assert service.info["device"].startswith("cuda") and service.parts[1].device.type == "cuda"
    model, _ = load_causal_lm("llama-tiny", load_format="dummy", dtype="bfloat16", device="cuda", with_tokenizer=False)
    config = GenerationConfig(max_new_tokens=16)
    expected = SplitCausalLM(model, None).generate(PROMPT, config).token_ids
    server = serve_service(service)
    lm = SplitCausalLM.connect(server.url, token=tls_files["token"], ca_file=tls_files["cert"], model="llama-tiny",
                               plan=SplitPlan.lambda_split(1, 2), tokenizer=None, load_format="dummy",
                               dtype="bfloat16", device="cuda")
    try:
        assert lm.generate(PROMPT, config).token_ids == expected
        assert lm.server_info()["dtype"] == "bfloat16"
    finally:
        lm.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_steps_on_the_gpu_stay_batched(tiny_models, dtype):
    from splitveil.models.causal_lm import CausalLMSplittable, forward_batched_step
    from splitveil.plan.plan import apply

    splittable = CausalLMSplittable(copy.deepcopy(tiny_models["llama"]).to("cuda", dtype))
    parts = [apply(splittable, SplitPlan.lambda_split(1, 3))[1] for _ in range(8)]
    for length, part in enumerate(parts, start=3):
        part(torch.randn(1, length, splittable.hidden_size))
    out = forward_batched_step(parts, torch.randn(len(parts), 1, splittable.hidden_size))
    assert out.device.type == "cuda" and out.dtype == dtype
    assert splittable.batch_verdicts and all(splittable.batch_verdicts.values())


def test_ring_products_on_the_gpu_equal_the_cpu_bit_for_bit():
    from splitveil.protect.slip.fixedpoint import RingWeight, uniform_ring

    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-2**14, 2**14, (1536, 576), generator=generator, dtype=torch.int64)
    x, s = uniform_ring((33, 576)), uniform_ring((2, 1536))
    for compact in (False, True):
        cpu, gpu = RingWeight(weight, compact=compact), RingWeight(weight, compact=compact, device="cuda")
        assert gpu.device.type == "cuda"
        assert torch.equal(cpu.matmul(x), gpu.matmul(x))
        assert torch.equal(cpu.left_matmul(s), gpu.left_matmul(s))
