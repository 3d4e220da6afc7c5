"""On a CUDA GPU (`pytest -m gpu`, which benchmarks/device/run.sh runs; deselected by default): parts on the GPU give
the unsplit model's tokens on the same GPU and dtype, a served trunk too, batched steps stay batched, and SLIP's
ring products on the GPU equal the CPU's bit for bit."""

import pytest
import torch

from splitveil.edge.generate import GenerationConfig, SplitCausalLM
from splitveil.models.loading import load_causal_lm
from splitveil.plan.plan import SplitPlan

pytestmark = [pytest.mark.gpu, pytest.mark.model]
PROMPT = "The three most common causes of a headache are"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_split_on_the_gpu_equals_the_unsplit_model_there(dtype):
    model, tokenizer = load_causal_lm("smollm2-135m", dtype=dtype, device="cuda")
    assert model.device.type == "cuda"
    config = GenerationConfig(max_new_tokens=24)
    unsplit = SplitCausalLM(model, None, tokenizer=tokenizer).generate(PROMPT, config).token_ids
    split = SplitCausalLM(model, SplitPlan.lambda_split(2, 28), tokenizer=tokenizer).generate(PROMPT, config).token_ids
    assert split == unsplit


def test_a_trunk_served_on_the_gpu_in_bf16(serve_service, tls_files):
    from splitveil.serve.build import build_cloud_service

    service = build_cloud_service("smollm2-135m", (2, 28), max_sessions=4, dtype="bfloat16", device="cuda")
    assert service.info["device"].startswith("cuda") and service.parts[1].device.type == "cuda"
    model, tokenizer = load_causal_lm("smollm2-135m", dtype="bfloat16", device="cuda")
    config = GenerationConfig(max_new_tokens=16)
    expected = SplitCausalLM(model, None, tokenizer=tokenizer).generate(PROMPT, config).token_ids
    server = serve_service(service)
    lm = SplitCausalLM.connect(server.url, token=tls_files["token"], ca_file=tls_files["cert"],
                               plan=SplitPlan.lambda_split(2, 28), dtype="bfloat16", device="cuda")
    try:
        assert lm.generate(PROMPT, config).token_ids == expected
    finally:
        lm.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_steps_on_the_gpu_stay_batched(dtype):
    from splitveil.models.causal_lm import CausalLMSplittable, forward_batched_step
    from splitveil.plan.plan import apply

    model, _ = load_causal_lm("smollm2-135m", dtype=str(dtype).removeprefix("torch."), device="cuda",
                              with_tokenizer=False)
    splittable = CausalLMSplittable(model)
    parts = [apply(splittable, SplitPlan.lambda_split(2, 28))[1] for _ in range(8)]
    for length, part in enumerate(parts, start=3):
        part(torch.randn(1, length, splittable.hidden_size))
    out = forward_batched_step(parts, torch.randn(len(parts), 1, splittable.hidden_size))
    assert out.device.type == "cuda" and all(splittable.batch_verdicts.values())


def test_ring_products_on_the_gpu_equal_the_cpu_bit_for_bit():
    from splitveil.protect.slip.fixedpoint import RingWeight, uniform_ring

    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-2**14, 2**14, (1536, 576), generator=generator, dtype=torch.int64)
    x = uniform_ring((33, 576))
    s = uniform_ring((2, 1536))
    for compact in (False, True):
        cpu, gpu = RingWeight(weight, compact=compact), RingWeight(weight, compact=compact, device="cuda")
        assert gpu.device.type == "cuda"
        assert torch.equal(cpu.matmul(x), gpu.matmul(x))
        assert torch.equal(cpu.left_matmul(s), gpu.left_matmul(s))
