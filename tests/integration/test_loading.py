"""Loading models offline: registered names, local directories, and clear errors."""

import pytest
import torch

from splitveil.core.errors import ModelNotFoundError
from splitveil.edge.generate import SplitCausalLM
from splitveil.models.loading import load_causal_lm, resolve_model_dir
from splitveil.models.tiny import tiny_causal_lm
from splitveil.plan.plan import SplitPlan


def test_a_local_directory_loads_and_splits_exactly(tmp_path):
    model = tiny_causal_lm("gpt2")
    model.save_pretrained(tmp_path / "tiny-gpt2")
    loaded, tokenizer = load_causal_lm(str(tmp_path / "tiny-gpt2"), with_tokenizer=False)
    assert tokenizer is None
    prompt = torch.tensor([[5, 6, 7, 8]])
    expected = SplitCausalLM(model).generate(prompt, max_new_tokens=8, eos_token_ids=()).token_ids
    assert SplitCausalLM(loaded, SplitPlan.lambda_split(1, 3)).generate(prompt, max_new_tokens=8, eos_token_ids=()).token_ids == expected


def test_a_directory_without_tokenizer_is_named(tmp_path):
    tiny_causal_lm("llama").save_pretrained(tmp_path / "m")
    with pytest.raises(ModelNotFoundError, match="no usable tokenizer"):
        load_causal_lm(str(tmp_path / "m"))


@pytest.mark.parametrize("name", ["", "   ", "gpt-17", "/definitely/not/here"])
def test_unknown_names_are_refused(name):
    with pytest.raises(ModelNotFoundError):
        resolve_model_dir(name)


@pytest.mark.model
def test_shipped_model_is_cached_as_safetensors(smollm2):
    path = resolve_model_dir("smollm2-135m")
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.chat_template
