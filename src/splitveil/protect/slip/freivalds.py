"""Freivalds' check: the trusted side verifies y = x W^T without computing it, in O(t (m + n)) per row.

Vectors. Each session draws t fresh secret vectors s_j [m] per linear group and computes s_j W [n] (as much work
as t masked rows of that group, done ahead of time). Check of a reply y [P, m] to a masked input x [P, n]:
y s_j == x (s_j W) for every j, as one product with the [m, t] matrix of vectors. A session never reuses another
session's vectors, so a wrong reply that once slipped through tells the executor nothing about the next session.

Soundness in the ring Z_{2^64}. Z_{2^64} is not a field: an error e [m] whose entries are all multiples of 2^b
(b its lowest set bit over the entries) survives a uniform s with probability exactly 2^-(64 - b). A corruption
concentrated in the top bit (e = 2^63 e') survives one vector with probability 1/2, t vectors with 2^-t.

Range check. The trusted side knows the unmasked input x, and bounds every entry of the true product x W^T by
R = min(||x||_2 max_i ||W_i||_2, ||x||_1 max |W|) (in ring integers; < 2^63 by the fixed-point overflow check). After
unmasking it refuses any entry outside [-R, R]. A wrong entry that stays in range differs from the true one by at
most 2R, so its lowest set bit is at most log2(2R): an error that passes the range check survives one vector
with probability at most 2^-(63 - floor(log2 R)) (`bits_per_vector`). Each product uses as many vectors as
its range needs to reach the target (`vectors_needed`): with 40 bits and SmolLM2's activations that is 2 to 4
vectors (R ~ 2^37 .. 2^52), never fewer than t. The first corrupted product of a session is caught with
probability at least 1 - 2^-target; any failure ends the session (`trusted.GroupRuntime`).

The float variant draws Gaussian s and accepts within a relative tolerance (1e-12 of the masked magnitudes): it
misses every error hidden in that tolerance; it is for benchmarks, not for integrity.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from splitveil.protect.slip.fixedpoint import RingWeight, ring_products, uniform_ring

RANGE_MARGIN = 1e-9  # relative slack on the float64 computation of the Cauchy-Schwarz bound


def product_range(x: torch.Tensor, row_norm: float, largest: int | None = None) -> int:
    """R: a bound on every |(x W^T)_pi| for ring-encoded x [P, n] (int64, read as signed), given max_i ||W_i||_2
    (Cauchy-Schwarz) and, when known, max |W_ij| (||x_p||_1 max |W|); the smaller of the two."""
    if x.numel() == 0:
        return 0
    values = x.to(torch.float64)
    bound = float(values.norm(dim=1).max()) * row_norm
    if largest is not None:
        bound = min(bound, float(values.abs().sum(dim=1).max()) * largest)
    return int(math.floor(bound * (1 + RANGE_MARGIN))) + 1


def within_range(product: torch.Tensor, bound: int) -> bool:
    """Every entry of the unmasked product (int64, signed) lies in [-bound, bound]."""
    if bound >= 2**63 - 1 or product.numel() == 0:
        return True
    low, high = torch.aminmax(product)
    return -bound <= int(low) and int(high) <= bound


def bits_per_vector(bound: int | None) -> int:
    """-log2 of the chance that one uniform vector misses an error which passes the range check [-bound, bound]
    (None: no range check, the worst case 1)."""
    if bound is None or bound >= 2**62:
        return 1
    if bound < 1:
        return 64  # the product must be exactly 0: the range check alone catches every error
    return 63 - int(bound).bit_length() + 1


def vectors_needed(target_bits: int, bound: int | None, *, least: int) -> int:
    """How many vectors a product needs so that a wrong reply passes with probability <= 2^-target_bits."""
    return max(least, -(-target_bits // bits_per_vector(bound)))


class FreivaldsCheck:
    """Checks replies of one linear group with vectors drawn afresh for every session.

    Args:
        weight: W_residual as the untrusted side computes with it: a `RingWeight` or int64 ring elements [m, n]
            (fixed point), or float64 [m, n] (float variant).
        repetitions: t, the fewest vectors per product.
        soundness_bits: fixed point only: a product whose range needs more than t vectors to bound the chance that a
            wrong reply passes by 2^-soundness_bits gets them (`vectors_needed`); 0 = exactly t.
        tolerance: relative tolerance of the float check.
        prepared: vectors drawn ahead for each session (`prepare`); more are drawn during a session when needed.
        generator: a seeded numpy generator (tests only; default: OS randomness).
    """

    def __init__(self, weight: torch.Tensor | RingWeight, *, repetitions: int = 2, soundness_bits: int = 0,
                 tolerance: float = 1e-12, prepared: int | None = None, generator: np.random.Generator | None = None):
        if repetitions < 0 or soundness_bits < 0:
            raise ValueError("repetitions and soundness bits must be >= 0")
        self.ring = isinstance(weight, RingWeight) or weight.dtype == torch.int64
        self.weight = weight if not self.ring or isinstance(weight, RingWeight) else RingWeight(weight)
        self.m, self.n = self.weight.shape
        self.repetitions = repetitions
        self.soundness_bits = soundness_bits if self.ring else 0
        self.tolerance = tolerance
        self.prepared = max(repetitions, prepared or 0) if self.ring else repetitions
        self.generator = generator
        self.row_norm = self.weight.row_norm() if self.ring else float(weight.norm(dim=1).max()) if weight.numel() else 0.0
        self.largest = self.weight.largest if self.ring else None  # max |W_ij| in ring integers
        self.s = torch.zeros(0, self.m, dtype=torch.int64 if self.ring else torch.float64)  # [t, m] this session's
        self.sw = torch.zeros(0, self.n, dtype=self.s.dtype)  # [t, n] = s W
        self._next: tuple[torch.Tensor, torch.Tensor] | None = None  # drawn ahead for the next session
        self.sessions = 0
        self.setup_seconds = 0.0  # drawing vectors and computing s W
        self.checked_rows = 0
        self.products = 0  # products checked
        self.vectors_used = 0  # sum over products of the vectors each used
        self.weakest_bits: int | None = None  # the lowest bound (bits) a product of this session got

    def range_of(self, x: torch.Tensor) -> int:
        """The bound R on every entry of x W^T for ring-encoded inputs x [P, n] (`product_range`)."""
        return product_range(x, self.row_norm, self.largest)

    # -- vectors, per session -----------------------------------------------------------------------------------

    def _draw(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        if self.ring:
            s = uniform_ring((count, self.m), generator=self.generator)  # [count, m]
            sw = self.weight.left_matmul(s)  # [count, n]
        else:
            rng = self.generator if self.generator is not None else np.random.default_rng()
            s = torch.from_numpy(rng.standard_normal((count, self.m)))
            sw = s @ self.weight.to(torch.float64)
        self.setup_seconds += time.perf_counter() - started
        return s, sw

    def prepare(self) -> None:
        """Draws the next session's vectors ahead of time (offline work), unless that is done already."""
        if self._next is None and self.prepared:
            self._next = self._draw(self.prepared)

    def new_session(self) -> None:
        """Drops this session's vectors and takes fresh ones (those `prepare` drew, or new ones, drawn lazily)."""
        self.s, self.sw = self._next if self._next is not None else (self.s[:0], self.sw[:0])
        self._next = None
        self.sessions += 1
        self.weakest_bits = None

    def _ensure(self, count: int) -> None:
        if self.s.shape[0] < count:
            s, sw = self._draw(count - self.s.shape[0])
            self.s, self.sw = torch.cat([self.s, s]), torch.cat([self.sw, sw])

    # -- the check ----------------------------------------------------------------------------------------------

    def vectors_for(self, bound: int | None) -> int:
        """The vectors a product with range `bound` gets (the float check: always t)."""
        if not self.soundness_bits:
            return self.repetitions
        return vectors_needed(self.soundness_bits, bound, least=self.repetitions)

    def macs_per_row(self, vectors: int | None = None) -> int:
        return (self.repetitions if vectors is None else vectors) * (self.m + self.n)

    def verify(self, x: torch.Tensor, y: torch.Tensor, *, bound: int | None = None) -> bool:
        """x [P, n] what was sent, y [P, m] what came back: True when y = x W^T passes every vector's check.
        `bound`: the range the caller checks on the unmasked product (fixed point), which sets how many vectors."""
        vectors = self.vectors_for(bound)
        self.checked_rows += x.shape[0]
        self.products += 1
        self.vectors_used += vectors
        if self.ring:
            bits = vectors * bits_per_vector(bound)
            self.weakest_bits = bits if self.weakest_bits is None else min(self.weakest_bits, bits)
        if vectors == 0:
            return True
        self._ensure(vectors)
        s, sw = self.s[:vectors], self.sw[:vectors]
        if self.ring:  # one [P, m] x [m, t] product each side
            return bool(torch.equal(ring_products(y, s), ring_products(x, sw)))
        lhs = y @ s.t()
        rhs = x @ sw.t()
        scale = y.abs() @ s.abs().t() + x.abs() @ sw.abs().t() + 1e-300
        return bool(((lhs - rhs).abs() <= self.tolerance * scale).all())
