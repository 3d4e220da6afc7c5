"""The trusted side: a causal LM whose protected linear layers become masked calls to the untrusted executor.

`SlipModel(model, config)` decomposes every linear group of the protected layers, replaces each of those modules
in the model by a `SlipLinear`, and hands back the same transformers model (`slip.model`): it generates like the
original (e.g. through `SplitCausalLM(slip.model, None, ...)`), with every protected product computed as

    fixed point:  y = decode( W_res (enc(x) + r)  -  W_res r ) + W_sec x + b      (ring Z_{2^64}, r uniform)
    float:        y =         W_res (x + r)       -  W_res r   + W_sec x + b      (float64, r uniform in +-scale)

where W_res (x + r) comes from the executor, W_res r from the mask pool, and W_sec x from the secure factors
(k (m + n) multiply-accumulates). Each reply is Freivalds-checked before use. Embeddings, norms, rotary
embeddings, attention products, activations and residual adds run here untouched.

`reference()` switches every group to the same computation in the clear (no masks, no executor): the fixed-point
protected outputs equal it bit for bit.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from splitveil.core.errors import ConfigError
from splitveil.protect.slip.decompose import Decomposition, LinearGroup, causal_lm_groups, decompose, is_decomposable, weight_matrix
from splitveil.protect.slip.errors import VerificationError
from splitveil.protect.slip.fixedpoint import (
    FixedPoint,
    RingWeight,
    float64_to_wire,
    uniform_float,
    uniform_ring,
    wire_to_float64,
)
from splitveil.protect.slip.freivalds import FreivaldsCheck
from splitveil.protect.slip.pool import MaskPool

MODES = ("fixed", "float")


@dataclass(frozen=True)
class SlipConfig:
    """How a model is protected.

    mode: "fixed" (ring, one-time pads: information-theoretic hiding) or "float" (float64, statistical hiding only).
    rank / energy: the secure part per matrix: top-`rank` singular components, or the fewest reaching `energy` of
        the squared spectrum; neither = 0 (everything offloaded: the prompt deployment with public weights).
    layers: protected decoder layers [start, stop); None = all of them.
    include_head: also protect the LM head (the weights deployment; it is a fifth of SmolLM2's FLOPs).
    repetitions: Freivalds repetitions t per product (a wrong reply passes with probability <= 2^-t).
    float_mask_scale: float masks are uniform in [-scale, scale].
    """

    mode: str = "fixed"
    rank: int | None = None
    energy: float | None = None
    layers: tuple[int, int] | None = None
    include_head: bool = False
    fixed_point: FixedPoint = field(default_factory=FixedPoint)
    repetitions: int = 2
    float_mask_scale: float = 2.0**24

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"unknown SLIP mode {self.mode!r}; use fixed or float")
        if self.rank is not None and self.energy is not None:
            raise ConfigError("give the secure rank or an energy fraction, not both")
        if self.repetitions < 0:
            raise ConfigError("Freivalds repetitions must be >= 0")
        if not self.float_mask_scale > 0:
            raise ConfigError("the float mask scale must be > 0")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["fixed_point"] = self.fixed_point.to_dict()
        return data


@dataclass
class SlipCost:
    """FLOPs (2 per multiply-accumulate, 1 per element-wise operation) counted on the run, per side."""

    untrusted_flops: int = 0  # W_res (x + r) on the executor
    secure_linear_flops: int = 0  # W_sec x through the factors
    check_flops: int = 0  # Freivalds
    mask_flops: int = 0  # encode, mask, unmask, decode
    local_linear_flops: int = 0  # unprotected linear layers run whole on the trusted side
    other_flops: int = 0  # attention products, norms, activations, rotary, residual adds (analytic count)
    products: int = 0  # masked products sent
    rows: int = 0  # masked rows (positions x groups)

    @property
    def trusted_flops(self) -> int:
        return self.secure_linear_flops + self.check_flops + self.mask_flops + self.local_linear_flops + self.other_flops

    @property
    def secure_share(self) -> float:
        total = self.trusted_flops + self.untrusted_flops
        return self.trusted_flops / total if total else 0.0

    @property
    def unprotected_flops(self) -> int:
        """What the plain model would do for the same run (W = W_sec + W_res costs one product)."""
        return self.untrusted_flops + self.local_linear_flops + self.other_flops

    def to_dict(self) -> dict:
        return {**asdict(self), "trusted_flops": self.trusted_flops, "secure_share": self.secure_share,
                "unprotected_flops": self.unprotected_flops}


class GroupRuntime:
    """The trusted side of one linear group: secure factors, mask pool, Freivalds check, connection."""

    def __init__(self, group: LinearGroup, parts: list[Decomposition], biases: list[torch.Tensor | None],
                 config: SlipConfig, cost: SlipCost, *, generator: np.random.Generator | None = None):
        self.group = group
        self.config = config
        self.cost = cost
        self.fixed_point = config.fixed_point
        self.lefts = [p.left for p in parts]  # [m_j, k_j]
        self.rights = [p.right for p in parts]  # [k_j, n]
        self.biases = biases
        bounds = np.cumsum([0, *group.out_features])
        self.slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        residual = torch.cat([p.residual for p in parts]) if len(parts) > 1 else parts[0].residual  # [m, n]
        n = group.in_features
        if config.mode == "fixed":
            encoded = self.fixed_point.encode_w(residual)  # int64 [m, n]
            self.ring_weight = RingWeight(encoded)
            self.w_max = float(residual.abs().max()) if residual.numel() else 0.0
            sample = lambda count: uniform_ring((count, n), generator=generator)  # noqa: E731
            deal = self.ring_weight.matmul
        else:
            self.ring_weight = None
            encoded = self.weight = residual.to(torch.float64)
            self.lefts = [left.to(torch.float64) for left in self.lefts]
            self.rights = [right.to(torch.float64) for right in self.rights]
            sample = lambda count: uniform_float((count, n), scale=config.float_mask_scale, generator=generator)  # noqa: E731
            deal = lambda r: r @ self.weight.t()  # noqa: E731
        self.pool = MaskPool(sample=sample, deal=deal, ring=config.mode == "fixed")
        self.check = FreivaldsCheck(encoded, repetitions=config.repetitions, generator=generator)
        del encoded
        self.client = None  # SlipClient, once connected
        self.clear = False  # compute in the clear (the reference)
        self._cached: tuple | None = None  # (input tensor, member outputs, members still to collect)

    def output(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """Member `member`'s output for input x [..., n]; one masked product serves every member of the group when
        they are called on the same tensor (q, k, v; gate, up)."""
        cached = self._cached
        if cached is not None and cached[0] is x and member in cached[2]:
            cached[2].discard(member)
            if not cached[2]:
                self._cached = None
            return cached[1][member]
        y = self.compute(x.reshape(-1, x.shape[-1]))
        outputs = [y[:, part].reshape(*x.shape[:-1], -1) for part in self.slices]
        rest = set(range(len(self.slices))) - {member}
        self._cached = (x, outputs, rest) if rest else None
        return outputs[member]

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """x [P, n] float32 -> y [P, m] float32 = W x + b, the residual part through the executor."""
        rows, n = x.shape
        m = self.group.total_out
        if self.config.mode == "fixed":
            self.fixed_point.check_product_fits(x, self.w_max)
            encoded = self.fixed_point.encode_x(x)
            product = self.ring_weight.matmul(encoded) if self.clear else self._masked(encoded, m)
            y = self.fixed_point.decode_product(product)
            secure = [(x @ right.t()) @ left.t() for left, right in zip(self.lefts, self.rights)]
        else:
            x64 = x.to(torch.float64)
            y = x64 @ self.weight.t() if self.clear else self._masked(x64, m)
            secure = [(x64 @ right.t()) @ left.t() for left, right in zip(self.lefts, self.rights)]
        for part, term, right, bias in zip(self.slices, secure, self.rights, self.biases):
            if right.shape[0]:  # a rank-0 member has no secure part
                y[:, part] += term.to(y.dtype)
            if bias is not None:
                y[:, part] += bias.to(y.dtype)
        y = y.to(torch.float32)
        ranks = sum(right.shape[0] * (right.shape[1] + left.shape[0]) for left, right in zip(self.lefts, self.rights))
        self.cost.secure_linear_flops += 2 * rows * ranks
        self.cost.mask_flops += 2 * rows * (n + m)
        self.cost.untrusted_flops += 2 * rows * m * n
        if not self.clear:
            self.cost.check_flops += 2 * rows * self.check.repetitions * (n + m)
            self.cost.products += 1
            self.cost.rows += rows
        return y

    def _masked(self, x: torch.Tensor, m: int) -> torch.Tensor:
        if self.client is None:
            raise ConfigError("this SLIP model is not connected to an executor; call attach() or use reference()")
        masks = self.pool.take(x.shape[0])
        sent = masks.mask(x)  # ring: wraps mod 2^64; float: x + r
        if self.config.mode == "fixed":
            reply = self.client.multiply(self.group.group_id, sent, m)
        else:
            reply = wire_to_float64(self.client.multiply(self.group.group_id, float64_to_wire(sent), m))
        if not self.check.verify(sent, reply):
            self.client.close()  # abort: nothing more goes to an executor caught cheating in this session
            raise VerificationError(f"the executor's reply for linear group {self.group.group_id} failed the Freivalds "
                                    f"check ({self.check.repetitions} repetitions): it did not compute W_residual (x + r)")
        return masks.unmask(reply)


class SlipLinear(nn.Module):
    """Stands in for one protected linear module: its output comes from the group's masked product."""

    def __init__(self, runtime: GroupRuntime, member: int, name: str):
        super().__init__()
        self.runtime = runtime
        self.member = member
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., n] -> [..., m_member]
        return self.runtime.output(x, self.member)

    def extra_repr(self) -> str:
        group = self.runtime.group
        return f"{self.name}: group {group.group_id}, member {self.member}, rank {self.runtime.rights[self.member].shape[0]}"


class ProtectedGroups:
    """The verbs every protected model shares over its `runtimes` (one `GroupRuntime` per linear group):
    `SlipModel` (a causal LM) and `network.SlipNetwork` (any stack of linear and convolution layers)."""

    runtimes: list[GroupRuntime]

    def attach(self, client) -> None:
        """Routes every group's masked products through `client` (a `SlipClient`)."""
        for runtime in self.runtimes:
            runtime.client = client

    def executor_weights(self) -> dict[int, torch.Tensor]:
        """The matrices an executor multiplies with (exactly the ones the masks were dealt with)."""
        return {runtime.group.group_id: runtime.ring_weight.to_int64() if runtime.ring_weight is not None else runtime.weight
                for runtime in self.runtimes}

    def fill_pools(self, rows: int) -> float:
        """Precomputes `rows` mask pairs for every group (offline); returns the seconds it took."""
        before = self.offline_seconds
        for runtime in self.runtimes:
            runtime.pool.refill(rows)
        return self.offline_seconds - before

    @property
    def offline_seconds(self) -> float:
        return sum(runtime.pool.offline_seconds for runtime in self.runtimes)

    @contextlib.contextmanager
    def reference(self):
        """Computes every protected product in the clear (same arithmetic, no masks, no executor) inside."""
        for runtime in self.runtimes:
            runtime.clear = True
        try:
            yield self
        finally:
            for runtime in self.runtimes:
                runtime.clear = False


class SlipModel(ProtectedGroups):
    """Protects a transformers causal LM in place: see the module docstring.

    Args:
        model: the causal LM (its protected linear modules are replaced; keep no other reference to them).
        config: what to protect and how.
        decompositions: precomputed {group id: [Decomposition per member]} (from a cache); computed when None.
        generator: a seeded numpy generator for masks and checks (tests only; default: OS randomness).
    """

    def __init__(self, model: nn.Module, config: SlipConfig, *, decompositions: dict[int, list[Decomposition]] | None = None,
                 generator: np.random.Generator | None = None):
        self.model = model
        self.config = config
        self.cost = SlipCost()
        num_layers = model.config.num_hidden_layers
        start, stop = config.layers if config.layers is not None else (0, num_layers)
        found = causal_lm_groups(model, layers=range(start, stop), include_head=config.include_head)
        self.groups: list[LinearGroup] = [group for group, _ in found]
        owners = {id(child): (parent, attr) for parent in model.modules() for attr, child in parent.named_children()}
        self.decompositions: dict[int, list[Decomposition]] = {}
        self.runtimes: list[GroupRuntime] = []
        rank = config.rank if config.rank is not None or config.energy is not None else 0
        for group, modules in found:
            parts = (decompositions or {}).get(group.group_id)
            if parts is None:
                parts = [decompose(weight_matrix(module), rank=rank if config.energy is None else None, energy=config.energy)
                         for module in modules]
            self.decompositions[group.group_id] = parts
            biases = [getattr(module, "bias", None) for module in modules]
            biases = [b.detach().clone() if b is not None else None for b in biases]
            runtime = GroupRuntime(group, parts, biases, config, self.cost, generator=generator)
            self.runtimes.append(runtime)
            for member, (name, module) in enumerate(zip(group.members, modules)):
                parent, attr = owners[id(module)]
                setattr(parent, attr, SlipLinear(runtime, member, name))
        self._hooks = [model.register_forward_pre_hook(self._count_other, with_kwargs=True)]
        for module in model.modules():
            if is_decomposable(module):  # what stays unprotected runs whole here
                self._hooks.append(module.register_forward_hook(self._count_local))

    # -- connection and masks --------------------------------------------------------------------------------

    def residual_weights(self) -> dict[int, torch.Tensor]:
        """W_residual per group, float32 [m, n]: what the untrusted side is given."""
        return {gid: torch.cat([p.residual for p in parts]) for gid, parts in self.decompositions.items()}

    def secure_rank(self) -> int:
        return max((p.rank for parts in self.decompositions.values() for p in parts), default=0)

    # -- FLOPs of what stays on the trusted side -------------------------------------------------------------

    def _count_local(self, module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            self.cost.local_linear_flops += 2 * output.numel() * weight_matrix(module).shape[1]

    def _count_other(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        cache = kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        self.cost.other_flops += other_flops(self.model.config, ids.shape[-1], past) * ids.shape[0]


def other_flops(config, positions: int, past: int) -> int:
    """FLOPs of a forward of `positions` new positions after `past` cached ones, outside the linear layers:
    attention scores and value products (2 x 2 x heads x head_dim per attended position), softmax, norms, rotary,
    the gated activation and residual adds (element-wise, a few operations per element). Analytic."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    attended = positions * past + positions * (positions + 1) // 2  # sum over new positions of the context length
    per_layer = (4 * heads * head_dim * attended  # QK^T and AV, 2 FLOPs per multiply-accumulate
                 + 5 * heads * attended  # softmax
                 + positions * (2 * 4 * hidden + 2 * hidden + 6 * (heads + kv_heads) * head_dim + 5 * inner))
    return config.num_hidden_layers * per_layer + positions * 4 * hidden


def default_rank(config, *, target_share: float = 0.045, context: int = 32, include_head: bool = True,
                 repetitions: int = 2) -> int:
    """The largest secure rank k whose predicted secure-side FLOPs share of one decode step at `context` cached
    positions stays within `target_share` (the issue asks <= 5%; 4.5% leaves a margin). The trusted side's attention
    grows with the context, so at long contexts no k meets a fixed share: the measured share is reported per run."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = [(hidden, q + 2 * kv), (q, hidden), (hidden, 2 * inner), (inner, hidden)]  # (n, m) per group
    shapes = shapes * config.num_hidden_layers + ([(hidden, config.vocab_size)] if include_head else [])
    untrusted = sum(2 * n * m for n, m in shapes)
    fixed = other_flops(config, 1, context) + sum(2 * (n + m) + 2 * repetitions * (n + m) for n, m in shapes)
    members = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inner), (hidden, inner), (inner, hidden)]
    per_rank = sum(2 * (n + m) for n, m in members) * config.num_hidden_layers + (2 * (hidden + config.vocab_size) if include_head else 0)
    best = 0
    for k in range(0, hidden + 1):
        share = (fixed + k * per_rank) / (fixed + k * per_rank + untrusted)
        if share > target_share:
            break
        best = k
    return best


# -- caching decompositions ------------------------------------------------------------------------------------


def save_decompositions(folder: Path, decompositions: dict[int, list[Decomposition]]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for gid, parts in decompositions.items():
        for j, part in enumerate(parts):
            tensors[f"left.{gid}.{j}"] = part.left.contiguous()
            tensors[f"right.{gid}.{j}"] = part.right.contiguous()
            tensors[f"residual.{gid}.{j}"] = part.residual.contiguous()
    save_file(tensors, str(folder / "decomposition.safetensors"))


def load_decompositions(folder: Path, groups: list[LinearGroup]) -> dict[int, list[Decomposition]] | None:
    from safetensors.torch import load_file

    path = folder / "decomposition.safetensors"
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    try:
        return {g.group_id: [Decomposition(tensors[f"left.{g.group_id}.{j}"], tensors[f"right.{g.group_id}.{j}"],
                                           tensors[f"residual.{g.group_id}.{j}"]) for j in range(len(g.members))]
                for g in groups}
    except KeyError:
        return None
