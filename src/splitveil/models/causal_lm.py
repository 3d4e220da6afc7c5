"""The causal-LM adapter: any Hugging Face decoder-only model cut into parts that keep their own KV cache.

Segments: `embed`, `layer.0` .. `layer.{L-1}`, `head` (final norm + LM head).

One adapter serves every family (Llama, Mistral, Qwen2, Phi, GPT-2 ...): a part runs the model's *own* base
forward over a window of its decoder layers, so whatever the family computes around its layers (rotary or learned
position embeddings, masks, dropout) is computed exactly as in the unsplit model. The window is a shallow view of
the base model whose layer list holds only the part's layers and whose final norm is the identity unless the part
ends the model. A part that starts mid-model feeds the received hidden state straight into its first layer.
Each part owns a KV cache holding only its layers (`kv_cache.PartCache`); attention modules index it by their
global layer number, which the cache maps to its local slot. The view carries its own copy of the config whose
per-layer lists (`layer_types` ...) hold only the part's layers, because the base forward picks each layer's mask
and rotary embedding by the layer's index in the (shortened) layer list.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from splitveil.core.errors import ConfigError
from splitveil.models.few_rows import use_few_rows_products
from splitveil.models.precision import module_placement
from splitveil.models.splittable import Part, Splittable

_LAYER_LIST_NAMES = ("layers", "h", "blocks", "block", "decoder_layers")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f", "final_norm")
# config attributes listing one entry per layer: names ending so, or named so
_PER_LAYER_SUFFIXES = ("_types", "_type", "_modes")
_PER_LAYER_NAMES = ("no_rope_layers",)


def _find_child(module: nn.Module, names: tuple[str, ...], kind: str, predicate=lambda m: True) -> str:
    for name in names:
        child = module._modules.get(name)
        if child is not None and predicate(child):
            return name
    raise ConfigError(f"cannot find the {kind} of {type(module).__name__} (looked for {', '.join(names)})")


def _new_cache(owner: "CausalLMSplittable", first_layer: int, num_layers: int):
    from splitveil.models.kv_cache import PartCache

    return PartCache(owner.config, first_layer, num_layers)


def _is_per_layer(name: str, value, num_layers: int) -> bool:
    """Whether config attribute `name` lists one entry per decoder layer (`layer_types`, `no_rope_layers` ...)."""
    if not isinstance(value, (list, tuple)) or len(value) != num_layers or name.startswith("mtp_"):
        return False
    return name.endswith(_PER_LAYER_SUFFIXES) or name in _PER_LAYER_NAMES


def _part_config(config, first_layer: int, num_layers: int):
    """A shallow copy of `config` whose per-layer lists hold only layers [first_layer, first_layer + num_layers).

    The base forward of a family looks a layer's type up by the layer's index in its layer list (`layer_types[i]`
    picks the mask and the rotary embedding); in a part's view that index is local, so the lists must be too.
    """
    if first_layer and getattr(config, "is_heterogeneous", False):
        raise ConfigError("models with per-layer config overrides (per_layer_config) can only be cut before layer 0")
    total = config.num_hidden_layers
    sliced = copy.copy(config)
    for name, value in vars(config).items():
        if _is_per_layer(name, value, total):
            setattr(sliced, name, type(value)(value[first_layer : first_layer + num_layers]))
    sliced.num_hidden_layers = num_layers
    return sliced


def _with_config_for_ragged_steps(module: nn.Module, configs: dict) -> nn.Module:
    """A shallow copy of `module` in which every submodule holding a config holds a copy that selects ragged
    attention (weights shared, not copied); `module` itself when nothing in it holds a config."""
    children = {name: None if child is None else _with_config_for_ragged_steps(child, configs)
                for name, child in module._modules.items()}
    config = module.__dict__.get("config")
    changed = any(new is not old for new, old in zip(children.values(), module._modules.values()))
    if config is None and not changed:
        return module
    clone = copy.copy(module)
    object.__setattr__(clone, "_modules", children)
    if config is not None:
        if id(config) not in configs:
            configs[id(config)] = _ragged_copy(config)
        clone.__dict__["config"] = configs[id(config)]
    return clone


def _ragged_copy(config):
    """A shallow copy of `config` that selects ragged attention (and so builds no masks)."""
    from splitveil.models.kv_cache import RAGGED_ATTENTION

    ragged = copy.copy(config)
    ragged._attn_implementation = RAGGED_ATTENTION
    return ragged


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
        self.model = use_few_rows_products(model.eval())  # speculative passes and small batches: `models.few_rows`
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
        # (start, end) -> whether batched decode steps of that range equal single steps (checked on first use)
        self.batch_verdicts: dict[tuple[int, int], bool] = {}

    @property
    def layers(self) -> nn.ModuleList:
        return self.base._modules[self.layers_attr]

    @property
    def can_roll_back(self) -> bool:
        """Whether every layer's cache can drop its last positions (full attention only; speculative decoding)."""
        from splitveil.models.kv_cache import BufferedLayer

        return all(type(layer) is BufferedLayer for layer in _new_cache(self, 0, self.num_blocks).layers)

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
        """LM head on final-normed hidden states [B, T, H] -> logits [B, T, V] (with the family's soft cap), in
        float32 whatever the weights' dtype (as transformers returns them; a bf16 value converts exactly)."""
        logits = self.lm_head(normed_hidden.to(self.lm_head.weight.dtype))  # 2-8 rows at one row's cost: few_rows
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()


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
        self.defer_head = False  # a head part returns its final-normed hidden states; the caller applies `logits`
        # where this part's weights live and their dtype: what it casts its input to (the wire decodes float32)
        self.device, self.dtype = module_placement(owner.modules_for(start, end))
        self._view, self._inject = self._make_view()
        self._ragged = None  # (view, inject) for batched decode steps, built on first use
        self.cache = None
        self.seq_len = 0  # positions seen so far by this part
        self.reset()

    @property
    def name(self) -> str:
        names = self.owner.segment_names
        return f"{names[self.start]}..{names[self.end - 1]}"

    def _make_view(self, *, ragged: bool = False):
        """A shallow copy of the base model that runs only this part's layers (weights shared, not copied).

        The view's config is the part's own (per-layer lists sliced to its layers). With `ragged`, the layers'
        attention modules and the view read copies of their configs that select `ragged_attention`, for batched
        decode steps (and the view builds no masks: a decode step attends to everything its session kept).
        """
        owner = self.owner
        if self.num_layers == 0 and not self.has_embed:
            return None, None
        layers = list(owner.layers[self.first_layer : self.first_layer + self.num_layers])
        config = _part_config(owner.base.config, self.first_layer, self.num_layers)
        if ragged:
            configs: dict = {}  # the layers keep whole-model configs (they index them by global layer number)
            layers = [_with_config_for_ragged_steps(layer, configs) for layer in layers]
            config = _ragged_copy(config)
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
        view.__dict__["config"] = config
        return view, inject

    def _ragged_view(self):
        """The view for batched decode steps (built on first use; see `_make_view`)."""
        if self._ragged is None:
            self._ragged = self._make_view(ragged=True)
        return self._ragged

    def reset(self) -> None:
        self.cache = _new_cache(self.owner, self.first_layer, self.num_layers) if self.num_layers else None
        self.seq_len = 0

    def state_bytes(self) -> int:
        """Bytes of memory this part's KV cache keeps alive (its own buffers, spare capacity included)."""
        return self.cache.state_bytes() if self.cache is not None else 0

    @property
    def positions(self) -> int:
        return self.seq_len

    def truncate(self, length: int) -> None:
        """Keeps the first `length` positions of the KV cache (ConfigError when out of range, or for layers that
        cannot roll back: sliding-window, linear attention); the part then continues at position `length`."""
        if not 0 <= length <= self.seq_len:
            raise ConfigError(f"cannot keep {length} positions of a part that holds {self.seq_len}")
        if self.cache is not None:
            self.cache.truncate(length)
        self.seq_len = length

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
        fork = self.cache.forked(batch) if self.cache is not None else None  # normal tensors, usable by autograd
        position_ids = torch.full((batch, 1), self.seq_len, dtype=torch.long, device=inputs_embeds.device)
        output = self._view(inputs_embeds=inputs_embeds, position_ids=position_ids, past_key_values=fork,
                            use_cache=fork is not None)
        return output.last_hidden_state

    @property
    def input_embeddings(self) -> torch.Tensor:
        """The input embeddings [V, H] of every token, as the model's embedding module outputs them (scaled for the
        families that scale them, e.g. Gemma): what an attacker who knows the public weights ranks candidates
        against, and what `fork_forward` takes."""
        module = self.owner.model.get_input_embeddings()
        scale = getattr(module, "embed_scale", None)
        return module.weight if scale is None else module.weight * scale.to(module.weight.dtype)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape[0], x.shape[1]
        x = x.to(self.device) if self.has_embed else x.to(device=self.device, dtype=self.dtype)
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
        if not self.has_head or self.defer_head:
            return hidden
        if self.last_logits_only:
            hidden = hidden[:, -1:]
        return self.owner.logits(hidden)


@torch.inference_mode()
def forward_batched_step(parts: list[CausalLMPart], hidden: torch.Tensor) -> torch.Tensor:
    """One decode step of several sessions through the same layers in one forward.

    Each part (one per session, same segments) keeps its own KV cache of its own length; parts that hold the
    embedding take token ids (a device's head parts, one per concurrent generation), the others hidden states. Everything
    but attention runs once for the batch; attention runs per session on that session's own cache, into which
    the step appends in place (`kv_cache.StepCache`): no cache is copied into a batch tensor, no memory is shared
    between sessions, and each row sees exactly what a single step of its session would (no padding, no mask).
    The new positions are committed only when the whole forward succeeded: a failed step changes no session.

    A family might compute something per position that this skips (a mask carrying a position bias, say), so the
    first batched step of each model and segment range is also run as single steps on copies of the caches; if
    they differ, that range is never batched (ConfigError, and the service runs the steps one at a time).

    Args:
        parts: the sessions' parts, all over the same owner and segments, each holding layers.
        hidden: [B, 1, H] hidden states, row i for parts[i] ([B, 1] token ids for parts holding the embedding).

    Returns:
        [B, 1, H] hidden states, or [B, 1, V] logits when the parts hold the head.
    """
    from splitveil.models.kv_cache import StepCache, register_ragged_attention

    first = parts[0]
    _check_batchable(parts, hidden)
    register_ragged_attention()
    step_cache = StepCache([p.cache for p in parts], first.owner.config._attn_implementation)
    view, inject = first._ragged_view()
    position_ids = torch.tensor([p.seq_len for p in parts], dtype=torch.long, device=first.device).unsqueeze(1)
    if first.has_embed:  # token ids through the model's own embedding, as a single step of such a part runs them
        hidden = hidden.to(first.device)
        output = view(input_ids=hidden, position_ids=position_ids, past_key_values=step_cache, use_cache=True)
    else:
        hidden = hidden.to(device=first.device, dtype=first.dtype)
        inject.incoming = hidden
        try:
            output = view(inputs_embeds=hidden, position_ids=position_ids, past_key_values=step_cache, use_cache=True)
        finally:
            inject.incoming = None
    out = output.last_hidden_state
    result = first.owner.logits(out) if first.has_head else out
    key = (first.start, first.end)
    if key not in first.owner.batch_verdicts:
        first.owner.batch_verdicts[key] = _agrees_with_single_steps(parts, hidden, result)
        _check_batchable(parts, hidden)
    step_cache.commit()
    for part in parts:
        part.seq_len += 1
    return result


_BATCHABLE_LAYER_TYPES = {"full_attention", "sliding_attention"}


def _check_batchable(parts: list[CausalLMPart], hidden: torch.Tensor) -> None:
    """Raises a ConfigError unless `parts` can run one batched step on `hidden`."""
    first = parts[0]
    if first._view is None or not first.num_layers:
        raise ConfigError("batched steps need parts that hold layers")
    if first.has_embed and (hidden.dtype != torch.long or hidden.dim() != 2):
        raise ConfigError("a batched step of parts holding the embedding takes [B, 1] token ids")
    if any(p.owner is not first.owner or (p.start, p.end) != (first.start, first.end) for p in parts):
        raise ConfigError("batched steps need parts over the same model and segments")
    if hidden.shape[0] != len(parts) or hidden.shape[1] != 1:
        raise ConfigError(f"a batched step takes [{len(parts)}, 1, ...] inputs, got {list(hidden.shape)}")
    other_types = set(getattr(first._view.config, "layer_types", None) or ()) - _BATCHABLE_LAYER_TYPES
    if other_types:
        raise ConfigError(f"batched steps run full and sliding-window attention, not {', '.join(sorted(other_types))}")
    if first.owner.batch_verdicts.get((first.start, first.end)) is False:
        raise ConfigError(f"batched steps of {first.name} differ from single steps for this model; run them one by one")


def _agrees_with_single_steps(parts: list[CausalLMPart], hidden: torch.Tensor, batched: torch.Tensor) -> bool:
    """Whether `batched` (a batched step's output) equals single steps of every part, run on copies of their caches
    (float tolerance relative to the output's scale: 1e-4 in float32, 8 units in the last place in bf16 and fp16,
    whose kernels for one row and for B rows may round differently)."""
    tolerance = max(1e-4, 8 * torch.finfo(parts[0].dtype).eps)
    for row, part in enumerate(parts):
        probe = part.clone()
        probe.cache, probe.seq_len = part.cache.forked(1), part.seq_len
        single = probe(hidden[row : row + 1])
        scale = max(1.0, float(single.abs().max()))
        if not torch.allclose(batched[row : row + 1], single, rtol=tolerance, atol=tolerance * scale):
            return False
    return True
