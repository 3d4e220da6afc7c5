"""What a split diffusion pipeline offers an attacker: the public model, as a private copy.

Both placements serve a public model (Λ-Split's cloud runs a published Stable Diffusion), so the cloud knows every
weight: the text encoder, the UNet (its head included) and the decoder. The target holds the model, never a live
session; a grant is a deep copy that leads back to nothing the device runs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from splitveil.attack.base import Target


@dataclass(frozen=True, eq=False)
class DiffusionTarget(Target):
    """The public diffusion model the victim runs (a `DiffusionModel`)."""

    model: object

    offers = {"knows_head_weights": ("public_model", "the public model's weights (text encoder, UNet head)"),
              "knows_tail_weights": ("decoder_model", "the public decoder (VAE) and the UNet's tail")}
    observable = ("uplink",)

    def offered(self, field: str) -> bool:
        return self.model is not None

    def copy_of(self, field: str):
        return copy.deepcopy(self.model)

    def public(self) -> dict:
        return {"latent_shape": tuple(self.model.latent_shape), "prompt_tokens": self.model.max_prompt_tokens}
