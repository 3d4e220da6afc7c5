"""Top-k SVD of each weight matrix: W = W_secure + W_residual, W_secure = U_k S_k V_k^T kept as its two factors.

Linear layers are matrices [out, in]; transformers' GPT-2 `Conv1D` stores [in, out] and is transposed; a 2-D
convolution is the matrix [out, in x kh x kw] applied to the unfolded input (`conv_as_matmul`). Everything else
(embeddings, norms, non-linearities, attention score and value products, residual adds, biases) is not a weight
matrix product and stays with the trusted side.

Which linear layers share an input (q, k and v read the same normed hidden state; gate and up read the same one)
is declared by name in `SHARED_INPUT_SETS`: those are grouped, so that one round trip serves the whole group.

Hardened split (`mask_rank` > 0). The plain residual W - U_k S_k V_k^T has rank min(m, n) - k: its null spaces
contain U_k and V_k exactly, so whoever holds it knows the secret subspaces and only a small block is left to
guess (`attack/weights`, the null-space attack). The hardened split adds a secret term to the secure part,
W_secure = U_k S_k V_k^T + L C R^T, where L = orth[U_k, A] and R = orth[V_k, B] extend the top subspaces by
`mask_rank` random directions A, B, and C is a random (k + mask_rank)^2 matrix whose singular values are drawn from
the middle of the residual's own spectrum (quantiles 0.25 to 0.9 of s_{k+1..}). The residual W - W_secure is then
full rank, its smallest singular directions are the matrix's own, and no singular value stands out above or below
the residual's. The secure part stays two factors of rank k + mask_rank (its cost grows in proportion), and
W_secure + W_residual == W as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from splitveil.core.errors import ConfigError

#: linear layers (by module name) that one family's forward applies to the very same input tensor
SHARED_INPUT_SETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen2, Gemma, Phi-3 attention
    ("gate_proj", "up_proj"),  # gated MLPs
    ("query", "key", "value"),  # BERT-style attention
    ("w1", "w3"),  # Mixtral-style experts
)


def is_decomposable(module: nn.Module) -> bool:
    """A module whose computation is one weight-matrix product (plus an optional bias)."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None  # transformers GPT-2


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as a matrix [out, in] (a view or copy; do not write to it)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ConfigError(f"grouped convolutions ({module.groups} groups) are not decomposed")
        return module.weight.detach().reshape(module.out_channels, -1)
    if type(module).__name__ == "Conv1D":
        return module.weight.detach().t()
    raise ConfigError(f"{type(module).__name__} is not a linear layer")


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Writes a matrix [out, in] back into the module's own weight layout."""
    with torch.no_grad():
        if isinstance(module, nn.Conv2d):
            module.weight.copy_(matrix.reshape(module.weight.shape))
        elif type(module).__name__ == "Conv1D":
            module.weight.copy_(matrix.t())
        else:
            module.weight.copy_(matrix)


def conv_as_matmul(conv: nn.Conv2d, x: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """conv(x) computed as matrix [out, in*kh*kw] @ unfold(x): the form in which a convolution is decomposed and
    masked. `matrix` defaults to the convolution's own weight matrix; the bias is added. x: [B, C, H, W]."""
    import torch.nn.functional as F

    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ConfigError("only ungrouped, zero-padded convolutions with numeric padding are computed as matrices")
    matrix = weight_matrix(conv) if matrix is None else matrix
    columns = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)  # [B, in*kh*kw, L]
    out = matrix @ columns  # [B, out, L]
    if conv.bias is not None:
        out = out + conv.bias.detach()[:, None]
    h = (x.shape[2] + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
    w = (x.shape[3] + 2 * conv.padding[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[1] + 1
    return out.reshape(x.shape[0], matrix.shape[0], h, w)


def choose_rank(singular_values: torch.Tensor, *, rank: int | None = None, energy: float | None = None) -> int:
    """k for one matrix: a fixed `rank` (clipped to the matrix's rank), or the fewest components whose squared
    singular values reach the `energy` fraction of the total. Exactly one of the two."""
    if (rank is None) == (energy is None):
        raise ConfigError("choose the secure rank by --rank K or by an energy fraction, not both and not neither")
    if rank is not None:
        if rank < 0:
            raise ConfigError(f"the secure rank must be >= 0, got {rank}")
        return min(int(rank), singular_values.numel())
    if not 0.0 <= energy <= 1.0:
        raise ConfigError(f"the energy fraction must be in [0, 1], got {energy}")
    if energy == 0.0:
        return 0
    power = singular_values.double() ** 2
    share = torch.cumsum(power, 0) / power.sum()
    return min(int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype) - 1e-12).item()) + 1,
               singular_values.numel())


@dataclass
class Decomposition:
    """W [m, n] = left [m, k] @ right [k, n] + residual [m, n]; left = U_k S_k, right = V_k^T (the secure part)."""

    left: torch.Tensor  # [m, k]
    right: torch.Tensor  # [k, n]
    residual: torch.Tensor  # [m, n]

    @property
    def rank(self) -> int:
        return self.right.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.residual.shape)

    def secure_weight(self) -> torch.Tensor:
        return self.left @ self.right

    def secure_macs_per_row(self) -> int:
        """Multiply-accumulates of the secure part for one input row: k (m + n), vs m n for the whole matrix."""
        m, n = self.shape
        return self.rank * (m + n)


def decompose(weight: torch.Tensor, *, rank: int | None = None, energy: float | None = None, mask_rank: int = 0,
              generator: torch.Generator | None = None) -> Decomposition:
    """Top-k SVD split of `weight` [m, n] (computed in float64; factors and residual returned in float32).

    The residual is W - W_secure computed in float64 and rounded once, so W_secure + W_residual equals W to
    float32 rounding. k = 0 gives an empty secure part and the residual W itself (bit for bit).

    Args:
        mask_rank: 0 for the plain split; r > 0 for the hardened one (see the module docstring): the secure part
            gets rank k + r and the residual loses its null spaces. Needs k >= 1.
        generator: the source of the hardened split's secret randomness (a seeded torch generator in tests;
            default: a fresh OS-seeded one).
    """
    if mask_rank:
        return _hardened(weight, rank=rank, energy=energy, mask_rank=mask_rank, generator=generator)
    weight = weight.detach().to(torch.float32)
    m, n = weight.shape
    if rank is not None and rank == 0 and energy is None:
        return Decomposition(torch.zeros(m, 0), torch.zeros(0, n), weight.clone())
    w64 = weight.double()
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)
    k = choose_rank(s, rank=rank, energy=energy)
    if k == 0:
        return Decomposition(torch.zeros(m, 0), torch.zeros(0, n), weight.clone())
    left = u[:, :k] * s[:k]
    right = vh[:k]
    residual = (w64 - left @ right).to(torch.float32)
    return Decomposition(left.to(torch.float32).contiguous(), right.to(torch.float32).contiguous(), residual.contiguous())


def _hardened(weight: torch.Tensor, *, rank: int | None, energy: float | None, mask_rank: int,
              generator: torch.Generator | None) -> Decomposition:
    """`decompose` with a secret term folded into the secure part (see the module docstring)."""
    weight = weight.detach().to(torch.float32)
    m, n = weight.shape
    if mask_rank < 0:
        raise ConfigError(f"the mask rank must be >= 0, got {mask_rank}")
    w64 = weight.double()
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)
    k = choose_rank(s, rank=rank, energy=energy)
    total = min(k + mask_rank, min(m, n))
    if k == 0 or total == k:
        raise ConfigError(f"the hardened split needs a secure rank >= 1 and room for a mask in a {m}x{n} matrix "
                          f"(rank {k}, mask rank {mask_rank})")
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    extra = total - k
    normal = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    left_basis = torch.linalg.qr(torch.cat([u[:, :k], normal(m, extra)], 1)).Q  # [m, total], spans U_k first
    right_basis = torch.linalg.qr(torch.cat([vh[:k].T, normal(n, extra)], 1)).Q  # [n, total], spans V_k first
    tail = s[k:] if k < s.numel() else s[-1:]
    levels = torch.quantile(tail, 0.25 + 0.65 * torch.rand(total, generator=generator, dtype=torch.float64))
    rotate_left = torch.linalg.qr(normal(total, total)).Q
    rotate_right = torch.linalg.qr(normal(total, total)).Q
    mask = rotate_left @ torch.diag(levels) @ rotate_right.T  # [total, total], singular values in the residual's bulk
    top = (left_basis.T @ u[:, :k]) @ torch.diag(s[:k]) @ (vh[:k] @ right_basis)  # U_k S_k V_k^T in these bases
    left = left_basis @ (top + mask)  # [m, total]
    right = right_basis.T  # [total, n]
    residual = (w64 - left @ right).to(torch.float32)
    return Decomposition(left.to(torch.float32).contiguous(), right.to(torch.float32).contiguous(), residual.contiguous())


# -- which linear layers, grouped by shared input ---------------------------------------------------------------


@dataclass(frozen=True)
class LinearGroup:
    """Linear layers applied to the same input: one masked product (their residuals stacked) serves them all."""

    group_id: int  # position in the protected model's group list; what FORWARD frames address
    members: tuple[str, ...]  # module names, in stacking order
    in_features: int
    out_features: tuple[int, ...]  # per member
    layer: int | None  # decoder layer index; None for the LM head

    @property
    def total_out(self) -> int:
        return sum(self.out_features)

    def to_dict(self) -> dict:
        return {"group_id": self.group_id, "members": list(self.members), "in_features": self.in_features,
                "out_features": list(self.out_features), "layer": self.layer}

    @classmethod
    def from_dict(cls, data: dict) -> "LinearGroup":
        return cls(int(data["group_id"]), tuple(data["members"]), int(data["in_features"]),
                   tuple(int(v) for v in data["out_features"]), None if data["layer"] is None else int(data["layer"]))


def group_linears(named: list[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
    """Groups decomposable modules that read the same input (by `SHARED_INPUT_SETS` under a common parent) and
    have the same input width; every other module is a group of its own. Keeps the modules' order."""
    groups: list[list[tuple[str, nn.Module]]] = []
    placed: dict[tuple[str, int], list] = {}
    for name, module in named:
        parent, _, leaf = name.rpartition(".")
        shared = next((i for i, names in enumerate(SHARED_INPUT_SETS) if leaf in names), None)
        key = (parent, shared)
        if shared is not None and key in placed and weight_matrix(placed[key][0][1]).shape[1] == weight_matrix(module).shape[1]:
            placed[key].append((name, module))
            continue
        group = [(name, module)]
        groups.append(group)
        if shared is not None:
            placed[key] = group
    return groups


def causal_lm_groups(model: nn.Module, *, layers: range, include_head: bool) -> list[tuple[LinearGroup, list[nn.Module]]]:
    """The linear groups of decoder layers `layers` (and the LM head when `include_head`) of a transformers
    causal LM, with their modules. Group ids count from 0 in that order."""
    from splitveil.models.causal_lm import CausalLMSplittable

    splittable = CausalLMSplittable(model)
    if layers.start < 0 or layers.stop > splittable.num_blocks or layers.start > layers.stop:
        raise ConfigError(f"layers {layers.start}..{layers.stop - 1} are outside the model's {splittable.num_blocks} layers")
    prefix = {id(layer): f"layer.{index}" for index, layer in enumerate(splittable.layers)}
    found: list[tuple[LinearGroup, list[nn.Module]]] = []
    for index in layers:
        layer = splittable.layers[index]
        named = [(f"{prefix[id(layer)]}.{name}", module) for name, module in layer.named_modules() if is_decomposable(module)]
        for members in group_linears(named):
            found.append(_group(len(found), members, index))
    if include_head:
        head = model.get_output_embeddings()
        if head is None or not is_decomposable(head):
            raise ConfigError("this model has no linear LM head to protect")
        found.append(_group(len(found), [("lm_head", head)], None))
    return found


def _group(group_id: int, members: list[tuple[str, nn.Module]], layer: int | None) -> tuple[LinearGroup, list[nn.Module]]:
    matrices = [weight_matrix(module) for _, module in members]
    group = LinearGroup(group_id, tuple(name for name, _ in members), matrices[0].shape[1],
                        tuple(mat.shape[0] for mat in matrices), layer)
    return group, [module for _, module in members]


def residual_model_(model: nn.Module, *, rank: int | None = None, energy: float | None = None,
                    skip: tuple[type, ...] = (), mask_rank: int = 0,
                    generator: torch.Generator | None = None) -> dict[str, int]:
    """Replaces, in place, every decomposable weight of `model` by its residual (what the untrusted side holds):
    the model an attacker who stole W_residual starts from. Returns the rank removed per module name.
    `mask_rank` > 0 uses the hardened split (see `decompose`).

    A weight shared by several modules (tied embeddings) is replaced once."""
    ranks: dict[str, int] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not is_decomposable(module) or isinstance(module, skip) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        part = decompose(weight_matrix(module), rank=rank, energy=energy, mask_rank=mask_rank, generator=generator)
        set_weight_matrix(module, part.residual)
        ranks[name] = part.rank
    return ranks
