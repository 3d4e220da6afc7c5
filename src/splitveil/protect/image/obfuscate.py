"""Obfuscation at the cut: Gaussian noise and dropout on what the edge sends (the baselines of SiftFunnel's code,
`--protect dp` and `--protect drop`). The victim is trained with the transform in place, and it stays on when
deployed, so the cloud and any attacker querying the edge see transformed features."""

from __future__ import annotations

from splitveil.protect.image.base import IMAGE_DEFENCES, AlwaysDropout, ImageDefence, Noise


@IMAGE_DEFENCES.register("noise")
class GaussianNoiseDefence(ImageDefence):
    """Strength: the noise's standard deviation relative to each sample's feature RMS."""

    name, stage, default_strength = "noise", "cut", 0.8  # SiftFunnel's code: delta 0.8
    frontier_strengths = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    description = "Gaussian noise added to the features at the cut (std = strength x feature RMS), trained with it"

    def edge_layers(self, shape):
        return [Noise(self.strength)]


@IMAGE_DEFENCES.register("dropout")
class DropoutDefence(ImageDefence):
    """Strength: the dropout rate, below 1."""

    name, stage, default_strength, max_strength = "dropout", "cut", 0.8, 1.0  # SiftFunnel's code: r 0.8
    frontier_strengths = (0.2, 0.4, 0.6, 0.8, 0.9, 0.95)
    description = "Bernoulli dropout of the features at the cut (rate = strength), trained with it, on when deployed"

    def edge_layers(self, shape):
        return [AlwaysDropout(self.strength)]
