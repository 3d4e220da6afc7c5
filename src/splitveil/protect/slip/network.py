"""SLIP for any network of linear and convolution layers (our CNNs): every decomposable module becomes a masked call.

A convolution is its matrix [out, in x kh x kw] applied to the unfolded input: the trusted side unfolds (im2col),
masks the rows (one per output pixel and image), the executor multiplies them by W_residual, and the trusted side
unmasks, adds the secure low-rank part and the bias and folds the rows back into an image. Pooling, batch norm and
activations stay on the trusted side. Each module is one linear group (nothing is shared between them here).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from splitveil.core.errors import ConfigError
from splitveil.protect.slip.decompose import LinearGroup, decompose, is_decomposable, weight_matrix
from splitveil.protect.slip.trusted import GroupRuntime, ProtectedGroups, SlipConfig, SlipCost, SlipLinear


class SlipConv2d(nn.Module):
    """Stands in for a Conv2d: unfold, masked product of the rows, fold."""

    def __init__(self, runtime: GroupRuntime, conv: nn.Conv2d):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ConfigError("only ungrouped, zero-padded convolutions with numeric padding are protected")
        self.runtime = runtime
        self.kernel_size, self.stride, self.padding, self.dilation = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        self.out_channels = conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, out, H', W']
        batch = x.shape[0]
        columns = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)  # [B, n, L]
        rows = columns.transpose(1, 2).reshape(-1, columns.shape[1])  # [B L, n]
        out = self.runtime.compute(rows.contiguous())  # [B L, out]
        h = (x.shape[2] + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        w = (x.shape[3] + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        return out.reshape(batch, h * w, self.out_channels).transpose(1, 2).reshape(batch, self.out_channels, h, w)


class SlipNetwork(ProtectedGroups):
    """Protects, in place, every Linear and Conv2d of `model` (a CNN or any stack); `model` keeps working as before.

    Same verbs as `SlipModel` (`trusted.ProtectedGroups`): `attach(client)`, `reference()`, `executor_weights()`,
    `fill_pools(rows)`.
    """

    def __init__(self, model: nn.Module, config: SlipConfig, *, generator: np.random.Generator | None = None):
        self.model = model
        self.config = config
        self.cost = SlipCost()
        self.groups: list[LinearGroup] = []
        self.runtimes: list[GroupRuntime] = []
        rank = config.rank if config.rank is not None or config.energy is not None else 0
        targets = [(name, module) for name, module in model.named_modules() if is_decomposable(module)]
        owners = {id(child): (parent, attr) for parent in model.modules() for attr, child in parent.named_children()}
        for name, module in targets:
            matrix = weight_matrix(module)
            part = decompose(matrix, rank=rank if config.energy is None else None, energy=config.energy)
            group = LinearGroup(len(self.groups), (name,), matrix.shape[1], (matrix.shape[0],), None)
            bias = module.bias.detach().clone() if getattr(module, "bias", None) is not None else None
            runtime = GroupRuntime(group, [part], [bias], config, self.cost, generator=generator)
            self.groups.append(group)
            self.runtimes.append(runtime)
            parent, attr = owners[id(module)]
            replacement = SlipConv2d(runtime, module) if isinstance(module, nn.Conv2d) else SlipLinear(runtime, 0, name)
            setattr(parent, attr, replacement)
