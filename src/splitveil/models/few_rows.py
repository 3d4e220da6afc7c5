"""Matrix products of a few rows on the CPU at the cost of one row.

Speculative decoding verifies 2-4 positions per pass, and batched decode steps of a few sessions carry 2-4 rows; in
float32 on one thread, MKL runs `F.linear` on fewer than 5 rows of a large matrix about as slowly as 2-3 separate
rows (SmolLM2's trunk, its 26 layers' matrices: 1 row 22 ms, 2 rows 36, 4 rows 33), while the transposed product
W x^T reads the matrix once for all of them (2 rows 20 ms, 4 rows 19). A pass that verifies two drafts thus costs
the cloud about what a plain step does, which is what makes a draft worth sending. From 5 rows on, the blocked
kernel of `F.linear` is as fast or faster, except for the largest matrices (an LM head: 49152 x 576, 8 rows 18 ms
against 26), which stay memory-bound up to 8 rows.

Each row's result is still that row's product; only the kernel, so the float rounding, differs from `F.linear`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: matrices at least this large (elements) take the transposed product for 2-4 rows
_SMALLEST = 1 << 16
#: matrices at least this large (an LM head) stay memory-bound, and take it, up to 8 rows
_MEMORY_BOUND = 1 << 22


class FewRowsLinear(nn.Linear):
    """`nn.Linear` whose CPU float32 products of 2-4 rows (2-8 for the largest matrices) run as W x^T."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        size = x.shape[-1]
        rows = x.numel() // size if size else 0
        if (rows < 2 or weight.device.type != "cpu" or weight.dtype != torch.float32 or x.dtype != torch.float32
                or weight.numel() < _SMALLEST or rows > (8 if weight.numel() >= _MEMORY_BOUND else 4)):
            return F.linear(x, weight, self.bias)
        out = torch.mm(weight, x.reshape(rows, size).t()).t().contiguous()
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def use_few_rows_products(model: nn.Module) -> nn.Module:
    """Turns every plain `nn.Linear` of `model` into a `FewRowsLinear` (same parameters, in place); returns it."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FewRowsLinear
    return model
