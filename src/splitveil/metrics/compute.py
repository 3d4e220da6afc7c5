"""What a part of a network costs the machine that runs it: parameters, multiply-accumulates and latency.

`part_cost(module, input_shape)` counts the weights a device must store, the multiply-accumulates (MACs) of one
input's forward pass (every `Conv2d` and `Linear`, from the shapes it actually sees, so pooling and strides are
counted right; element-wise work is left out and said so), and the median wall time of a batch-1 forward on this
machine's CPU. SiftFunnel's edge-burden claim is checked with it.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the `Conv2d` and `Linear` layers of `module` on one input of `input_shape`."""
    total = 0

    def conv(layer: nn.Conv2d, _, output):
        nonlocal total
        kernel = layer.kernel_size[0] * layer.kernel_size[1] * (layer.in_channels // layer.groups)
        total += output[0].numel() * kernel

    def linear(layer: nn.Linear, _, output):
        nonlocal total
        total += output[0].numel() * layer.in_features

    hooks = [m.register_forward_hook(conv) for m in module.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear) for m in module.modules() if isinstance(m, nn.Linear)]
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(torch.zeros(1, *input_shape))
    finally:
        module.train(was_training)
        for hook in hooks:
            hook.remove()
    return total


def part_cost(module: nn.Module, input_shape: tuple[int, ...], *, repeats: int = 50) -> dict:
    """{"parameters", "macs", "latency_ms"} of `module` on one input of `input_shape` (latency: the median of
    `repeats` batch-1 forward passes after a warm-up, in eval mode, on this process's torch threads)."""
    was_training = module.training
    module.eval()
    x = torch.zeros(1, *input_shape)
    times = []
    try:
        with torch.no_grad():
            for i in range(repeats + 5):
                began = time.perf_counter()
                module(x)
                if i >= 5:
                    times.append(time.perf_counter() - began)
    finally:
        module.train(was_training)
    return {"parameters": sum(p.numel() for p in module.parameters()), "macs": count_macs(module, input_shape),
            "latency_ms": 1000 * statistics.median(times), "threads": torch.get_num_threads(),
            "counted": "Conv2d and Linear multiply-accumulates; element-wise work (BN, activations, attention gates) "
                       "not counted"}
