"""Pure math of the null-space attack: the secret subspaces a SLIP residual gives away, and how well they match.

A residual W_res = W - U_k S_k V_k^T [m, n] has rank d - k (d = min(m, n)): its k smallest singular values are 0
(to rounding) and their singular vectors span U_k (left) and V_k (right) exactly. On the narrow side (the one of
dimension d) that is the recovered subspace itself, k-dimensional; on the wide side the null space is larger (it
also holds the matrix's own null space, m - d or n - d dimensions, which W maps to 0 anyway), so it is kept as the
orthogonal complement of the d - k largest singular vectors. Either way W = W_res + Q_L M Q_R^T with Q_L, Q_R
computed from W_res alone and only M [m - d + k, n - d + k] unknown.

Alignment of a recovered subspace Q with a true one T (both orthonormal, T of dimension k): ||Q^T T||_F^2 / k, the
mean squared cosine of the principal angles; 1 = T lies in Q, and a random subspace of dimension q in R^d scores
q / d on average.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Side:
    """One side of a recovered secret subspace: spanned by `basis` [dim, q], or (complement) the orthogonal
    complement of `basis` [dim, dim - q']."""

    basis: torch.Tensor
    complement: bool = False

    @property
    def dim(self) -> int:
        size, columns = self.basis.shape
        return size - columns if self.complement else columns

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The component of the columns of x [size, c] in this subspace."""
        inside = self.basis @ (self.basis.T @ x)
        return x - inside if self.complement else inside


@dataclass
class Recovered:
    """What the attack recovers of one matrix [m, n]: the two sides, the residual's singular values and, on the
    narrow side(s), all its singular vectors (for the hindsight bound)."""

    left: Side
    right: Side
    singular_values: torch.Tensor  # [d], descending
    shape: tuple[int, int]
    narrow_vectors: dict[str, torch.Tensor]  # "left": [m, d] when m == d, "right": [n, d] when n == d

    @property
    def unknowns(self) -> int:
        """Numbers left to find: the size of the block M."""
        return self.left.dim * self.right.dim


def recover(residual: torch.Tensor, secret_rank: int) -> Recovered:
    """The subspaces of `residual` [m, n] where a secret part of rank `secret_rank` hides if the residual was made by
    subtracting it: the directions of its `secret_rank` smallest singular values (plus, on the wide side, the
    matrix's own null space). Computed in float64, returned in float32."""
    m, n = residual.shape
    d = min(m, n)
    k = max(0, min(int(secret_rank), d))
    u, s, vh = torch.linalg.svd(residual.detach().double(), full_matrices=False)
    kept = d - k  # the directions the residual uses
    left = Side(u[:, kept:].float().contiguous()) if m == d else Side(u[:, :kept].float().contiguous(), complement=True)
    right = Side(vh[kept:].T.float().contiguous()) if n == d else Side(vh[:kept].T.float().contiguous(), complement=True)
    narrow = {side: vectors.float().contiguous() for side, vectors, size in (("left", u, m), ("right", vh.T, n)) if size == d}
    return Recovered(left, right, s.float(), (m, n), narrow)


def orthonormal(factor: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [dim, k] of the column space of `factor` [dim, k] (full column rank)."""
    return torch.linalg.qr(factor.double()).Q.float()


def alignment(side: Side, truth: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the true subspace `truth` [dim, k] (orthonormal) and
    the recovered `side`: 1 when it lies in it, side.dim / dim on average for a random side."""
    k = truth.shape[1]
    if k == 0:
        return 1.0
    captured = side.project(truth.to(side.basis.dtype)).double().pow(2).sum() / k
    return min(1.0, float(captured))  # rounding can lift a perfect score a hair above 1


def narrow_alignment(recovered: Recovered, left_truth: torch.Tensor, right_truth: torch.Tensor) -> tuple[float, float]:
    """(alignment, what a random subspace of the same size scores) on the narrow side(s) of the matrix, where the
    recovered subspace has the secret's own dimension: the right side of a tall matrix, the left of a wide one,
    both of a square one (their mean)."""
    scores, chance = [], []
    for side, found, truth, size in (("left", recovered.left, left_truth, recovered.shape[0]),
                                     ("right", recovered.right, right_truth, recovered.shape[1])):
        if side in recovered.narrow_vectors:
            scores.append(alignment(found, truth))
            chance.append(found.dim / size)
    return sum(scores) / len(scores), sum(chance) / len(chance)


def hindsight_alignment(recovered: Recovered, left_truth: torch.Tensor, right_truth: torch.Tensor) -> float:
    """An upper bound for any attacker that picks its subspace among the residual's singular vectors: the best
    choice of k of them, made knowing the truth (k = the truth's dimension), on the narrow side(s)."""
    scores = []
    for side, truth in (("left", left_truth), ("right", right_truth)):
        vectors = recovered.narrow_vectors.get(side)
        k = truth.shape[1]
        if vectors is not None and k:
            captured = (vectors.T.double() @ truth.double()).pow(2).sum(1)  # [d] energy of the truth per vector
            scores.append(min(1.0, float(captured.topk(min(k, captured.numel())).values.sum() / k)))
    return sum(scores) / len(scores) if scores else 1.0
