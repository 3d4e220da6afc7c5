"""Leakage attacks on split text-to-image diffusion: the prompt from its embeddings, the picture from the cloud's
per-step state."""

from splitveil.attack.diffusion.picture import PictureRecovery
from splitveil.attack.diffusion.prompt import PromptRecovery
from splitveil.attack.diffusion.target import DiffusionTarget

__all__ = ["DiffusionTarget", "PictureRecovery", "PromptRecovery"]
