"""The causal-LM adapter: any Hugging Face decoder-only model cut into parts that keep their own KV cache.

Segments: `embed`, `layer.0` .. `layer.{L-1}`, `head` (final norm + LM head).

One adapter serves every family (Llama, Mistral, Qwen2, Phi, GPT-2 ...): a part runs the model's *own* base
forward over a window of its decoder layers, so whatever the family computes around its layers (rotary or learned
position embeddings, masks, dropout) is computed exactly as in the unsplit model. The window is a shallow view of
the base model whose layer list holds only the part's layers and whose final norm is the identity unless the part
ends the model. A part that starts mid-model feeds the received hidden state straight into its first layer.
Each part owns a KV cache holding only its layers; attention modules index it by their global layer number,
which the cache maps to its local slot.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from splitveil.core.errors import ConfigError
from splitveil.models.splittable import Part, Splittable

_LAYER_LIST_NAMES = ("layers", "h", "blocks", "block", "decoder_layers")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f", "final_norm")


def _find_child(module: nn.Module, names: tuple[str, ...], kind: str, predicate=lambda m: True) -> str:
    for name in names:
        child = module._modules.get(name)
        if child is not None and predicate(child):
            return name
    raise ConfigError(f"cannot find the {kind} of {type(module).__name__} (looked for {', '.join(names)})")


def _part_cache_class():
    from transformers import DynamicCache

    class PartCache(DynamicCache):
        """A DynamicCache over layers [first_layer, first_layer + n): global layer numbers map to local slots."""

        def __init__(self, config, first_layer: int, num_layers: int):
            super().__init__(config=config)
            self.layers = self.layers[first_layer : first_layer + num_layers]
            self.first_layer = first_layer

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(key_states, value_states, layer_idx - self.first_layer, *args, **kwargs)

    return PartCache


class _InjectHidden(nn.Module):
    """Wraps a part's first layer: the layer receives the hidden state sent by the previous part.

    The base forward computes its own input to the first layer from `inputs_embeds` (GPT-2 adds position
    embeddings there); the hidden state that crossed the cut already contains all of that, so it replaces it.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.incoming: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        return self.layer(self.incoming, *args, **kwargs)


class CausalLMSplittable(Splittable):
    """Wraps a transformers causal LM (`*ForCausalLM`) as a Splittable.

    Args:
        model: the loaded model; it is put in eval mode and shared (not copied) by every part.
    """

    def __init__(self, model: nn.Module):
        if not hasattr(model, "get_output_embeddings") or not hasattr(model, "base_model"):
            raise ConfigError(f"{type(model).__name__} is not a transformers causal LM")
        self.model = model.eval()
        self.config = model.config.get_text_config(decoder=True)
        self.base = model.base_model
        num_layers = self.config.num_hidden_layers
        self.layers_attr = _find_child(
            self.base,
            _LAYER_LIST_NAMES,
            "decoder layer list",
            lambda m: isinstance(m, nn.ModuleList) and len(m) == num_layers,
        )
        self.norm_attr = _find_child(self.base, _FINAL_NORM_NAMES, "final norm")
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None:
            raise ConfigError(f"{type(model).__name__} has no LM head")
        self.softcap = getattr(self.config, "final_logit_softcapping", None)

    @property
    def layers(self) -> nn.ModuleList:
        return self.base._modules[self.layers_attr]

    @property
    def final_norm(self) -> nn.Module:
        return self.base._modules[self.norm_attr]

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_prologue(self) -> int:
        return 1

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    @property
    def segment_names(self) -> list[str]:
        return ["embed", *(f"layer.{i}" for i in range(self.num_blocks)), "head"]

    def modules_for(self, start: int, end: int) -> list[nn.Module]:
        """The modules whose weights segments [start, end) use (for loading only a part's weights)."""
        modules: list[nn.Module] = []
        if start == 0:  # the prologue: embeddings and whatever else the base holds besides layers and final norm
            modules += [m for name, m in self.base.named_children() if name not in (self.layers_attr, self.norm_attr)]
        first, last = max(start - 1, 0), min(end - 1, self.num_blocks)
        modules += list(self.layers[first:last])
        if end == len(self.segment_names):
            modules += [self.final_norm, self.lm_head]
        return modules

    def make_part(self, start: int, end: int) -> "CausalLMPart":
        return CausalLMPart(self, start, end)

    def logits(self, normed_hidden: torch.Tensor) -> torch.Tensor:
        """LM head on final-normed hidden states [B, T, H] -> logits [B, T, V] (with the family's soft cap)."""
        logits = self.lm_head(normed_hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class CausalLMPart(Part):
    """Segments [start, end) of a causal LM with the KV cache of its own layers.

    Input: token ids [B, T] if the part holds `embed`, else hidden states [B, T, H] from the previous part.
    Output: logits [B, T', V] if the part holds `head` (T' = 1 when `last_logits_only`), else hidden [B, T, H].
    """

    def __init__(self, owner: CausalLMSplittable, start: int, end: int, *, last_logits_only: bool = False):
        n_segments = len(owner.segment_names)
        if not 0 <= start < end <= n_segments:
            raise ConfigError(f"bad segment range [{start}, {end}) for a model of {n_segments} segments")
        self.owner = owner
        self.start, self.end = start, end
        self.has_embed = start == 0
        self.has_head = end == n_segments
        self.first_layer = max(start - 1, 0)
        self.num_layers = min(end - 1, owner.num_blocks) - self.first_layer
        self.last_logits_only = last_logits_only
        self._view, self._inject = self._make_view()
        self.cache = None
        self.seq_len = 0  # positions seen so far by this part
        self.reset()

    @property
    def name(self) -> str:
        names = self.owner.segment_names
        return f"{names[self.start]}..{names[self.end - 1]}"

    def _make_view(self):
        """A shallow copy of the base model that runs only this part's layers (weights shared, not copied)."""
        owner = self.owner
        if self.num_layers == 0 and not self.has_embed:
            return None, None
        layers = list(owner.layers[self.first_layer : self.first_layer + self.num_layers])
        inject = None
        if not self.has_embed:
            inject = _InjectHidden(layers[0])
            layers[0] = inject
        view = copy.copy(owner.base)
        modules = dict(owner.base._modules)
        modules[owner.layers_attr] = nn.ModuleList(layers)
        if not self.has_head:
            modules[owner.norm_attr] = nn.Identity()
        object.__setattr__(view, "_modules", modules)
        return view, inject

    def reset(self) -> None:
        self.cache = _part_cache_class()(self.owner.config, self.first_layer, self.num_layers) if self.num_layers else None
        self.seq_len = 0

    def clone(self) -> "CausalLMPart":
        return CausalLMPart(self.owner, self.start, self.end, last_logits_only=self.last_logits_only)

    def fork_forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Runs B candidate continuations of one new position after this part's cached prefix, leaving the cache
        as it was. Differentiable when grad is enabled (the prefix is a constant). Needs a part holding `embed`.

        Args:
            inputs_embeds: [B, 1, H] input embeddings of the candidates at position `seq_len`.

        Returns:
            [B, 1, H] the part's output for each candidate (what would cross the cut).
        """
        if not self.has_embed or self.has_head or self._view is None:
            raise ConfigError("fork_forward needs a head part: it starts at the embedding and ends before the LM head")
        batch = inputs_embeds.shape[0]
        fork = None
        if self.cache is not None:
            fork = _part_cache_class()(self.owner.config, self.first_layer, self.num_layers)
            for own, new in zip(self.cache.layers, fork.layers):
                if own.is_initialized and own.keys.numel():
                    keys = own.keys.expand(batch, -1, -1, -1).clone()  # a normal tensor, usable by autograd
                    values = own.values.expand(batch, -1, -1, -1).clone()
                    new.lazy_initialization(keys, values)
                    new.keys, new.values = keys, values
        position_ids = torch.full((batch, 1), self.seq_len, dtype=torch.long)
        output = self._view(inputs_embeds=inputs_embeds, position_ids=position_ids, past_key_values=fork,
                            use_cache=fork is not None)
        return output.last_hidden_state

    @property
    def input_embeddings(self) -> torch.Tensor:
        """The embedding matrix [V, H] (what an attacker who knows the public weights ranks candidates against)."""
        return self.owner.model.get_input_embeddings().weight

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape[0], x.shape[1]
        if self._view is None:  # a part holding only the head
            hidden = self.owner.final_norm(x)
        else:
            position_ids = torch.arange(self.seq_len, self.seq_len + length, device=x.device).unsqueeze(0)
            position_ids = position_ids.expand(batch, length)
            if self.has_embed:
                inputs = {"input_ids": x}
            else:
                self._inject.incoming = x
                inputs = {"inputs_embeds": x}
            try:
                output = self._view(
                    **inputs,
                    position_ids=position_ids,
                    past_key_values=self.cache,
                    use_cache=self.cache is not None,
                )
            finally:
                if self._inject is not None:
                    self._inject.incoming = None
            hidden = output.last_hidden_state
        self.seq_len += length
        if not self.has_head:
            return hidden
        if self.last_logits_only:
            hidden = hidden[:, -1:]
        return self.owner.logits(hidden)


@torch.inference_mode()
def forward_batched_step(parts: list[CausalLMPart], hidden: torch.Tensor) -> torch.Tensor:
    """One decode step of several sessions through the same layers in one forward.

    Each part (one per session, same segments, no embedding) keeps its own KV cache of its own length. The caches
    are gathered left-padded into one batch cache, the step runs with a padding mask and each session's own
    positions, and each session's cache becomes its row of the grown batch cache (a view: no second copy).

    Args:
        parts: the sessions' parts, all over the same owner and segments, each holding layers.
        hidden: [B, 1, H] hidden states, row i for parts[i].

    Returns:
        [B, 1, H] hidden states, or [B, 1, V] logits when the parts hold the head.
    """
    first = parts[0]
    if first.has_embed or first._view is None:
        raise ConfigError("batched steps need parts that start after the embedding and hold layers")
    if any(p.owner is not first.owner or (p.start, p.end) != (first.start, first.end) for p in parts):
        raise ConfigError("batched steps need parts over the same model and segments")
    batch = len(parts)
    lengths = [p.seq_len for p in parts]
    longest = max(lengths)
    batch_cache = _part_cache_class()(first.owner.config, first.first_layer, first.num_layers)
    for slot in range(first.num_layers):
        sample = next((p.cache.layers[slot] for p in parts if p.seq_len), None)
        if sample is None:
            break  # every session is empty: nothing to gather
        kv_heads, head_dim = sample.keys.shape[1], sample.keys.shape[3]
        keys = sample.keys.new_zeros(batch, kv_heads, longest, head_dim)
        values = sample.values.new_zeros(batch, kv_heads, longest, head_dim)
        for row, part in enumerate(parts):
            if part.seq_len:
                keys[row, :, longest - part.seq_len:] = part.cache.layers[slot].keys[0]
                values[row, :, longest - part.seq_len:] = part.cache.layers[slot].values[0]
        layer = batch_cache.layers[slot]
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    mask = torch.zeros(batch, longest + 1, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, longest - length:] = 1
    position_ids = torch.tensor(lengths, dtype=torch.long).unsqueeze(1)  # [B, 1]: each session's own next position
    first._inject.incoming = hidden
    try:
        output = first._view(
            inputs_embeds=hidden,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=batch_cache,
            use_cache=True,
        )
    finally:
        first._inject.incoming = None
    for row, part in enumerate(parts):
        keep = longest + 1 - lengths[row] - 1  # padding columns of this row
        for slot in range(part.num_layers):
            grown = batch_cache.layers[slot]
            own = part.cache.layers[slot]
            if not own.is_initialized:
                own.lazy_initialization(grown.keys, grown.values)
            own.keys = grown.keys[row : row + 1, :, keep:]
            own.values = grown.values[row : row + 1, :, keep:]
        part.seq_len += 1
    out = output.last_hidden_state
    return first.owner.logits(out) if first.has_head else out
