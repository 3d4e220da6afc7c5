"""Defences that act at a cut: the device transforms the hidden states before they leave it.

Each declares what the cloud must hold to run its part on the transformed states and whether that reveals the
defence's secret, and keeps a differentiable path so that adaptive attacks can use it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from abc import ABC, abstractmethod

import torch

from splitveil.core.errors import ConfigError
from splitveil.core.registry import Registry

CUT_DEFENCES: Registry = Registry("defence")


def hkdf_seed(key: bytes, info: bytes) -> int:
    """A 63-bit generator seed derived from a session key with HKDF-SHA256 (RFC 5869), never a fixed seed."""
    prk = hmac.new(b"splitveil-defence", key, hashlib.sha256).digest()
    okm = hmac.new(prk, info + b"\x01", hashlib.sha256).digest()
    return int.from_bytes(okm[:8], "little") & (2**63 - 1)


class CutDefence(ABC):
    """Transforms the uplink on the device. `strength` 0 must be the identity."""

    name = "defence"
    cloud_holds = ""  # what the cloud needs to run its part on defended states
    reveals_secret = False  # whether that reveals the defence's secret to the cloud

    def __init__(self, strength: float, *, key: bytes | None = None):
        if strength < 0:
            raise ConfigError(f"defence strength must be >= 0, got {strength}")
        self.strength = float(strength)
        self.key = key if key is not None else secrets.token_bytes(32)

    @abstractmethod
    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, H] states after the head -> what is sent to the cloud."""


@CUT_DEFENCES.register("noise")
class GaussianNoise(CutDefence):
    """Adds N(0, (strength x RMS of the position's state)^2) to every coordinate of every uplink position."""

    name = "noise"
    cloud_holds = "nothing beyond the public trunk"
    reveals_secret = False

    def __init__(self, strength: float, *, key: bytes | None = None):
        super().__init__(strength, key=key)
        self.generator = torch.Generator().manual_seed(hkdf_seed(self.key, b"gaussian-noise"))

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.strength == 0:
            return hidden
        rms = hidden.pow(2).mean(-1, keepdim=True).sqrt()
        noise = torch.randn(hidden.shape, generator=self.generator, dtype=hidden.dtype)
        return hidden + self.strength * rms * noise


class DefendedStage:
    """Wraps the device's head part: its outputs pass through `defence` before they leave the device."""

    def __init__(self, stage, defence: CutDefence):
        self.stage = stage
        self.defence = defence

    def __call__(self, x):
        return self.defence.apply(self.stage(x))

    def reset(self) -> None:
        self.stage.reset()
