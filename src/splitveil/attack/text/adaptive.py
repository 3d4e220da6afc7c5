"""Adaptive attackers: each knows a defence's mechanism and public parameters, never its secret.

- noise: the attacker knows the scale, so it widens the exact attack's tolerance to the noise it expects and trains
  the learned readout on states it noises itself;
- permute: it matches the permuted trunk the cloud must hold against the public weights (`recover_permutation`);
- randcut: the cloud is told the depth (it must run the right layers); an eavesdropper who is not told tries every
  depth and keeps the one at which a token's state matches (`identify_cut_depth`).
"""

from __future__ import annotations

import torch

from splitveil.attack.text.attacks import ExactInversion, wire_tolerance
from splitveil.attack.text.target import TextTarget


def noise_tolerance(strength: float, wire: str = "fp32") -> float:
    """Relative distance the exact attack accepts under Gaussian noise of `strength` x the state's RMS.

    In H dimensions the noise norm concentrates at strength x ||clean state|| = strength / sqrt(1 + strength^2) x
    ||observed||; accept up to 10% above that, plus the wire's own rounding.
    """
    return wire_tolerance(wire) + 1.1 * strength / (1 + strength**2) ** 0.5


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
        attack = ExactInversion(TextTarget(splittable, splittable.boundary(depth)), candidates=candidates,
                                max_verified=max_verified)
        tokens = attack.reconstruct(target)
        head = attack.head  # the attacker's own copy of the public head at this depth
        head.reset()
        with torch.inference_mode():
            states = head(torch.tensor([tokens]))[0].float()
        residuals[depth] = float((states - target).norm() / target.norm())
    return min(residuals, key=residuals.get), residuals


class Adaptation:
    """What an attacker who knows a defence's mechanism and scale (never its secret) does differently.

    The base class is the attacker against an undefended split (or a defence at strength 0): it changes nothing.
    """

    def __init__(self, strength: float = 0.0, wire: str = "fp32"):
        self.strength, self.wire = strength, wire

    def attack_options(self, attack: str) -> dict:
        """Extra keyword arguments for the attack named `attack` (`exact`, or `learned` also when it is a ranker)."""
        return {}

    def session(self, lm, defence, depth: int):
        """One session as the cloud holds it -> (undo: states -> public basis, secret recovered: bool | None)."""
        return (lambda states: states), None

    def probe(self, lm, uplink: torch.Tensor, head_depth: int) -> dict | None:
        """An extra measurement on one session's uplink (e.g. a blind search for a secret); None when there is none."""
        return None

    def secret_recovered(self, probe: dict | None, depth: int) -> bool | None:
        """Whether `probe` (this session's) found the session's secret, given the true head `depth`; None when the
        probe measures no secret."""
        return None


class NoiseAdaptation(Adaptation):
    def attack_options(self, attack: str) -> dict:
        if self.strength <= 0:
            return {}
        if attack == "exact":
            return {"tolerance": noise_tolerance(self.strength, self.wire)}
        return {"augment": noise_augmenter(self.strength)} if attack == "learned" else {}


class PermutationAdaptation(Adaptation):
    def session(self, lm, defence, depth: int):
        if self.strength <= 0:
            return super().session(lm, defence, depth)
        from splitveil.protect.cut import recover_permutation

        cloud = next(iter(lm.service.parts.values()))  # the permuted trunk the cloud must hold
        guess = recover_permutation(lm.splittable.layers[depth], cloud.owner.layers[depth])
        inverse = torch.argsort(guess)
        return (lambda states: states[..., inverse]), bool(torch.equal(guess, defence.permutation))


class RandomisedCutAdaptation(Adaptation):
    """The cloud is told the depth (it must run the right layers); whether the secret is recovered is measured by
    an attacker who is not told it: the blind depth search of each session, compared with that session's depth."""

    def probe(self, lm, uplink: torch.Tensor, head_depth: int) -> dict | None:
        """An eavesdropper who is not told the depth tries every one it could be."""
        if self.strength <= 0:
            return None
        candidates = range(head_depth, head_depth + int(self.strength) + 1)
        found, residuals = identify_cut_depth(lm.splittable, uplink, candidates)
        return {"identified_depth": found, "residuals": residuals}

    def secret_recovered(self, probe: dict | None, depth: int) -> bool | None:
        return None if probe is None else probe["identified_depth"] == depth


ADAPTATIONS: dict[str | None, type[Adaptation]] = {
    None: Adaptation, "noise": NoiseAdaptation, "permute": PermutationAdaptation, "randcut": RandomisedCutAdaptation}


def adaptation_for(defence: str | None, strength: float = 0.0, wire: str = "fp32") -> Adaptation:
    """The adaptive attacker against `defence` (a registered cut defence name, or None for no defence) on `wire`."""
    return ADAPTATIONS.get(defence, Adaptation)(strength, wire)
