"""Pure arithmetic of the masked product: the ring Z_{2^64}, fixed-point encoding, one-time masks, float masks.

Ring. Elements are int64 tensors; addition and multiplication wrap modulo 2^64 (two's complement), which is
exactly arithmetic in Z_{2^64}. `ring_matmul` is an int64 matrix product (exact: every partial sum wraps).

Fixed point. An activation x is encoded as round(x * 2^fx) and a weight w as round(w * 2^fw); their product
carries scale 2^(fx + fw) and is decoded by reading the ring element as a signed integer and dividing. With the
defaults fx = 16, fw = 20 a product's magnitude must stay below 2^(63 - 36) = 2^27 (checked by the caller with
`product_bound`), activations are resolved to 2^-16 and weights to 2^-20 (about 1e-6).

Masks. A fixed-point mask is uniform over all of Z_{2^64} (from the operating system's CSPRNG unless a seeded
generator is given for tests): x + r is then uniform and independent of x, whatever x is (a one-time pad:
information-theoretic hiding, as long as each r is used once). The float variant adds r uniform in
[-scale, scale] to a float64 x: x + r is NOT independent of x; two inputs x, x' give views whose statistical
distance per coordinate is |x - x'| / (2 scale). That is statistical hiding only, stated as such everywhere.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

from splitveil.protect.slip.errors import FixedPointOverflow

RING_BITS = 64


@dataclass(frozen=True)
class FixedPoint:
    """The fixed-point scales: activations x 2^frac_bits_x, weights x 2^frac_bits_w; products x 2^(both)."""

    frac_bits_x: int = 16
    frac_bits_w: int = 20

    def __post_init__(self):
        if not (0 <= self.frac_bits_x <= 40 and 0 <= self.frac_bits_w <= 40 and self.frac_bits_x + self.frac_bits_w <= 56):
            raise FixedPointOverflow(f"fractional bits {self.frac_bits_x} + {self.frac_bits_w} leave no room in a 64-bit ring")

    @property
    def product_bits(self) -> int:
        return self.frac_bits_x + self.frac_bits_w

    @property
    def max_output(self) -> float:
        """Largest |y| a decoded product may have (2^(63 - fx - fw))."""
        return float(2 ** (RING_BITS - 1 - self.product_bits))

    def encode_x(self, x: torch.Tensor) -> torch.Tensor:
        return _encode(x, self.frac_bits_x)

    def encode_w(self, w: torch.Tensor) -> torch.Tensor:
        return _encode(w, self.frac_bits_w)

    def decode_product(self, y: torch.Tensor) -> torch.Tensor:
        """A ring product (int64, read as signed) -> float32 at scale 2^-(fx + fw)."""
        return (y.to(torch.float64) * (2.0 ** -self.product_bits)).to(torch.float32)

    def check_product_fits(self, x: torch.Tensor, w_max_abs: float) -> None:
        """Raises when some row of x times a weight matrix whose entries are at most `w_max_abs` could leave the
        signed range of the ring (then the decoded value would wrap around). x: [P, n] float."""
        bound = product_bound(x, w_max_abs)
        if bound >= self.max_output:
            raise FixedPointOverflow(
                f"a linear layer's output could reach {bound:.3g}, beyond the fixed-point range {self.max_output:.3g} "
                f"(2^{RING_BITS - 1 - self.product_bits}); use fewer fractional bits or the float variant")

    def to_dict(self) -> dict:
        return {"frac_bits_x": self.frac_bits_x, "frac_bits_w": self.frac_bits_w, "ring_bits": RING_BITS}


def _encode(values: torch.Tensor, frac_bits: int) -> torch.Tensor:
    scaled = torch.round(values.detach().to(torch.float64) * float(2**frac_bits))
    if scaled.numel() and not bool(scaled.abs().max() < 2.0**62):
        raise FixedPointOverflow(f"a value of magnitude {float(values.abs().max()):.3g} does not fit the ring at 2^{frac_bits}")
    return scaled.to(torch.int64)


def product_bound(x: torch.Tensor, w_max_abs: float) -> float:
    """max over rows of ||x_row||_1 * max|W| (+1 per term for rounding): a bound on |W x| per output."""
    if x.numel() == 0:
        return 0.0
    return float((x.detach().abs().to(torch.float64).sum(-1).max() + x.shape[-1]) * (w_max_abs + 1e-6))


def ring_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [P, n] @ w[m, n]^T in Z_{2^64} (int64, wrapping)."""
    if x.dtype != torch.int64 or w.dtype != torch.int64:
        raise TypeError("ring products take int64 tensors")
    return x @ w.t()


def ring_products(a: torch.Tensor, b: torch.Tensor, *, chunk_elements: int = 1 << 22) -> torch.Tensor:
    """a [P, m] @ b [t, m]^T in Z_{2^64} for a few rows b (Freivalds' vectors): element-wise products summed, in
    chunks of rows of at most `chunk_elements` products; torch's int64 matmul is some 40x slower at these shapes."""
    if a.dtype != torch.int64 or b.dtype != torch.int64:
        raise TypeError("ring products take int64 tensors")
    step = max(1, chunk_elements // max(b.numel(), 1))
    return torch.cat([(a[start : start + step, None, :] * b[None]).sum(-1) for start in range(0, a.shape[0], step)]) \
        if a.shape[0] else a.new_zeros(0, b.shape[0])


class RingWeight:
    """A ring-encoded weight matrix [m, n] prepared for fast exact products x W^T in Z_{2^64}.

    The masked input x is uniform over 64 bits, so no float can hold it; but W's entries are small integers
    (|W| 2^fw). Splitting x into limbs of L bits, each limb times W sums to less than 2^L max|W| n, exact in float64
    when that stays below 2^53. The limbs go through one float64 matrix product (stacked as rows, so W is read once),
    each partial product is converted back to int64 and shifted into place; the shifts and sums wrap modulo 2^64,
    which gives the ring product bit for bit. When W is too large for limbs of at least 8 bits, a plain int64
    matrix product is used (exact too, slower).

    `compact=True` keeps W in float32 (exact while |W| < 2^24, as for every model we ship) and converts blocks of
    `COMPACT_ROWS` rows to float64 for each product: half the memory, for the 1B-parameter servers, at the price of
    the conversions.

    `RingWeight.mapped(w, frac_bits)` keeps the float32 weights as given (a bundle's tensors are read-only maps of
    its file) and encodes each block as it is used, round(w 2^fw) in float64 (the integers `FixedPoint.encode_w`
    gives): no private copy, so an executor and a dealer on one machine share the file's pages.

    `device` holds the matrix there and runs the limb products there (a GPU's float64 products are exact as on the
    CPU: the limbs keep every sum below 2^53); inputs move to it, products come back to the CPU. The plain int64
    product (matrices too large for limbs) stays on the CPU, where torch has it."""

    COMPACT_ROWS = 2048

    def __init__(self, weight: torch.Tensor, *, compact: bool = False, device=None):
        if weight.dtype != torch.int64 or weight.dim() != 2:
            raise TypeError("a ring weight is an int64 matrix")
        self.shape = tuple(weight.shape)
        self.largest = int(weight.abs().max()) if weight.numel() else 0
        self.limb_bits = limb_bits_for(self.largest, self.shape[1])
        self.device = torch.device(device or "cpu") if self.limb_bits is not None else torch.device("cpu")
        self.int64 = self.float64 = self.float32 = self.raw = None
        if self.limb_bits is None:
            self.int64 = weight
        elif compact and self.largest < 2**24:
            self.float32 = weight.to(self.device, torch.float32)  # exact
        else:
            self.float64 = weight.to(self.device, torch.float64)  # exact: |entries| < 2^53

    @classmethod
    def mapped(cls, weight: torch.Tensor, frac_bits: int) -> "RingWeight":
        """The ring weight of the float matrix `weight` at 2^frac_bits, encoded block by block when used (CPU)."""
        if weight.dim() != 2 or not weight.dtype.is_floating_point:
            raise TypeError("a mapped ring weight is a float matrix")
        ring = cls.__new__(cls)
        ring.shape = tuple(weight.shape)
        ring.scale = float(2**frac_bits)
        largest = max((float(weight[start : start + cls.COMPACT_ROWS].abs().max())
                       for start in range(0, ring.shape[0], cls.COMPACT_ROWS)), default=0.0)
        ring.largest = int(round(largest * ring.scale))  # rounding is monotone: the largest encoded entry
        if ring.largest >= 2**53:
            raise FixedPointOverflow(f"a weight of magnitude {largest:.3g} does not fit float64 at 2^{frac_bits}")
        ring.limb_bits = limb_bits_for(ring.largest, ring.shape[1])
        ring.device = torch.device("cpu")
        ring.int64 = ring.float64 = ring.float32 = None
        ring.raw = weight
        if ring.limb_bits is None:  # too large for limbs: the plain int64 product
            ring.int64, ring.raw = ring.to_int64(), None
        return ring

    def _blocks(self):
        """(row slice, float64 block of W) over W's rows: the whole matrix at once, or compact blocks."""
        if self.float64 is not None:
            yield slice(0, self.shape[0]), self.float64
            return
        source = self.raw if self.raw is not None else self.float32
        for start in range(0, self.shape[0], self.COMPACT_ROWS):
            rows = slice(start, min(start + self.COMPACT_ROWS, self.shape[0]))
            block = _scratch(rows.stop - rows.start, self.shape[1], source.device)
            block.copy_(source[rows])
            if self.raw is not None:
                block.mul_(self.scale).round_()
            yield rows, block  # the caller uses it before asking for the next block, which overwrites it

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [P, n] int64 -> x W^T [P, m] int64 (mod 2^64)."""
        if self.int64 is not None:
            return ring_matmul(x, self.int64)
        bits = self.limb_bits
        count = -(-RING_BITS // bits)
        mask = (1 << bits) - 1
        x = x.to(self.device)
        limbs = torch.stack([(x >> (bits * i)) & mask for i in range(count)])  # [count, P, n], each in [0, 2^bits)
        flat = limbs.reshape(-1, x.shape[1]).to(torch.float64)
        out = torch.empty(x.shape[0], self.shape[0], dtype=torch.int64, device=self.device)
        for rows, block in self._blocks():
            partial = (flat @ block.t()).to(torch.int64).reshape(count, x.shape[0], -1)
            part = partial[0].clone()
            for i in range(1, count):
                part += partial[i] << (bits * i)  # wraps modulo 2^64
            out[:, rows] = part
        return out.cpu()

    def left_matmul(self, s: torch.Tensor) -> torch.Tensor:
        """s [t, m] int64 -> s W [t, n] int64 (mod 2^64), by the same limbs (their width chosen for sums over m)."""
        bits = limb_bits_for(self.largest, self.shape[0]) if self.int64 is None else None
        if bits is None:
            return s @ self.to_int64()  # exact int64 product (wraps)
        count = -(-RING_BITS // bits)
        mask = (1 << bits) - 1
        s = s.to(self.device)
        limbs = torch.stack([(s >> (bits * i)) & mask for i in range(count)])  # [count, t, m]
        flat = limbs.reshape(-1, s.shape[1]).to(torch.float64)
        total = None
        for rows, block in self._blocks():  # partial sums over W's rows, each exact; their sum stays below 2^53
            partial = flat[:, rows] @ block
            total = partial if total is None else total + partial
        partial = total.to(torch.int64).reshape(count, s.shape[0], self.shape[1])
        out = partial[0].clone()
        for i in range(1, count):
            out += partial[i] << (bits * i)  # wraps modulo 2^64
        return out.cpu()

    def row_norm(self) -> float:
        """max_i ||W_i||_2 over the rows (in ring integers): with ||x||_2 it bounds every |(x W^T)_i|."""
        if self.int64 is not None:
            weight = self.int64.to(torch.float64)
            return float(weight.norm(dim=1).max()) if weight.numel() else 0.0
        norms = [block.norm(dim=1).max() for _, block in self._blocks() if block.numel()]
        return float(max(norms)) if norms else 0.0

    def to_int64(self) -> torch.Tensor:
        if self.int64 is not None:
            return self.int64
        if self.raw is not None:
            return torch.round(self.raw.to(torch.float64) * self.scale).to(torch.int64)
        return (self.float64 if self.float64 is not None else self.float32).to("cpu", torch.int64)


_SCRATCH = threading.local()


def _scratch(rows: int, columns: int, device) -> torch.Tensor:
    """A float64 [rows, columns] block reused across products (per thread): compact and mapped weights widen each
    block of rows into it, so that a product allocates (and the kernel zeroes) no fresh tens of megabytes per block."""
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.device != torch.device(device) or buffer.numel() < rows * columns:
        buffer = _SCRATCH.buffer = torch.empty(max(rows * columns, 1), dtype=torch.float64, device=device)
    return buffer[: rows * columns].view(rows, columns)


def limb_bits_for(largest: int, n: int) -> int | None:
    """The widest limb (8..32 bits) for which 2^bits * largest * n < 2^53; None when even 8 bits do not fit."""
    for bits in range(32, 7, -1):
        if (2**bits) * max(largest, 1) * max(n, 1) < 2**53:
            return bits
    return None


def ring_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b  # int64 addition wraps modulo 2^64


def ring_sub(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a - b


def uniform_ring(shape: tuple[int, ...], *, generator: np.random.Generator | None = None) -> torch.Tensor:
    """Elements uniform over Z_{2^64} (every int64 value equally likely): OS randomness, or `generator` (tests)."""
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if generator is None:
        raw = np.frombuffer(os.urandom(8 * count), dtype="<i8")
    else:
        raw = generator.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=count, dtype=np.int64, endpoint=True)
    return torch.from_numpy(raw.astype(np.int64).reshape(shape))


def uniform_float(shape: tuple[int, ...], *, scale: float, generator: np.random.Generator | None = None) -> torch.Tensor:
    """float64 masks uniform in [-scale, scale] (statistical hiding only; see the module docstring)."""
    rng = generator if generator is not None else np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
    return torch.from_numpy(rng.uniform(-scale, scale, size=shape))


# -- float64 through the int64 codec ----------------------------------------------------------------------------


def float64_to_wire(values: torch.Tensor) -> torch.Tensor:
    """float64 values as int64 bit patterns (the wire has no float64 codec; the bits travel unchanged)."""
    return values.to(torch.float64).contiguous().view(torch.int64)


def wire_to_float64(bits: torch.Tensor) -> torch.Tensor:
    return bits.contiguous().view(torch.float64)


def high_bits(values: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """The top `bits` bits of ring elements as integers 0 .. 2^bits - 1 (for uniformity tests)."""
    return ((values >> (RING_BITS - bits)) & ((1 << bits) - 1)).to(torch.int64)
