"""Tiny random causal LMs built from configs (no download): they serve the unit tests and show the adapter is generic.

Every family gets the same sizes: 4 layers, hidden 32, vocab 101. Weights come from a fixed seed.

Besides the plain families (llama, gpt2, qwen2) there are families whose layers differ by type: sliding-window and
full-attention layers side by side, some with a different rotary base per type (gemma2, gemma3, qwen2-swa,
mistral-swa, cohere2, olmo3, gpt-oss). Their window is 4 positions (`TINY_WINDOW`), so a prompt of a few dozen
tokens crosses it many times; the layer types are placed so that every cut pair starts parts on both kinds.
"""

from __future__ import annotations

from splitveil.core.registry import Registry

TINY_FAMILIES: Registry = Registry("tiny model family")

#: the sliding window (positions) of every tiny family that has one
TINY_WINDOW = 4

_SIZES = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
_SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Sliding first and last, full in between: a part starting at any layer meets a type other than layer 0's.
_MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_SIZES, **_SPECIAL, tie_word_embeddings=True))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=101, n_embd=32, n_layer=4, n_head=4, n_positions=256,
                        bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_SIZES, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))


def _qwen2_swa():
    """Qwen2 with `use_sliding_window`: layers from `max_window_layers` on slide, the first ones attend fully."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**_SIZES, **_SPECIAL, use_sliding_window=True, sliding_window=TINY_WINDOW, max_window_layers=2)
    return Qwen2ForCausalLM(config)


def _mistral_swa():
    """Mistral with a small window: every layer slides (one mask for all, a sliding cache in every layer)."""
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_SIZES, **_SPECIAL, sliding_window=TINY_WINDOW))


def _gemma2():
    """Gemma 2: alternating sliding/full layers, attention and final logit soft-capping."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**_SIZES, **_SPECIAL, head_dim=8, query_pre_attn_scalar=8, sliding_window=TINY_WINDOW,
                          layer_types=list(_MIXED), tie_word_embeddings=False)
    return Gemma2ForCausalLM(config)


def _gemma3():
    """Gemma 3: sliding layers with a local rotary base (10) far from the global one (10^6)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(**_SIZES, **_SPECIAL, head_dim=8, query_pre_attn_scalar=8, sliding_window=TINY_WINDOW,
                              rope_local_base_freq=10.0, layer_types=list(_MIXED), tie_word_embeddings=False)
    return Gemma3ForCausalLM(config)


def _cohere2():
    """Cohere 2: rotary positions on sliding layers only, full layers without positions."""
    from transformers import Cohere2Config, Cohere2ForCausalLM

    config = Cohere2Config(**_SIZES, **_SPECIAL, sliding_window=TINY_WINDOW, layer_types=list(_MIXED), logit_scale=1.0,
                           tie_word_embeddings=False)
    return Cohere2ForCausalLM(config)


def _olmo3():
    """OLMo 3: sliding and full layers, rotary parameters per layer type."""
    from transformers import Olmo3Config, Olmo3ForCausalLM

    config = Olmo3Config(**_SIZES, **_SPECIAL, sliding_window=TINY_WINDOW, layer_types=list(_MIXED))
    return Olmo3ForCausalLM(config)


def _gpt_oss():
    """GPT-OSS: mixture of experts, attention sinks, alternating sliding/full layers."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(**_SIZES, **_SPECIAL, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                          sliding_window=TINY_WINDOW, layer_types=list(_MIXED),
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return GptOssForCausalLM(config)


TINY_FAMILIES.register("llama", _llama)
TINY_FAMILIES.register("gpt2", _gpt2)
TINY_FAMILIES.register("qwen2", _qwen2)
TINY_FAMILIES.register("qwen2-swa", _qwen2_swa)
TINY_FAMILIES.register("mistral-swa", _mistral_swa)
TINY_FAMILIES.register("gemma2", _gemma2)
TINY_FAMILIES.register("gemma3", _gemma3)
TINY_FAMILIES.register("cohere2", _cohere2)
TINY_FAMILIES.register("olmo3", _olmo3)
TINY_FAMILIES.register("gpt-oss", _gpt_oss)

#: the families whose layers differ by type or that have a sliding window
LAYER_TYPED_FAMILIES = ("qwen2-swa", "mistral-swa", "gemma2", "gemma3", "cohere2", "olmo3", "gpt-oss")


def tiny_causal_lm(family: str, *, seed: int = 0, weight_scale: float = 16.0):
    """A tiny random causal LM of `family` (one of `TINY_FAMILIES`) in eval mode, fp32.

    `weight_scale` multiplies every matrix of the random init (std 0.02): the default 16 makes greedy decoding
    varied and decisive, and makes each state depend on the whole context it attends to (so a wrong mask or
    rotary base changes the tokens); 1 keeps each layer's change to the residual stream small.
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


def save_tiny_with_tokenizer(folder, *, family: str = "llama", chat: bool = False) -> str:
    """Saves a tiny random model of `family` with a character-level tokenizer (printable ASCII; with `chat`, a
    minimal chat template) to `folder`: a model folder every command that loads by name accepts. Returns the path."""
    from pathlib import Path

    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [chr(c) for c in range(32, 127)])}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    if chat:
        tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }} {% endfor %}"
                                   "{% if add_generation_prompt %}<assistant>{% endif %}")
    folder = Path(folder)
    tiny_causal_lm(family).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
