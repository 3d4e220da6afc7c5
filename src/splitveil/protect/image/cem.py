"""CEM (Xia et al., CVPR 2025, arXiv 2503.00383): conditional entropy maximisation plugged into noise obfuscation.

The edge sends z = f(x) + N(0, sigma²) with sigma = strength x the feature RMS. The paper proves that any inversion's
MSE is at least exp(2 H(x | z) / d) / (2 pi e); with the noise fixed, raising H(x | z) means lowering H(z), which it
bounds by modelling f(x) as a Gaussian mixture. Training adds `weight` x that bound (`mixture_entropy_bound`, one
component per class of the batch) to the cross-entropy, which pulls each class's features together relative to the
noise, so the noise hides more of what distinguishes one image from another.
"""

from __future__ import annotations

import torch.nn.functional as F

from splitveil.protect.image.base import IMAGE_DEFENCES, ImageDefence, Noise
from splitveil.protect.image.losses import mixture_entropy_bound


class _CleanThenNoise(Noise):
    """Noise that remembers the clean features of the last training batch (for the entropy bound)."""

    def forward(self, z):
        if self.training:
            self.clean = z
        return super().forward(z)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("clean", None)
        return state


@IMAGE_DEFENCES.register("cem")
class ConditionalEntropyDefence(ImageDefence):
    """Strength: the noise std relative to the feature RMS (0: no noise, no entropy term). `weight`: the entropy
    bound's weight against the cross-entropy."""

    name, stage, default_strength = "cem", "loss", 0.5
    frontier_strengths = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    description = ("Gaussian noise at the cut (std = strength x feature RMS) + CE + weight x a Gaussian-mixture bound "
                   "on H(z) (maximises H(x | z), which lower-bounds any inversion's MSE)")

    def __init__(self, strength: float | None = None, *, weight: float = 1.0):
        super().__init__(strength)
        self.weight = float(weight)

    def options(self) -> dict:
        return {"weight": self.weight}

    def edge_layers(self, shape):
        self._noise = _CleanThenNoise(self.strength)
        return [self._noise]

    def loss(self, images, sent, logits, labels):
        ce = F.cross_entropy(logits, labels)
        noise = getattr(self, "_noise", None)
        clean = getattr(noise, "clean", None)
        if clean is not None:
            noise.clean = None  # drop the batch's graph once used
        if self.identity or clean is None:
            return ce
        return ce + self.weight * mixture_entropy_bound(clean, labels, self.strength)
