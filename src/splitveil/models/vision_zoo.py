"""Our own small CNNs for 1-channel images (no torchvision): LeNet-, VGG- and ResNet-style, as Splittable stacks.

Every builder takes `(image_shape, num_classes)` and works for any input size (adaptive pooling before the head).
Blocks are the cut points: a cut `c` sends the output of block `c`.
"""

from __future__ import annotations

from torch import nn

from splitveil.core.registry import Registry
from splitveil.models.mobilenet import mobilenet
from splitveil.models.sequential import SequentialSplittable

VISION_MODELS: Registry = Registry("vision model")


def conv_bn_relu(c_in: int, c_out: int, *, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return nn.Sequential(*layers)


def classifier_head(channels: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


@VISION_MODELS.register("lenet")
def lenet(image_shape=(1, 28, 28), num_classes: int = 10) -> SequentialSplittable:
    """LeNet-5-like: two conv-ReLU-pool blocks, two fully connected blocks, a linear head. 28x28: 6x14x14, 16x5x5, 120, 84."""
    channels = image_shape[0]
    blocks = [
        nn.Sequential(nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)),
        nn.Sequential(nn.Conv2d(6, 16, 5, padding=2 if min(image_shape[1:]) < 16 else 0), nn.ReLU(),
                      nn.AdaptiveMaxPool2d(5)),
        nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU()),
        nn.Sequential(nn.Linear(120, 84), nn.ReLU()),
    ]
    return SequentialSplittable(blocks=blocks, epilogue=[nn.Linear(84, num_classes)], name="lenet")


@VISION_MODELS.register("vgg")
def vgg(image_shape=(1, 28, 28), num_classes: int = 10, *, width: int = 32) -> SequentialSplittable:
    """VGG-style: 5 conv-BN-ReLU blocks, max-pooling after blocks 2, 4 and 5. 28x28: 32x28x28, 32x14x14, 64x14x14,
    64x7x7, 128x4x4."""
    w = width
    blocks = [conv_bn_relu(image_shape[0], w), conv_bn_relu(w, w, pool=True), conv_bn_relu(w, 2 * w),
              conv_bn_relu(2 * w, 2 * w, pool=True), conv_bn_relu(2 * w, 4 * w, pool=True)]
    return SequentialSplittable(blocks=blocks, epilogue=[classifier_head(4 * w, num_classes)], name="vgg")


class ResidualBlock(nn.Module):
    """Two conv-BN layers plus the input (a 1x1 conv-BN shortcut when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):  # [B, c_in, H, W] -> [B, c_out, H/stride, W/stride]
        return self.relu(self.body(x) + self.shortcut(x))


@VISION_MODELS.register("resnet")
def resnet(image_shape=(1, 28, 28), num_classes: int = 10, *, width: int = 16) -> SequentialSplittable:
    """ResNet-style: a conv stem, then residual stages (stride 1, 2, 2). 28x28: 16x28x28, 16x28x28, 32x14x14, 64x7x7."""
    w = width
    blocks = [conv_bn_relu(image_shape[0], w), ResidualBlock(w, w), ResidualBlock(w, 2 * w, stride=2),
              ResidualBlock(2 * w, 4 * w, stride=2)]
    return SequentialSplittable(blocks=blocks, epilogue=[classifier_head(4 * w, num_classes)], name="resnet")


def build_vision_model(name: str, image_shape, num_classes: int) -> SequentialSplittable:
    """The registered model `name` for images of `image_shape` (C, H, W) and `num_classes` classes."""
    return VISION_MODELS.get(name)(tuple(image_shape), num_classes)


VISION_MODELS.register("mobilenet", mobilenet)  # MobileNet-style, from models/mobilenet.py
