"""One-time masks, precomputed: (r, W_residual r) pairs per linear group, each handed out once.

The trusted side masks an input x as x + r and removes W_residual r from the untrusted side's reply. Using one r
twice would reveal the difference of two inputs (x1 + r) - (x2 + r) = x1 - x2, so every pair carries a serial
number, a pool never hands a serial out twice, and a `OneTimeMasks` refuses a second `mask` or `unmask` with
`MaskReuseError`.

Who computes W_residual r (the *dealer*) is the deployment's choice: the model owner in the weights deployment
(it holds W), the device while idle, or a separate trusted dealer in the prompt deployment. Computing it costs as
much as the masked product itself; the pool times it as offline work (`offline_seconds`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from splitveil.protect.slip.errors import MaskPoolEmpty, MaskReuseError


class OneTimeMasks:
    """A batch of masks r [P, n] and their terms u = r W_residual^T [P, m], to mask one input and unmask its reply."""

    def __init__(self, r: torch.Tensor, u: torch.Tensor, serials: range, *, ring: bool):
        self.r = r
        self.u = u
        self.serials = serials
        self.ring = ring
        self.masked = False
        self.unmasked = False

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """x [P, n] (ring elements or float64) -> x + r. Only once."""
        if self.masked:
            raise MaskReuseError(f"masks {self.serials.start}..{self.serials.stop - 1} were already used to mask an input; "
                                 "a one-time mask is never reused")
        if x.shape != self.r.shape:
            raise ValueError(f"input of shape {list(x.shape)} does not match masks of shape {list(self.r.shape)}")
        self.masked = True
        return x + self.r

    def unmask(self, y: torch.Tensor) -> torch.Tensor:
        """The untrusted reply W_residual (x + r) [P, m] -> W_residual x. Only once, after `mask`."""
        if not self.masked:
            raise MaskReuseError("unmask before mask: these masks never hid an input")
        if self.unmasked:
            raise MaskReuseError(f"masks {self.serials.start}..{self.serials.stop - 1} were already used to unmask a reply")
        if y.shape != self.u.shape:
            raise ValueError(f"reply of shape {list(y.shape)} does not match mask terms of shape {list(self.u.shape)}")
        self.unmasked = True
        return y - self.u


class MaskPool:
    """Precomputed mask pairs for one linear group.

    Args:
        sample: count -> fresh masks r [count, n] (uniform ring elements, or float64 for the float variant).
        deal: r [count, n] -> u [count, m] = r W_residual^T (the dealer's offline product).
        ring: whether the masks are ring elements (fixed point) or float64.
        auto_refill: refill (timed as offline work, but during the online phase) when `take` finds too few;
            False makes an empty pool an error.
        block: how many pairs an automatic refill adds at least.
    """

    def __init__(self, *, sample: Callable[[int], torch.Tensor], deal: Callable[[torch.Tensor], torch.Tensor],
                 ring: bool, auto_refill: bool = True, block: int = 16):
        self.sample = sample
        self.deal = deal
        self.ring = ring
        self.auto_refill = auto_refill
        self.block = block
        self._r: list[torch.Tensor] = []  # blocks of unused masks
        self._u: list[torch.Tensor] = []
        self._next_serial = 0  # serial of the first pair not handed out yet
        self._made = 0  # pairs made so far
        self.offline_seconds = 0.0  # time spent making pairs (sampling + the dealer's product)
        self.refills_during_use = 0  # refills `take` had to do itself

    @property
    def available(self) -> int:
        return self._made - self._next_serial

    @property
    def issued(self) -> int:
        return self._next_serial

    def refill(self, count: int) -> None:
        """Makes `count` more pairs (offline work)."""
        if count <= 0:
            return
        started = time.perf_counter()
        r = self.sample(count)
        u = self.deal(r)
        self._r.append(r)
        self._u.append(u)
        self._made += count
        self.offline_seconds += time.perf_counter() - started

    def take(self, count: int) -> OneTimeMasks:
        """Hands out the next `count` pairs; they leave the pool for good."""
        if count > self.available:
            if not self.auto_refill:
                raise MaskPoolEmpty(f"the mask pool holds {self.available} pairs, {count} needed; refill it offline")
            self.refills_during_use += 1
            self.refill(max(count - self.available, self.block))
        r = torch.cat(self._r) if len(self._r) > 1 else self._r[0]
        u = torch.cat(self._u) if len(self._u) > 1 else self._u[0]
        taken = OneTimeMasks(r[:count].clone(), u[:count].clone(), range(self._next_serial, self._next_serial + count), ring=self.ring)
        self._r, self._u = ([r[count:]], [u[count:]]) if count < r.shape[0] else ([], [])
        self._next_serial += count
        return taken
