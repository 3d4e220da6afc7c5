"""KV caches of causal-LM parts: each session's cache owns its memory, kept in buffers with spare capacity.

A part's cache (`PartCache`) holds only the part's layers, with the layer types the model config gives those layers
(sliding-window layers keep the last `window - 1` positions, as transformers' `DynamicSlidingWindowLayer` does).
Each attention layer keeps its keys and values in a buffer `[batch, kv_heads, capacity, head_dim]` that grows
geometrically, so that a step appends in place instead of concatenating (and copying) the whole history.

A batched decode step of many sessions (`StepCache`) keeps no batch tensor: it *stages* each session's new position
in that session's own buffer, attention runs on each session's own keys and values (`ragged_attention`: long rows
one by one, short rows in one transient padded call), and only a forward that succeeds *commits* the staged
positions. A failed batched step therefore leaves every session as it was.

Import this module lazily: it imports transformers.
"""

from __future__ import annotations

import copy
import sys

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from splitveil.core.errors import ConfigError

#: the attention implementation name under which `ragged_attention` is registered with transformers
RAGGED_ATTENTION = "splitveil_ragged"
MIN_SPARE = 16  # positions of spare capacity at least, whenever a buffer grows
# A batched step's rows of at most this many bytes of keys + values per layer attend in one padded call
# (SmolLM2: about 85 positions); longer rows attend one by one (measured crossover: benchmarks/results/batched-*).
PADDED_ROW_BYTES = 128 * 1024
_MASKED_IMPLEMENTATIONS = ("sdpa", "eager")  # implementations that take an additive [B, 1, q, kv] float mask


class BufferedLayer(DynamicLayer):
    """The keys and values of one full-attention layer, in buffers with spare capacity (appends are in place).

    `keys` / `values` are views `[batch, kv_heads, length, head_dim]` of the valid region of the buffers. A view
    handed out stays valid: appends write only past its end, and a buffer that must grow is replaced, not resized.
    Assigning `keys` / `values` (as transformers' crop, reorder and offload methods do) replaces the content.
    """

    _layer_type = None  # never registered in transformers' layer-type mappings
    is_sliding = False

    def __init__(self):
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._start = self._end = 0  # the valid region [start, end) of the buffers
        self.cumulative_length = 0  # positions ever appended
        super().__init__()

    # -- the valid region, as transformers expects it --------------------------------------------------------

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._key_buffer is None else self._key_buffer[:, :, self._start : self._end]

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._key_buffer = tensor
        self._start, self._end = 0, 0 if tensor is None else tensor.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._value_buffer is None else self._value_buffer[:, :, self._start : self._end]

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._value_buffer = tensor

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[3])
        self.values = value_states.new_empty(*value_states.shape[:2], 0, value_states.shape[3])
        self.is_initialized = True

    def reset(self) -> None:
        self.keys = self.values = None
        self.cumulative_length = 0
        self.is_initialized = False

    # -- appending ---------------------------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Appends `[batch, kv_heads, n, head_dim]` states; returns the keys and values the new positions attend to."""
        keys, values = self.stage(key_states, value_states)
        self.commit(key_states.shape[-2])
        return keys, values

    def stage(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new states just past the valid region without committing them; returns what they attend to."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[-2]
        self._reserve(count)
        end = self._end + count
        self._key_buffer[:, :, self._end : end] = key_states
        self._value_buffer[:, :, self._end : end] = value_states
        return self._key_buffer[:, :, self._start : end], self._value_buffer[:, :, self._start : end]

    def commit(self, count: int) -> None:
        """Makes `count` staged positions part of the valid region."""
        self._end += count
        self.cumulative_length += count

    def _reserve(self, count: int) -> None:
        """Makes room for `count` positions past the valid region (a new, larger buffer when full)."""
        if self._end + count > self._key_buffer.shape[-2]:
            needed = self._end - self._start + count
            self._move_to_new_buffers(needed + max(needed // 2, MIN_SPARE))

    def _move_to_new_buffers(self, capacity: int) -> None:
        """Copies the valid region to the start of new buffers of `capacity` positions (the old ones are left as
        they are, so views already handed out stay valid)."""
        kept = self._end - self._start
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
            new[:, :, :kept] = old[:, :, self._start : self._end]
            setattr(self, name, new)
        self._start, self._end = 0, kept

    def truncate(self, length: int) -> None:
        """Keeps the first `length` positions (the rest of the buffers becomes spare capacity)."""
        if not 0 <= length <= self.get_seq_length():
            raise ConfigError(f"cannot keep {length} of {self.get_seq_length()} positions")
        if self.is_initialized:
            self._end = self._start + length
        self.cumulative_length = length

    # -- sizes -------------------------------------------------------------------------------------------------

    def get_seq_length(self) -> int:
        return self._end - self._start

    def nbytes(self) -> int:
        """Bytes of every storage this layer keeps alive (spare capacity included)."""
        return sum(t.untyped_storage().nbytes() for t in (self._key_buffer, self._value_buffer) if t is not None)

    def forked(self, batch: int) -> "BufferedLayer":
        """A copy whose content is this layer's, repeated `batch` times along the batch dimension (own memory)."""
        fork = copy.copy(self)
        if self.is_initialized:
            fork.keys = self.keys.expand(batch, -1, -1, -1).clone()
            fork.values = self.values.expand(batch, -1, -1, -1).clone()
        return fork


class BufferedSlidingLayer(BufferedLayer):
    """A sliding-window layer: keeps the last `window - 1` positions, as `DynamicSlidingWindowLayer` does."""

    is_sliding = True
    is_croppable = False

    def __init__(self, sliding_window: int):
        super().__init__()
        self.sliding_window = sliding_window

    def commit(self, count: int) -> None:
        super().commit(count)
        self._start = max(self._start, self._end - (self.sliding_window - 1))
        if self._key_buffer.shape[-2] > 2 * (self.sliding_window + MIN_SPARE):  # after a long prefill: shrink
            self._move_to_new_buffers(self.sliding_window + MIN_SPARE)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window

    get_mask_sizes = DynamicSlidingWindowLayer.get_mask_sizes

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a sliding-window part cache cannot be cropped")

    def truncate(self, length: int) -> None:
        raise ConfigError("a sliding-window layer keeps only its last positions: it cannot roll back")


def _buffered(layer):
    """The buffered equivalent of a transformers cache layer; layers of other kinds are kept as they are."""
    if type(layer) is DynamicLayer:
        return BufferedLayer()
    if type(layer) is DynamicSlidingWindowLayer:
        return BufferedSlidingLayer(layer.sliding_window)
    return layer


def _storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class PartCache(DynamicCache):
    """The cache of layers [first_layer, first_layer + num_layers): global layer numbers map to local slots.

    Built from the whole model's config and sliced, so each layer gets the cache type of its own global layer.
    """

    def __init__(self, config, first_layer: int, num_layers: int):
        super().__init__(config=config)
        self.layers = [_buffered(layer) for layer in self.layers[first_layer : first_layer + num_layers]]
        self.first_layer = first_layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states, value_states, layer_idx - self.first_layer, *args, **kwargs)

    def state_bytes(self) -> int:
        """Bytes of memory this cache keeps alive: every layer's storages, spare capacity included."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, BufferedLayer):
                total += layer.nbytes()
            else:
                total += _storage_bytes(t for t in vars(layer).values() if isinstance(t, torch.Tensor))
        return total

    def truncate(self, length: int) -> None:
        """Keeps the first `length` positions of every layer (ConfigError, and nothing changed, when a layer
        cannot: sliding-window and linear-attention layers)."""
        for layer in self.layers:
            if type(layer) is not BufferedLayer:
                raise ConfigError(f"a {type(layer).__name__} cannot roll back: this part's cache cannot be truncated")
        for layer in self.layers:
            layer.truncate(length)

    def forked(self, batch: int) -> "PartCache":
        """A cache holding this one's content repeated `batch` times (for candidate continuations), own memory."""
        if not all(isinstance(layer, BufferedLayer) for layer in self.layers):
            raise ConfigError("forking a part cache needs attention layers only (no linear-attention state)")
        fork = copy.copy(self)
        fork.layers = [layer.forked(batch) for layer in self.layers]
        return fork


class RaggedStates:
    """The keys (or values) of one layer for every session of a batched step: one tensor per session.

    Args:
        tensors: row i holds session i's `[1, kv_heads, length_i, head_dim]` states (the lengths differ).
        inner: the attention implementation each session's attention runs with (the model's own).
    """

    def __init__(self, tensors: list[torch.Tensor], inner: str):
        self.tensors = tensors
        self.inner = inner


class StepCache(Cache):
    """The cache of one batched decode step: each row's new position is staged in that session's own cache.

    Args:
        caches: one `PartCache` per row, all over the same layers, each of batch 1 and attention layers only.
        inner: the model's own attention implementation (`config._attn_implementation`).
    """

    def __init__(self, caches: list[PartCache], inner: str):
        for cache in caches:
            if not all(isinstance(layer, BufferedLayer) for layer in cache.layers):
                raise ConfigError("batched steps need attention layers only (no linear-attention state)")
            if any(layer.is_initialized and layer.keys.shape[0] != 1 for layer in cache.layers):
                raise ConfigError("batched steps need sessions of batch 1")
        super().__init__(layers=list(caches[0].layers))
        self.caches = caches
        self.first_layer = caches[0].first_layer
        self.inner = inner
        self._staged: dict[int, BufferedLayer] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Stages row i of `[B, kv_heads, 1, head_dim]` states in session i; returns ragged keys and values."""
        slot = layer_idx - self.first_layer
        keys, values = [], []
        for row, cache in enumerate(self.caches):
            layer = cache.layers[slot]
            row_keys, row_values = layer.stage(key_states[row : row + 1], value_states[row : row + 1])
            keys.append(row_keys)
            values.append(row_values)
            self._staged[id(layer)] = layer
        return RaggedStates(keys, self.inner), RaggedStates(values, self.inner)

    def commit(self) -> None:
        """Makes every staged position part of its session's cache (call once the forward has succeeded)."""
        for layer in self._staged.values():
            layer.commit(1)
        self._staged = {}


def _inner_attention(module, name: str):
    """The attention function `name` as the module's family would call it (its own eager function as default)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    family_eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if name == "eager" and family_eager is None:
        raise ConfigError(f"cannot find the eager attention of {type(module).__name__} for batched steps")
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, family_eager)


def ragged_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention of a batched decode step: each row on its own session's keys and values.

    Each row's query (one position) attends to everything its session's cache returned for it: all earlier
    positions for a full layer, the last `window - 1` and itself for a sliding one, which is what the family's mask
    allows at a decode step. Long rows run one at a time with the model's own attention implementation (no
    padding, no mask, no copy). Short rows (at most `PADDED_ROW_BYTES` each) are copied into one transient
    left-padded tensor and run in one call with an additive padding mask: for them the copy costs less than a call
    per row. Nothing of that copy outlives the call.

    Args:
        module: the attention module.
        query: [B, heads, 1, head_dim].
        key, value: `RaggedStates` staged by `StepCache.update`.
        attention_mask: ignored (None: the batched view has no mask).

    Returns:
        ([B, 1, heads, head_dim] attention output, None)
    """
    if not isinstance(key, RaggedStates) or query.shape[2] != 1:
        raise ConfigError("ragged attention runs batched decode steps (one position per row) only")
    inner = _inner_attention(module, key.inner)
    longest = max(t.shape[-2] for t in key.tensors)
    sample = key.tensors[0]
    row_bytes = 2 * longest * sample.shape[1] * sample.shape[3] * sample.element_size()
    if key.inner in _MASKED_IMPLEMENTATIONS and row_bytes <= PADDED_ROW_BYTES:
        keys, values, mask = _left_padded(key.tensors, value.tensors, longest)
        return inner(module, query, keys, values, mask, **kwargs)[0], None
    outputs = [
        inner(module, query[row : row + 1], row_keys, row_values, None, **kwargs)[0]
        for row, (row_keys, row_values) in enumerate(zip(key.tensors, value.tensors))
    ]
    return torch.cat(outputs, dim=0), None


def _left_padded(keys: list[torch.Tensor], values: list[torch.Tensor], longest: int):
    """Rows `[1, kv_heads, L_i, head_dim]` copied into `[B, kv_heads, longest, head_dim]` tensors, right-aligned, and
    the additive mask `[B, 1, 1, longest]` (0 on each row's positions, the dtype's minimum on its padding)."""
    sample = keys[0]
    shape = (len(keys), sample.shape[1], longest, sample.shape[3])
    padded_keys, padded_values = sample.new_zeros(shape), sample.new_zeros(shape)
    mask = sample.new_full((len(keys), 1, 1, longest), torch.finfo(sample.dtype).min)
    for row, (row_keys, row_values) in enumerate(zip(keys, values)):
        length = row_keys.shape[-2]
        padded_keys[row, :, longest - length :] = row_keys[0]
        padded_values[row, :, longest - length :] = row_values[0]
        mask[row, :, :, longest - length :] = 0
    return padded_keys, padded_values, mask


def register_ragged_attention() -> None:
    """Registers `ragged_attention` with transformers (once; it only runs for `RaggedStates`)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if RAGGED_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(RAGGED_ATTENTION, ragged_attention)
