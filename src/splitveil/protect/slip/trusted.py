"""The trusted side: a causal LM whose protected linear layers become masked calls to the untrusted executor.

`SlipModel(model, config)` decomposes every linear group of the protected layers, replaces each of those modules
in the model by a `SlipLinear`, and hands back the same transformers model (`slip.model`): it generates like the
original (e.g. through `SplitCausalLM(slip.model, None, ...)`), with every protected product computed as

    fixed point:  y = decode( W_res (enc(x) + r)  -  W_res r ) + W_sec x + b      (ring Z_{2^64}, r uniform)
    float:        y =         W_res (x + r)       -  W_res r   + W_sec x + b      (float64, r uniform in +-scale)

where W_res (x + r) comes from the executor, W_res r from the mask pool, and W_sec x from the secure factors
(k (m + n) multiply-accumulates). Each reply is checked before use (`freivalds.py`: vectors fresh for every
session, and the range of the unmasked product); a failed check ends the session. Embeddings, norms, rotary
embeddings, attention products, activations and residual adds run here untouched.

`reference()` switches every group to the same computation in the clear (no masks, no executor): the fixed-point
protected outputs equal it bit for bit.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

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
from splitveil.protect.slip.cost import SlipCost, other_flops
from splitveil.protect.slip.freivalds import FreivaldsCheck, within_range
from splitveil.protect.slip.pool import MaskPool

MODES = ("fixed", "float")
PREPARED_BITS_PER_VECTOR = 12  # check vectors drawn ahead per session: enough for ranges below 2^52


@dataclass(frozen=True)
class SlipConfig:
    """How a model is protected.

    mode: "fixed" (ring, one-time pads: information-theoretic hiding) or "float" (float64, statistical hiding only).
    rank / energy: the secure part per matrix: top-`rank` singular components, or the fewest reaching `energy` of
        the squared spectrum; neither = 0 (everything offloaded: the prompt deployment with public weights).
    layers: protected decoder layers [start, stop); None = all of them.
    include_head: also protect the LM head (the weights deployment; it is a fifth of SmolLM2's FLOPs).
    repetitions: the fewest Freivalds vectors t per product; fresh vectors every session (`freivalds.py`).
    soundness_bits: fixed point: each product gets as many vectors as its range needs for a wrong reply to pass
        with probability <= 2^-soundness_bits (2 to 4 on SmolLM2); 0 = exactly t. The float check is tolerance-based.
    pad_to: the first product of a session (the prompt) and every multi-row product are padded with dummy rows
        to a multiple of pad_to, so that the executor sees the prompt length rounded up (1 = no padding).
    float_mask_scale: float masks are uniform in [-scale, scale].
    mask_rank: 0 for the plain split; r > 0 folds a secret random rank-r term into the secure part so that the
        residual is full rank and the null-space attack on it finds nothing (`decompose.py`, docs/slip.md).
    fuse: the prompt deployment with a mask dealer: fused groups, two round trips per decoder layer instead of four
        (`fused.py`; Llama-family models).
    """

    mode: str = "fixed"
    rank: int | None = None
    energy: float | None = None
    layers: tuple[int, int] | None = None
    include_head: bool = False
    fixed_point: FixedPoint = field(default_factory=FixedPoint)
    repetitions: int = 2
    soundness_bits: int = 40
    pad_to: int = 1
    float_mask_scale: float = 2.0**24
    mask_rank: int = 0  # weights deployment: r > 0 hardens the split (a secret rank-r term; `decompose.py`)
    fuse: bool = False  # dealer deployment: two round trips per layer (`fused.py`)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"unknown SLIP mode {self.mode!r}; use fixed or float")
        if self.rank is not None and self.energy is not None:
            raise ConfigError("give the secure rank or an energy fraction, not both")
        if self.repetitions < 0 or not 0 <= self.soundness_bits <= 256:
            raise ConfigError("Freivalds repetitions must be >= 0 and soundness bits in 0..256")
        if self.pad_to < 1:
            raise ConfigError(f"--pad-to must be >= 1, got {self.pad_to}")
        if not self.float_mask_scale > 0:
            raise ConfigError("the float mask scale must be > 0")
        if self.mask_rank < 0:
            raise ConfigError(f"--mask-rank must be >= 0, got {self.mask_rank}")
        if self.mask_rank and not (self.rank or self.energy):
            raise ConfigError("--mask-rank hardens a secure part: it needs a secure rank k >= 1 (the weights deployment)")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["fixed_point"] = self.fixed_point.to_dict()
        return data


class SharedInputGroup:
    """One linear group on the trusted side, as the model calls it: each member module asks for its output, and one
    masked product (`compute`, the subclass's) serves every member called on the same tensor (q, k, v; gate, up).
    Subclasses set `group`, `slices` (each member's columns of the product), `config` and `client`."""

    group: LinearGroup
    slices: list[slice]
    config: SlipConfig
    client: object | None
    _cached: tuple | None = None  # (input tensor, member outputs, members still to collect)
    _session: object | None = None  # the client session this group's check vectors were drawn for
    _session_products: int = 0  # products of this group in that session

    def output(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """Member `member`'s output for input x [..., n]."""
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
        raise NotImplementedError

    def new_session(self) -> None:
        """The client opened a new session: draw fresh check vectors."""
        raise NotImplementedError

    def padded_rows(self, rows: int, *, first: bool) -> int:
        """Rows sent for a product of `rows` rows (`SlipConfig.pad_to`: the session's first product and every
        multi-row product are padded)."""
        pad = self.config.pad_to
        return -(-rows // pad) * pad if pad > 1 and (rows > 1 or first) else rows

    def _begin_product(self, rows: int) -> int:
        """Fresh check vectors when the client is in a new session; the rows to send."""
        if self.client is None:
            raise ConfigError("this SLIP model is not connected to an executor; call attach() or use reference()")
        session = self.client.session_key()  # opens a session if none is open
        if session is not self._session:
            self.new_session()
            self._session, self._session_products = session, 0
        self._session_products += 1
        return self.padded_rows(rows, first=self._session_products == 1)


class GroupRuntime(SharedInputGroup):
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
        self.check = FreivaldsCheck(self.ring_weight if config.mode == "fixed" else encoded, repetitions=config.repetitions,
                                    soundness_bits=config.soundness_bits, generator=generator,
                                    prepared=-(-config.soundness_bits // PREPARED_BITS_PER_VECTOR))
        del encoded
        self.client = None  # SlipClient, once connected
        self.clear = False  # compute in the clear (the reference)

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
        if self.clear:
            self.cost.mask_flops += 2 * rows * (n + m)
            self.cost.untrusted_flops += 2 * rows * m * n
        return y

    def new_session(self) -> None:
        self.check.new_session()

    def _masked(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """x [P, n] (ring elements or float64) -> W_residual x [P, m] through the executor, checked: Freivalds on
        the reply, and (fixed point) the range of the unmasked product. A failure ends the client's session."""
        rows, n = x.shape
        sent_rows = self._begin_product(rows)
        if sent_rows > rows:  # dummy rows: computed on, masked like the rest, dropped here
            x = torch.cat([x, x.new_zeros(sent_rows - rows, n)])
        fixed = self.config.mode == "fixed"
        bound = self.check.range_of(x) if fixed else None
        masks = self.pool.take(sent_rows)
        sent = masks.mask(x)  # ring: wraps mod 2^64; float: x + r
        if fixed:
            reply = self.client.multiply(self.group.group_id, sent, m)
        else:
            reply = wire_to_float64(self.client.multiply(self.group.group_id, float64_to_wire(sent), m))
        vectors = self.check.vectors_for(bound)
        self.cost.mask_flops += 2 * sent_rows * (n + m)
        self.cost.untrusted_flops += 2 * sent_rows * m * n
        self.cost.check_flops += 2 * sent_rows * vectors * (n + m) + (sent_rows * (2 * n + m) if fixed else 0)
        self.cost.products += 1
        self.cost.rows += sent_rows
        if not self.check.verify(sent, reply, bound=bound):
            self._fail(f"failed the Freivalds check ({vectors} vectors)")
        product = masks.unmask(reply)
        if fixed and not within_range(product, bound):
            self._fail(f"left the product's range (|y| <= {bound:.3g})")
        return product[:rows]

    def _fail(self, what: str):
        message = (f"the executor's reply for linear group {self.group.group_id} {what}: it did not compute "
                   f"W_residual (x + r); this session is over and nothing more is sent to that executor in it")
        self.client.fail(message)
        raise VerificationError(message)


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
        rights = getattr(self.runtime, "rights", None)
        return f"{self.name}: group {group.group_id}, member {self.member}, rank {rights[self.member].shape[0] if rights else 0}"


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

    def held_weight_bytes(self) -> int:
        """Bytes of weight matrices the groups hold besides the model's parameters (the ring encodings or float64
        copies of W_residual the masks are dealt with, the secure factors): model weights this process holds too."""
        total = 0
        for runtime in self.runtimes:
            ring = runtime.ring_weight
            matrices = [ring.int64, ring.float64, ring.float32] if ring is not None else [runtime.weight]
            matrices += [*runtime.lefts, *runtime.rights]
            total += sum(t.numel() * t.element_size() for t in matrices if t is not None)
        return total

    def fill_pools(self, rows: int) -> float:
        """Precomputes `rows` mask pairs and the next session's check vectors for every group (offline); returns the
        seconds it took."""
        before = self.offline_seconds
        for runtime in self.runtimes:
            runtime.pool.refill(rows)
            runtime.check.prepare()
        return self.offline_seconds - before

    @property
    def offline_seconds(self) -> float:
        """Mask pairs and check vectors made so far (those made during a run included, as the pools count them)."""
        return sum(runtime.pool.offline_seconds + runtime.check.setup_seconds for runtime in self.runtimes)

    def soundness_bits(self) -> int | None:
        """The fixed-point check's weakest guarantee in the current session: every product's wrong reply would have
        passed with probability <= 2^-bits (None: float variant, or nothing checked yet)."""
        bits = [runtime.check.weakest_bits for runtime in self.runtimes if runtime.check.weakest_bits is not None]
        return min(bits) if bits else None

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
                parts = [decompose(weight_matrix(module), rank=rank if config.energy is None else None, energy=config.energy,
                                   mask_rank=config.mask_rank) for module in modules]
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
