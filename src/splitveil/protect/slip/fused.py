"""Two round trips per decoder layer instead of four: the dealt device's fused groups and its lean decoder.

A Llama-family decoder layer computes, from the residual stream h,

    q, k, v = W_qkv norm_in(h)           attention(q, k, v) = t
    h' = h + W_o t                       gate, up = W_gu norm_post(h')          a = silu(gate) * up
    h'' = h' + W_down a                  (the next layer's q, k, v = W_qkv' norm_in'(h''))

and norm(x) = g * x / rms(x) with a per-row scalar rms(x). Only the attention and the activation are non-linear;
the norms are linear but for that scalar, which the device applies after the product. So the products between
two non-linear steps can travel together:

    round trip A (after the attention):  [t ; h]   ->  [W_o t ; W_gu G (h + W_o t)]
                                         matrix [[W_o, 0], [W_gu G W_o, W_gu G]]
    round trip B (after the activation): [a ; h']  ->  [W_down a ; W_qkv' G' (h' + W_down a)]
                                         matrix [[W_down, 0], [W_qkv' G' W_down, W_qkv' G']]

with G = diag(g). The device divides the second block by rms(h + W_o t) (resp. rms(h'')), which it can compute
from the first block. The first offloaded layer's q, k, v take one round trip of their own (matrix W_qkv G from
the embeddings or the last layer kept on the device), and the masked LM head one more: 2 L + 2 round trips per
decode step for L offloaded layers (62 on SmolLM2 with `--split 0,30`, against 121 unfused).

Each fused group is still one public matrix applied to one masked row: the executor, the dealer, the masks, the
Freivalds keys and the checks are those of every group, and neither party sees anything else. What it costs:
the executor and the dealer multiply about twice the weights (the composite blocks W_gu G W_o and W_qkv' G'
W_down) and hold them; the device sends the residual row beside each non-linear output. The composites are
computed in float64 and rounded to float32 once, before fixed-point encoding, by whoever builds the bundle and by
the device's key builder alike (`fused_sources`).

`FusedDealtStage` runs the device's side without transformers' modules: embedding, rotary embeddings, the
attention over its own KV cache, the activation, the norms' scalars and sampling's logits, in a few tensor
operations per layer. It has the interface of the unsplit model's stage in `edge.generate` (reset, positions,
truncate, last_logits_only), so generation, sampling, stop strings, `--chat` and speculative decoding work on it
as on every split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitveil.core.errors import ConfigError
from splitveil.protect.slip.cost import other_flops
from splitveil.protect.slip.decompose import LinearGroup


def fuse_refusal(model) -> str | None:
    """Why this model's offloaded layers cannot be fused (None when they can): the fused groups are written for
    Llama-family layers (RMS norms, a SiLU-gated MLP, no biases, rotary attention without sliding windows)."""
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        return f"fused groups are built for Llama-family models, not {getattr(config, 'model_type', type(model).__name__)}"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "fused groups are built for layers without biases"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"fused groups are built for a SiLU-gated MLP, not {config.hidden_act}"
    return None


FUSE_CHOICES = ("auto", "on", "off")


def check_fuse(fuse: str) -> None:
    if fuse not in FUSE_CHOICES:
        raise ConfigError(f"--fuse takes {', '.join(FUSE_CHOICES)}, not {fuse!r}")


def resolve_fuse(model, fuse: str) -> bool:
    """`--fuse auto|on|off` for `model` (meta weights are fine): whether its dealt device uses fused groups."""
    check_fuse(fuse)
    refusal = fuse_refusal(model)
    if fuse == "on" and refusal is not None:
        raise ConfigError(f"--fuse on: {refusal}; use --fuse off")
    return fuse != "off" and refusal is None


def _layer_names(index: int) -> dict[str, str]:
    prefix = f"model.layers.{index}"
    return {"q": f"{prefix}.self_attn.q_proj.weight", "k": f"{prefix}.self_attn.k_proj.weight",
            "v": f"{prefix}.self_attn.v_proj.weight", "o": f"{prefix}.self_attn.o_proj.weight",
            "gate": f"{prefix}.mlp.gate_proj.weight", "up": f"{prefix}.mlp.up_proj.weight",
            "down": f"{prefix}.mlp.down_proj.weight", "norm_in": f"{prefix}.input_layernorm.weight",
            "norm_post": f"{prefix}.post_attention_layernorm.weight"}


def _normed_input(tensors: dict, names: dict, members: tuple[str, ...], norm: str) -> torch.Tensor:
    """The stacked weights of `members` with the norm's weight folded in: W G."""
    return torch.cat([tensors[names[m]] for m in members]) * tensors[names[norm]]


def _composite(first: torch.Tensor, then: torch.Tensor | None, residual: int) -> torch.Tensor:
    """The fused matrix for the input [x; h] (h the residual stream, `residual` wide): [[first, 0], [then first,
    then]] in float64 rounded to float32 once, or [first, 0] without `then`."""
    top = torch.cat([first, torch.zeros(first.shape[0], residual, dtype=first.dtype)], 1)
    if then is None:
        return top.float()
    return torch.cat([top, torch.cat([then @ first, then], 1)]).float()


def fused_groups(model, layers: range, include_head: bool) -> list[tuple[LinearGroup, object]]:
    """The fused groups of decoder layers `layers` (and the LM head) of a Llama-family model, each with its matrix
    source (a function of a `plan.parts.Checkpoint` returning the float32 matrix [m, n]; see the module docstring).
    Group ids count from 0: the first layer's q, k, v; then per layer its round trips A and B; then the head."""
    refusal = fuse_refusal(model)
    if refusal is not None:
        raise ConfigError(refusal)
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    hidden, inner = config.hidden_size, config.intermediate_size
    qkv_out = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    found: list[tuple[LinearGroup, object]] = []

    def add(members, in_features, out_features, layer, source):
        found.append((LinearGroup(len(found), tuple(members), in_features, tuple(out_features), layer), source))

    def qkv_source(index):
        names = _layer_names(index)

        def read(checkpoint):
            t = checkpoint.read([names[k] for k in ("q", "k", "v", "norm_in")])
            return _normed_input(t, names, ("q", "k", "v"), "norm_in")
        return read

    def attention_out_source(index):
        names = _layer_names(index)

        def read(checkpoint):
            t = {k: v.double() for k, v in checkpoint.read([names[k] for k in ("o", "gate", "up", "norm_post")]).items()}
            return _composite(t[names["o"]], _normed_input(t, names, ("gate", "up"), "norm_post"), hidden)
        return read

    def mlp_out_source(index, next_index):
        names = _layer_names(index)
        after = _layer_names(next_index) if next_index is not None else None

        def read(checkpoint):
            wanted = [names["down"]] + ([after[k] for k in ("q", "k", "v", "norm_in")] if after else [])
            t = {k: v.double() for k, v in checkpoint.read(wanted).items()}
            then = _normed_input(t, after, ("q", "k", "v"), "norm_in") if after else None
            return _composite(t[names["down"]], then, hidden)
        return read

    if len(layers):
        first = layers.start
        add([f"layer.{first}.{m}_proj*input_layernorm" for m in "qkv"], hidden, qkv_out, first, qkv_source(first))
    for index in layers:
        add([f"layer.{index}.o_proj", f"layer.{index}.gate_proj*post_attention_layernorm(h+o)",
             f"layer.{index}.up_proj*post_attention_layernorm(h+o)"],
            heads * head_dim + hidden, (hidden, inner, inner), index, attention_out_source(index))
        following = index + 1 if index + 1 < layers.stop else None
        members = [f"layer.{index}.down_proj"]
        if following is not None:
            members += [f"layer.{following}.{m}_proj*input_layernorm(h+down)" for m in "qkv"]
        add(members, inner + hidden, (hidden, *(qkv_out if following is not None else ())), index,
            mlp_out_source(index, following))
    if include_head:
        head = model.get_output_embeddings()
        if head is None:
            raise ConfigError("this model has no linear LM head to protect")
        name = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight)

        def read_head(checkpoint):
            return checkpoint.read([name])[name]
        add(["lm_head"], hidden, (head.weight.shape[0],), None, read_head)
    return found


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


class FusedDealtStage:
    """The dealt device's decoder for Llama-family models, with the fused groups (see the module docstring).

    Args:
        model: the causal LM with the offloaded linear weights on the meta device (`dealt.load_dealt_model`): its
            embeddings, norms, rotary embedding and the layers kept on the device are used as they are.
        dealt: the connected `DealtGroups` of `fused_groups(model, layers, include_head)`.
        layers: the offloaded decoder layers.
        include_head: whether the LM head is the last group (masked) or computed here.
    """

    def __init__(self, model, dealt, layers: range, include_head: bool):
        config = model.config
        self.model = model
        self.dealt = dealt
        self.layers = layers
        self.include_head = include_head
        core = model.model
        self.embedding = core.embed_tokens
        self.rotary = core.rotary_emb
        self.final_norm = core.norm.weight.detach()
        self.eps = float(config.rms_norm_eps)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden, self.inner = config.hidden_size, config.intermediate_size
        self.scale = self.head_dim ** -0.5
        self.decoder = core.layers
        runtimes = iter(dealt.runtimes)
        self.first = next(runtimes) if len(layers) else None
        self.rounds = {index: (next(runtimes), next(runtimes)) for index in layers}
        self.head = next(runtimes) if include_head else None
        from splitveil.models.causal_lm import CausalLMSplittable

        self.logits = None if include_head else CausalLMSplittable(model).logits
        self.last_logits_only = True
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0

    # -- the interface of edge.generate's stages ---------------------------------------------------------------

    def reset(self) -> None:
        self.length = 0

    @property
    def positions(self) -> int:
        return self.length

    def truncate(self, length: int) -> None:
        """Keeps the first `length` positions of the KV cache (speculative decoding's rollback)."""
        if not 0 <= length <= self.length:
            raise ConfigError(f"cannot keep {length} of {self.length} positions")
        self.length = length

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [1, T] -> logits [1, 1, V] (the last position) or [1, T, V] (`last_logits_only` off)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ConfigError("the fused dealt device runs one sequence at a time")
        count, past = input_ids.shape[1], self.length
        head_rows = 1 if self.last_logits_only else count
        dealt = self.dealt
        dealt.cost.other_flops += other_flops(self.model.config, count, past)
        dealt.begin_forward(count, head_rows)
        try:
            h = self.embedding(input_ids[0]).float()
            self._grow(past + count)
            cos, sin = self.rotary(h[None], torch.arange(past, past + count)[None])
            cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, d], broadcast over heads
            mask = None if count == 1 else torch.ones(count, past + count, dtype=torch.bool).tril(past)
            qkv = None
            for index in range(len(self.decoder)):
                if index in self.rounds:
                    h, qkv = self._offloaded(index, h, qkv, cos, sin, mask, past)
                else:
                    h = self._local(index, h, cos, sin, mask, past)
            rows = h[-head_rows:]
            normed = self._norm(rows) * self.final_norm
            logits = self.head.compute(normed) if self.head is not None else self.logits(normed[None])[0]
            dealt.verify()  # every product checked before a token is chosen from these logits
        finally:
            for runtime in dealt.runtimes:
                runtime.pending = []
        self.length = past + count
        return logits.float()[None]

    # -- the layers --------------------------------------------------------------------------------------------

    def _offloaded(self, index, h, qkv, cos, sin, mask, past):
        """One offloaded layer: two round trips (A and B); returns (h after the layer, the next layer's q, k, v
        when it is offloaded too, else None)."""
        if qkv is None:  # the first offloaded layer's q, k, v: a round trip of its own
            qkv = self.first.compute(h) * self._inverse_rms(h)
        attended = self._attend(index, qkv, cos, sin, mask, past)
        round_a, round_b = self.rounds[index]
        y = round_a.compute(torch.cat([attended, h], 1))
        h = h + y[:, : self.hidden]
        gate, up = (y[:, self.hidden :] * self._inverse_rms(h)).split(self.inner, 1)
        activated = F.silu(gate) * up
        y = round_b.compute(torch.cat([activated, h], 1))
        h = h + y[:, : self.hidden]
        following = y[:, self.hidden :] * self._inverse_rms(h) if y.shape[1] > self.hidden else None
        return h, following

    def _local(self, index, h, cos, sin, mask, past):
        """A layer kept whole on the device, with its own weights."""
        layer = self.decoder[index]
        attention = layer.self_attn
        x = self._norm(h) * layer.input_layernorm.weight
        qkv = torch.cat([attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)], 1)
        h = h + attention.o_proj(self._attend(index, qkv, cos, sin, mask, past))
        return h + layer.mlp(self._norm(h) * layer.post_attention_layernorm.weight)

    def _attend(self, index, qkv, cos, sin, mask, past):
        """Rotary embeddings, the KV cache and the attention of one layer: qkv [T, (H + 2 K) d] -> [T, H d]."""
        count, d = qkv.shape[0], self.head_dim
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], 1)
        q, k, v = q.view(count, self.heads, d), k.view(count, self.kv_heads, d), v.view(count, self.kv_heads, d)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = self.keys[index], self.values[index]
        keys[:, past : past + count] = k.transpose(0, 1)
        values[:, past : past + count] = v.transpose(0, 1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None, :, : past + count],
                                             values[None, :, : past + count], attn_mask=mask, scale=self.scale,
                                             enable_gqa=self.heads != self.kv_heads)
        return out[0].transpose(0, 1).reshape(count, self.heads * d)

    def _inverse_rms(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._inverse_rms(x)

    def _grow(self, length: int) -> None:
        """KV cache buffers [K, capacity, d] per layer, doubled when `length` outgrows them."""
        capacity = self.keys[0].shape[1] if self.keys else 0
        if length <= capacity:
            return
        capacity = max(64, capacity)
        while capacity < length:
            capacity *= 2
        shape = (self.kv_heads, capacity, self.head_dim)
        layers = len(self.decoder)
        old = (self.keys, self.values)
        self.keys = [torch.zeros(shape) for _ in range(layers)]
        self.values = [torch.zeros(shape) for _ in range(layers)]
        for new, kept in zip((self.keys, self.values), old):
            for buffer, previous in zip(new, kept):
                buffer[:, : self.length] = previous[:, : self.length]
