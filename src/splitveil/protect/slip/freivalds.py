"""Freivalds' check: the trusted side verifies y = x W^T without computing it, in O(t (m + n)) per row.

Setup (offline, once per linear group): t random vectors s_j [m] and their products s_j W [n]. Check of a reply
y [P, m] to a masked input x [P, n]: y s_j == x (s_j W) for every j. A wrong y passes one repetition with
probability at most 1/2 in Z_{2^64} (an error e whose lowest set bit is bit b survives a uniform s with probability
2^-(64 - b), at worst 1/2 for e = 2^63 e'); t independent repetitions pass it with probability at most 2^-t.
The float variant draws Gaussian s and accepts within a relative tolerance, so it catches every error larger than
that tolerance (1e-12 of the masked magnitudes: an error hidden in float64 noise on 2^24-sized masks goes unseen;
the ring check is exact).
"""

from __future__ import annotations

import numpy as np
import torch

from splitveil.protect.slip.fixedpoint import ring_matmul, uniform_ring


class FreivaldsCheck:
    """Checks replies of one linear group.

    Args:
        weight: W_residual as the untrusted side computes with it: int64 ring elements [m, n] (fixed point) or
            float64 [m, n] (float variant).
        repetitions: t; the probability that a wrong reply passes is at most 2^-t (fixed point).
        tolerance: relative tolerance of the float check.
    """

    def __init__(self, weight: torch.Tensor, *, repetitions: int = 2, tolerance: float = 1e-12,
                 generator: np.random.Generator | None = None):
        if repetitions < 0:
            raise ValueError("repetitions must be >= 0")
        self.repetitions = repetitions
        self.ring = weight.dtype == torch.int64
        self.tolerance = tolerance
        m, _ = weight.shape
        if self.ring:
            self.s = uniform_ring((repetitions, m), generator=generator)  # [t, m]
            self.sw = ring_matmul(self.s, weight.t().contiguous())  # [t, n] = s W
        else:
            rng = generator if generator is not None else np.random.default_rng()
            self.s = torch.from_numpy(rng.standard_normal((repetitions, m)))
            self.sw = self.s @ weight.to(torch.float64)
        self.checked_rows = 0

    def macs_per_row(self) -> int:
        return self.repetitions * (self.s.shape[1] + self.sw.shape[1])

    def verify(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """x [P, n] what was sent, y [P, m] what came back: True when y = x W^T passes all t checks."""
        if self.repetitions == 0:
            return True
        self.checked_rows += x.shape[0]
        if self.ring:
            return bool(torch.equal(ring_matmul(y, self.s), ring_matmul(x, self.sw)))
        lhs = y @ self.s.t()
        rhs = x @ self.sw.t()
        scale = y.abs() @ self.s.abs().t() + x.abs() @ self.sw.abs().t() + 1e-300
        return bool(((lhs - rhs).abs() <= self.tolerance * scale).all())
