"""SiftFunnel (Liu et al., arXiv 2501.00824; reference code `project_infodr_v4.py` / `InfoDR_package.py`).

The funnel takes the place of the edge's last block, as in the code (pv4's `block2` becomes `block2_mix`), so the
defended edge is lighter than the undefended one: attention (SE, then triplet attention) on what entered that block,
a 1x1 conv reducing its C_in channels to a quarter (BN, ReLU; max-pooled to the cut's resolution when the replaced
block pooled), a mixing stack (1x1 to the funnel width, 3x3, SiLU, 1x1, 3x3, 5x5, ReLU), then SE and CBAM. With the
code's pv4 ratios (64 -> 16 -> 12) it sends 3 C_in / 16 channels (at least 4) at the cut's resolution. The cloud
begins with the up-sampling module that restores the undefended cut's C channels (3x3 conv to C, 3x3 conv, BN, ReLU,
triplet attention), so the rest of the cloud is the undefended model's.

Training loss (the code's): alpha x KL(label-smoothed targets || softmax) + beta x dCor²(x, z) + 0.03 x mean|z| +
gamma x mean squared channel correlation of z, z being what crosses the cut. The strength knob sets beta = gamma =
strength (the code's defaults: alpha 5, beta 2, gamma 2, smoothing 0.25). `finetune_epochs` > 0 adds the code's
second phase, on by default (one epoch): the edge frozen, the cloud trained on cross-entropy alone at a thousandth
of the learning rate (the code: lr 1e-5 after 300 epochs at 0.01).

Where ours differs from the code, on purpose: the funnel's output has the undefended cut's resolution (adaptive max
pooling, where the code max-pools by 2), so the defended and undefended cuts send maps of the same size; the "up"
module's output width is the undefended cut's channel count, so any of our CNNs can take it.
"""

from __future__ import annotations

from torch import nn

from splitveil.protect.image.attention import CBAM, SqueezeExcitation, TripletAttention
from splitveil.protect.image.base import IMAGE_DEFENCES, ImageDefence
from splitveil.protect.image.losses import channel_correlation_loss, distance_correlation_loss, label_smoothed_kl


def funnel_widths(channels: int) -> tuple[int, int]:
    """(reduced, sent) channels of a funnel taking `channels` (the input of the block it replaces): the code's pv4
    ratios 1/4 and 3/16, at least 4 each."""
    return max(4, channels // 4), max(4, (3 * channels) // 16)


class Funnel(nn.Module):
    """The edge's last block: [B, C, H, W] -> [B, sent, h, w] (non-negative), (h, w) = `size` (default (H, W))."""

    def __init__(self, channels: int, *, size: tuple[int, int] | None = None, se_reduction: int = 32,
                 cbam_ratio: int = 6):
        super().__init__()
        reduced, sent = funnel_widths(channels)
        self.attend = nn.Sequential(SqueezeExcitation(channels, se_reduction), TripletAttention())
        pool = [nn.AdaptiveMaxPool2d(size)] if size is not None else []
        self.reduce = nn.Sequential(nn.Conv2d(channels, reduced, 1), nn.BatchNorm2d(reduced), nn.ReLU(), *pool)
        self.mix = nn.Sequential(
            nn.Conv2d(reduced, sent, 1), nn.Conv2d(sent, sent, 3, padding=1), nn.SiLU(),
            nn.Conv2d(sent, sent, 1), nn.Conv2d(sent, sent, 3, padding=1), nn.Conv2d(sent, sent, 5, padding=2), nn.ReLU())
        self.gate = nn.Sequential(SqueezeExcitation(sent, 4), CBAM(sent, cbam_ratio))

    def forward(self, h):
        return self.gate(self.mix(self.reduce(self.attend(h))))


class UpModule(nn.Module):
    """The cloud's up-sampling module: restores `channels` from the funnel's `sent` channels (same spatial size)."""

    def __init__(self, sent: int, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(sent, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.BatchNorm2d(channels), nn.ReLU(), TripletAttention())

    def forward(self, z):
        return self.body(z)


@IMAGE_DEFENCES.register("siftfunnel")
class SiftFunnelDefence(ImageDefence):
    """Strength: beta = gamma, the weights of dCor² and of the channel correlation (the code's default 2).

    Args:
        alpha: weight of the label-smoothed KL term. smoothing: label smoothing epsilon. l1: weight of mean |z|.
        finetune_epochs: epochs of the freeze-edge, train-cloud phase (0: none).
    """

    name, stage, default_strength = "siftfunnel", "rewrite", 2.0
    replaces_edge_block = True
    frontier_strengths = (0.25, 0.5, 1.0, 2.0, 4.0)
    description = ("funnel-shaped last edge block with attention (1x1-conv channel reduction), cloud up-sampling "
                   "module; loss alpha x label-smoothed KL + beta x dCor²(x, z) + 0.03 x mean|z| + gamma x channel "
                   "correlation²; then the cloud fine-tuned with the edge frozen")

    def __init__(self, strength: float | None = None, *, alpha: float = 5.0, smoothing: float = 0.25, l1: float = 0.03,
                 finetune_epochs: int = 1):
        super().__init__(strength)
        self.alpha, self.smoothing, self.l1, self.finetune = float(alpha), float(smoothing), float(l1), int(finetune_epochs)

    def options(self) -> dict:
        return {"alpha": self.alpha, "smoothing": self.smoothing, "l1": self.l1, "finetune_epochs": self.finetune}

    def edge_layers(self, shape):
        if len(shape.feature_shape) != 3 or len(shape.block_input_shape) != 3:
            from splitveil.core.errors import ConfigError

            raise ConfigError("siftfunnel needs a convolutional cut (feature maps into and out of the edge's last "
                              "block), not a vector one: pick an earlier cut")
        size = tuple(shape.feature_shape[1:])
        return [Funnel(shape.block_input_shape[0], size=None if size == tuple(shape.block_input_shape[1:]) else size)]

    def cloud_layers(self, shape, sent_shape):
        return [UpModule(sent_shape[0], shape.feature_shape[0])]

    def loss(self, images, sent, logits, labels):
        loss = self.alpha * label_smoothed_kl(logits, labels, smoothing=self.smoothing)
        loss = loss + self.strength * distance_correlation_loss(images, sent) + self.l1 * sent.abs().mean()
        return loss + self.strength * channel_correlation_loss(sent)

    def finetune_epochs(self) -> int:
        return self.finetune
