"""Precision and placement of parts (models/precision.py): --dtype and --device, the wire converting at the cut, and
bf16 / fp16 splits giving the unsplit model's tokens in the same dtype."""

import pytest
import torch

from splitveil.core.errors import ConfigError
from splitveil.edge.generate import GenerationConfig, SplitCausalLM
from splitveil.models.causal_lm import CausalLMSplittable, forward_batched_step
from splitveil.models.precision import dtype_name, module_placement, torch_device, torch_dtype
from splitveil.models.tiny import tiny_causal_lm
from splitveil.plan.plan import SplitPlan, apply
from splitveil.wire.codecs import get_codec

LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("name, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                            ("float16", torch.float16), ("bf16", torch.bfloat16),
                                            ("FP16", torch.float16)])
def test_dtype_names(name, expected):
    assert torch_dtype(name) is expected
    assert dtype_name(expected) in ("float32", "bfloat16", "float16")


@pytest.mark.parametrize("bad", ["int8", "float64", "", "fp8"])
def test_unknown_dtype_is_one_line(bad):
    with pytest.raises(ConfigError, match="unknown dtype .* use one of float32, bfloat16, float16"):
        torch_dtype(bad)


def test_devices_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_device("cpu") == torch.device("cpu")
    assert torch_device("auto") == torch.device("cpu")
    assert torch_device(None) == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="no CUDA GPU .* --device cpu"):
            torch_device(name)
    for name in ("tpu", "gpu0", "mps"):
        with pytest.raises(ConfigError, match="device"):
            torch_device(name)


def test_auto_takes_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("codec", ["fp32", "bf16", "fp16"])
def test_low_precision_states_cross_a_float32_wire_bit_for_bit(dtype, codec):
    """A float32 wire restores bf16 and fp16 values exactly (the part casts them back); a bf16 wire is exact for bf16
    states and an fp16 wire for fp16 ones."""
    states = (torch.randn(2, 5, 7) * 40).to(dtype)
    decoded = get_codec(codec).decode(get_codec(codec).encode(states), tuple(states.shape))
    assert decoded.dtype == torch.float32
    if codec == "fp32" or codec == {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]:
        assert torch.equal(decoded.to(dtype), states)


def test_a_part_casts_what_it_receives_to_its_own_dtype():
    model = tiny_causal_lm("llama").to(torch.bfloat16)
    head, trunk, tail = apply(CausalLMSplittable(model), SplitPlan.lambda_split(1, 3))
    assert (trunk.dtype, trunk.device) == (torch.bfloat16, torch.device("cpu"))
    hidden = head(torch.tensor([[1, 2, 3]]))
    assert hidden.dtype == torch.bfloat16
    assert trunk(hidden.float()).dtype == torch.bfloat16  # what the wire decodes (float32) is cast back
    assert tail(trunk.forward(hidden)).dtype == torch.float32  # logits come out in float32, as transformers' do


def test_placement_skips_meta_weights():
    with torch.device("meta"):
        meta = torch.nn.Linear(3, 3)
    real = torch.nn.Linear(3, 3).to(torch.float16)
    assert module_placement([meta, real]) == (torch.device("cpu"), torch.float16)
    assert module_placement([meta]) == (torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_split_equals_the_unsplit_model_in_that_dtype(tiny_models, family, dtype):
    """Every Λ cut of a tiny model in bf16 / fp16: the split's greedy tokens equal transformers' own generate in
    the same dtype (the fp32 wire carries the cut exactly)."""
    import copy

    model = copy.deepcopy(tiny_models[family]).to(dtype)
    prompt = torch.tensor([[5, 17, 3, 9, 11]])
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:].tolist()
    config = GenerationConfig(max_new_tokens=12)
    layers = model.config.num_hidden_layers
    for head in range(1, layers):
        for tail in range(head + 1, layers + 1):
            lm = SplitCausalLM(model, SplitPlan.lambda_split(head, tail))
            assert lm.generate(prompt[0].tolist(), config).token_ids == expected, (head, tail)


@pytest.mark.parametrize("dtype", LOW)
def test_batched_steps_in_low_precision_stay_batched(tiny_model_bf16_parts, dtype):
    """Batched decode steps of a bf16 / fp16 trunk agree with single steps within the dtype's tolerance, so the
    service keeps batching them (a verdict of False would run every step alone)."""
    splittable, parts = tiny_model_bf16_parts(dtype)
    hidden = torch.randn(len(parts), 1, splittable.hidden_size)
    out = forward_batched_step(parts, hidden)
    assert out.dtype == dtype
    assert all(splittable.batch_verdicts.values()) and splittable.batch_verdicts


@pytest.fixture
def tiny_model_bf16_parts():
    def build(dtype):
        splittable = CausalLMSplittable(tiny_causal_lm("llama").to(dtype))
        parts = [apply(splittable, SplitPlan.lambda_split(1, 3))[1] for _ in range(4)]
        torch.manual_seed(0)
        for length, part in enumerate(parts, start=2):
            part(torch.randn(1, length, splittable.hidden_size))
        return splittable, parts

    return build


@pytest.mark.model
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_smollm2_split_in_low_precision_equals_transformers_in_that_dtype(dtype):
    from splitveil.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2-135m", dtype=dtype)
    assert model.dtype == torch_dtype(dtype)
    prompt = "The three most common causes of a headache are"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    config = GenerationConfig(max_new_tokens=16)
    assert SplitCausalLM(model, None, tokenizer=tokenizer).generate(prompt, config).token_ids == expected
    assert SplitCausalLM(model, SplitPlan.lambda_split(2, 28), tokenizer=tokenizer).generate(prompt, config).token_ids == expected
