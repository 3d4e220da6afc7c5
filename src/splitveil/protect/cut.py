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


_READS_RESIDUAL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # Linear layers fed by the residual stream
_WRITES_RESIDUAL = ("o_proj", "down_proj")  # Linear layers that add into the residual stream


def permute_layers(layers, permutation: torch.Tensor) -> None:
    """Rewrites decoder layers in place so that they compute on hidden states whose dimensions are permuted.

    Norm weights over the hidden size are permuted, the input columns of the layers that read the residual stream
    and the output rows of the layers that write it are permuted; RMS/LayerNorm statistics are permutation-invariant,
    so layer(h[..., p]) == layer(h)[..., p] up to float summation order. Llama-style Linear names only.
    """
    width = permutation.numel()
    with torch.no_grad():
        for layer in layers:
            for name, module in layer.named_modules():
                leaf = name.rsplit(".", 1)[-1]
                if isinstance(module, torch.nn.Linear) and leaf in _READS_RESIDUAL:
                    module.weight.copy_(module.weight[:, permutation])
                elif isinstance(module, torch.nn.Linear) and leaf in _WRITES_RESIDUAL:
                    module.weight.copy_(module.weight[permutation])
                    if module.bias is not None:
                        module.bias.copy_(module.bias[permutation])
                elif isinstance(module, torch.nn.Linear):
                    raise ConfigError(f"cannot permute the layer {name!r}: only Llama-style layers are supported")
                elif "norm" in leaf.lower() and getattr(module, "weight", None) is not None and module.weight.shape == (width,):
                    module.weight.copy_(module.weight[permutation])
                    if getattr(module, "bias", None) is not None:
                        module.bias.copy_(module.bias[permutation])


@CUT_DEFENCES.register("permute")
class HiddenPermutation(CutDefence):
    """Permutes the hidden dimensions with a secret permutation (the reference implementation's scheme).

    The cloud must run a trunk whose weights are permuted the same way; the device un-permutes the downlink.
    Any strength > 0 turns it on.
    """

    name = "permute"
    cloud_holds = "the trunk's weights with rows and columns permuted by the secret"
    reveals_secret = True  # the permuted weights, compared with the public ones, give the permutation away

    def __init__(self, strength: float = 1.0, *, key: bytes | None = None, width: int | None = None):
        super().__init__(strength, key=key)
        self.width = width
        self.permutation = None

    def _ensure(self, width: int) -> torch.Tensor:
        if self.permutation is None or self.permutation.numel() != width:
            generator = torch.Generator().manual_seed(hkdf_seed(self.key, b"hidden-permutation"))
            self.permutation = torch.randperm(width, generator=generator)
            self.inverse = torch.argsort(self.permutation)
        return self.permutation

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.strength == 0:
            return hidden
        return hidden[..., self._ensure(hidden.shape[-1])]

    def unapply(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.strength == 0:
            return hidden
        self._ensure(hidden.shape[-1])
        return hidden[..., self.inverse]

    def cloud_part(self, part):
        """A copy of `part` over permuted weights: what the cloud is given to run."""
        import copy

        if self.strength == 0:
            return part
        from splitveil.models.causal_lm import CausalLMSplittable

        model = copy.deepcopy(part.owner.model)
        owner = CausalLMSplittable(model)
        permute_layers(owner.layers[part.first_layer : part.first_layer + part.num_layers], self._ensure(owner.hidden_size))
        return owner.make_part(part.start, part.end)


def recover_permutation(public_layer, permuted_layer) -> torch.Tensor:
    """The adaptive attacker's step: match the permuted layer's norm weight to the public one's.

    Returns p with permuted = public[..., p] for the norm weights (ties broken by the q_proj column norms).
    """
    public_norm = next(m.weight for n, m in public_layer.named_modules() if "norm" in n and getattr(m, "weight", None) is not None)
    cloud_norm = next(m.weight for n, m in permuted_layer.named_modules() if "norm" in n and getattr(m, "weight", None) is not None)
    public_q = next(m.weight for n, m in public_layer.named_modules() if n.endswith("q_proj"))
    cloud_q = next(m.weight for n, m in permuted_layer.named_modules() if n.endswith("q_proj"))
    public_key = torch.stack([public_norm.detach(), public_q.detach().norm(dim=0)], dim=1)  # [H, 2]
    cloud_key = torch.stack([cloud_norm.detach(), cloud_q.detach().norm(dim=0)], dim=1)
    distance = torch.cdist(cloud_key.double(), public_key.double())  # [H, H]
    return distance.argmin(dim=1)


@CUT_DEFENCES.register("randcut")
class RandomisedCut(CutDefence):
    """Moves the head's cut deeper by a secret offset in 0..strength, drawn per session from the session key.

    The reference implementation draws the cut per token. With per-part KV caches that cannot be exact: the party
    that runs layer l for a token needs the keys and values of every earlier position at layer l, and for an
    earlier token cut deeper than l only the device ever had that position's state at depth l. So the depth is
    drawn once per session (HKDF of the session key), which keeps every cache exact; docs/architecture.md records
    the decision. The cloud must know the depth to run the right layers, so it learns the secret.
    """

    name = "randcut"
    cloud_holds = "the trunk from the shallowest possible cut, and the session's cut depth (to run the right layers)"
    reveals_secret = True  # the cloud is told (or can try) the depth: it must run exactly the layers after it

    def __init__(self, strength: float, *, key: bytes | None = None):
        super().__init__(strength, key=key)
        if self.strength != int(self.strength):
            raise ConfigError(f"randcut strength is a number of layers (0, 1, 2 ...), got {strength:g}")
        self.offset = hkdf_seed(self.key, b"randomised-cut") % (int(self.strength) + 1)

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden  # the defence moves the cut; what is sent is the plain state at the drawn depth

    def session_plan(self, plan):
        """The Λ-split this session runs: the head's cut moved `offset` layers deeper (the tail's cut stays)."""
        from splitveil.plan.plan import SplitPlan

        head_end, tail_start = plan.cuts
        if head_end + int(self.strength) >= tail_start:
            raise ConfigError(f"randcut strength {self.strength:g} moves the cut {head_end} into the tail (starts at "
                              f"{tail_start}): use a strength below {tail_start - head_end}")
        return SplitPlan.lambda_split(head_end + self.offset, tail_start)
