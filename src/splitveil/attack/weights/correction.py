"""What a weights attacker trains: a correction added to each stolen residual layer (linear or convolution).

`CorrectedLayer` computes the layer with the weight matrix W_res + A B^T, W_res frozen (for a convolution, the
matrix [out, in * kh * kw] of `decompose.weight_matrix`) and the correction given by a factor module; a linear layer
with a low-rank correction computes x W_res^T (+ bias) + (x B) A^T without forming the sum. Every factor module has
`weight(residual)` (the corrected matrix) and `low_rank()` ((A, B), or None for a dense correction):

- `SubspaceFactors` (the null-space attack): A B^T = Q_L M Q_R^T with the recovered subspaces fixed and only the
  block M [q_L, q_R] learned. On a wide side Q is the complement of the residual's largest singular directions,
  kept as a projector: the side's factor is then a free matrix projected onto that complement.
- `FreeFactors` (a LoRA-style attack that ignores the structure): A [m, q] and B [n, q] both learned.
- `DenseFactors` (the full-residual and from-scratch attacks): a dense [m, n] matrix learned, added to the residual
  or, from scratch, taking its place (the thief then uses only the architecture and the unprotected weights).

Parameters are scaled by the residual's largest singular value (public to whoever holds the residual), so that one
learning rate suits every matrix; A starts at 0, so training starts from the residual-only model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from splitveil.attack.weights.subspace import Recovered


class SubspaceFactors(nn.Module):
    """A = Q_L M (or, on a wide left side, the projection of a free [m, q] matrix), B = Q_R (or likewise)."""

    def __init__(self, recovered: Recovered, *, scale: float):
        super().__init__()
        self.left, self.right = recovered.left, recovered.right  # not buffers: kept out of state_dict (large)
        m, n = recovered.shape
        if self.left.complement and self.right.complement:
            raise ValueError("a matrix has at most one wide side")
        if self.left.complement:  # tall: A = P_L X, X [m, q_R]; B = Q_R
            shape, self.unit = (m, self.right.dim), scale / math.sqrt(max(1, self.left.dim))
        elif self.right.complement:  # wide: A = Q_L, B = P_R Y, Y [n, q_L]
            shape, self.unit = (n, self.left.dim), scale / math.sqrt(max(1, self.right.dim))
        else:  # square or both sides exact: A = Q_L M, B = Q_R
            shape, self.unit = (self.left.dim, self.right.dim), scale
        self.block = nn.Parameter(torch.zeros(shape))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.block * self.unit
        if self.left.complement:
            return self.left.project(block), self.right.basis
        if self.right.complement:
            return self.left.basis, self.right.project(block)
        return self.left.basis @ block, self.right.basis

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factors()

    def weight(self, residual: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return residual + a @ b.T

    @property
    def unknowns(self) -> int:
        return self.left.dim * self.right.dim


class FreeFactors(nn.Module):
    """A [m, q] (from 0) and B [n, q] (random, unit columns) both learned."""

    def __init__(self, m: int, n: int, rank: int, *, scale: float, generator: torch.Generator):
        super().__init__()
        self.unit = scale / math.sqrt(m)
        self.a = nn.Parameter(torch.zeros(m, rank))
        self.b = nn.Parameter(torch.randn(n, rank, generator=generator) / math.sqrt(n))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a * self.unit, self.b

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factors()

    def weight(self, residual: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return residual + a @ b.T

    @property
    def unknowns(self) -> int:
        return self.a.numel() + self.b.numel()


class DenseFactors(nn.Module):
    """A dense correction D [m, n]: from 0 on top of the residual (`replaces_residual` False: every weight of the
    matrix fine-tuned), or from a fresh Kaiming-uniform draw in its place (True: the matrix trained from scratch)."""

    def __init__(self, m: int, n: int, *, scale: float, replaces_residual: bool, generator: torch.Generator):
        super().__init__()
        self.replaces_residual = replaces_residual
        self.unit = scale / math.sqrt(min(m, n))
        start = torch.zeros(m, n)
        if replaces_residual:  # nn.Linear's own initialisation, in units of `self.unit`
            bound = 1 / math.sqrt(n)
            start = (torch.rand(m, n, generator=generator) * 2 - 1) * bound / self.unit
        self.delta = nn.Parameter(start)

    def weight(self, residual: torch.Tensor) -> torch.Tensor:
        delta = self.delta * self.unit
        return delta if self.replaces_residual else residual + delta

    def low_rank(self) -> None:
        return None

    @property
    def unknowns(self) -> int:
        return self.delta.numel()


class CorrectedLayer(nn.Module):
    """A frozen residual layer (nn.Linear or an ungrouped nn.Conv2d) plus a trainable correction of its weight matrix:
    the attacker's version of the layer."""

    def __init__(self, layer: nn.Module, factors: nn.Module):
        super().__init__()
        from splitveil.protect.slip.decompose import weight_matrix

        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"a weights attack corrects linear and convolution layers, not {type(layer).__name__}")
        self.conv = None
        if isinstance(layer, nn.Conv2d):  # its geometry, kept to run the corrected matrix as the same convolution
            self.conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": 1}
            self.kernel_shape = tuple(layer.weight.shape)
        self.weight = nn.Parameter(weight_matrix(layer), requires_grad=False)  # [m, n] the residual (shared storage)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)
        self.factors = factors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return nn.functional.conv2d(x, self.merged_weight().reshape(self.kernel_shape), self.bias, **self.conv)
        low_rank = self.factors.low_rank()
        if low_rank is None:
            return nn.functional.linear(x, self.merged_weight(), self.bias)
        a, b = low_rank  # [m, q], [n, q]
        return nn.functional.linear(x, self.weight, self.bias) + (x @ b) @ a.T

    def merged_weight(self) -> torch.Tensor:
        """The corrected weight matrix [m, n]."""
        return self.factors.weight(self.weight)
