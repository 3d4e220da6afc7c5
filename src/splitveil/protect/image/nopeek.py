"""NoPeek (Vepakomma et al. 2020): the edge is trained to keep the distance correlation between the images and the
features it sends low, besides the task loss."""

from __future__ import annotations

import torch.nn.functional as F

from splitveil.protect.image.base import IMAGE_DEFENCES, ImageDefence
from splitveil.protect.image.losses import distance_correlation_loss


@IMAGE_DEFENCES.register("nopeek")
class NoPeekDefence(ImageDefence):
    """Strength: the weight of dCor²(x, z) against the cross-entropy."""

    name, stage, default_strength = "nopeek", "loss", 0.5
    frontier_strengths = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    description = "training loss CE + strength x dCor²(images, features at the cut)"

    def loss(self, images, sent, logits, labels):
        ce = F.cross_entropy(logits, labels)
        return ce if self.identity else ce + self.strength * distance_correlation_loss(images, sent)
