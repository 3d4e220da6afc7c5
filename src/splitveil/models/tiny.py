"""Tiny random causal LMs built from configs (no download): they serve the unit tests and show the adapter is generic.

Every family gets the same sizes: 4 layers, hidden 32, vocab 101. Weights come from a fixed seed.
"""

from __future__ import annotations

from splitveil.core.registry import Registry

TINY_FAMILIES: Registry = Registry("tiny model family")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=101, n_embd=32, n_layer=4, n_head=4, n_positions=256,
                        bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return Qwen2ForCausalLM(config)


TINY_FAMILIES.register("llama", _llama)
TINY_FAMILIES.register("gpt2", _gpt2)
TINY_FAMILIES.register("qwen2", _qwen2)


def tiny_causal_lm(family: str, *, seed: int = 0, weight_scale: float = 16.0):
    """A tiny random causal LM of `family` (llama, gpt2, qwen2) in eval mode, fp32.

    `weight_scale` multiplies every matrix of the random init (std 0.02): the default 16 makes greedy decoding
    varied and decisive; 1 keeps each layer's change to the residual stream small.
    """
    import torch

    torch.manual_seed(seed)
    model = TINY_FAMILIES.get(family)()
    # Random init gives near-uniform logits; scale weights up so greedy decoding makes varied, decisive choices.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(weight_scale)
    return model.float().eval()
