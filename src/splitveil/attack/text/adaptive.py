"""Adaptive attackers: each knows a defence's mechanism and public parameters, never its secret.

- noise: the attacker knows the scale, so it widens the exact attack's tolerance to the noise it expects and trains
  the learned readout on states it noises itself;
- permute: it matches the permuted trunk the cloud must hold against the public weights (`recover_permutation`);
- randcut: the cloud is told the depth (it must run the right layers); an eavesdropper who is not told tries every
  depth and keeps the one at which a token's state matches (`identify_cut_depth`).
"""

from __future__ import annotations

import torch

from splitveil.attack.text.attacks import ExactInversion


def noise_tolerance(strength: float) -> float:
    """Relative distance the exact attack accepts under Gaussian noise of `strength` x the state's RMS.

    In H dimensions the noise norm concentrates at strength x ||clean state|| = strength / sqrt(1 + strength^2) x
    ||observed||; accept up to 10% above that (plus the fp16 wire's own error).
    """
    return 1e-2 + 1.1 * strength / (1 + strength**2) ** 0.5


def noise_augmenter(strength: float, *, seed: int = 0):
    """The attacker's own copy of the noise defence (same mechanism and scale, its own key): states -> noisy."""
    from splitveil.protect.cut import GaussianNoise

    return GaussianNoise(strength, key=seed.to_bytes(32, "little")).apply


def identify_cut_depth(splittable, observed: torch.Tensor, depths, *, positions: int = 2, candidates: int = 256,
                       max_verified: int | None = 8192) -> tuple[int, dict[int, float]]:
    """Which head depth produced `observed` [T, H]: invert the first `positions` at every candidate depth.

    At the true depth the recovered tokens reproduce the observed states (relative residual ~0); at a wrong depth
    no token does. Returns the depth with the smallest residual and every depth's residual.
    """
    target = observed[:positions].float()
    residuals: dict[int, float] = {}
    for depth in depths:
        head = splittable.make_part(0, splittable.boundary(depth))
        tokens = ExactInversion(head, candidates=candidates, max_verified=max_verified).reconstruct(target)
        head.reset()
        with torch.inference_mode():
            states = head(torch.tensor([tokens]))[0].float()
        residuals[depth] = float((states - target).norm() / target.norm())
    return min(residuals, key=residuals.get), residuals
