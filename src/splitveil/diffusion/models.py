"""The named diffusion models (`DIFFUSION_MODELS`) and how a name or a folder becomes a `DiffusionModel`: random tiny
models for tests, the Fashion-MNIST model trained here (shipped weights, training as the fallback), or a local
diffusers-style directory. Above `pipeline` (the model's parts) and `train` (the Fashion-MNIST training), so that
neither imports the other back."""

from __future__ import annotations

from pathlib import Path

from splitveil.core.errors import ConfigError, ModelNotFoundError
from splitveil.core.registry import Registry
from splitveil.diffusion.pipeline import (DiffusionModel, build_scheduler, build_text_encoder, build_tokenizer, build_unet,
                                          build_vae, load_directory)
from splitveil.diffusion.train import cached_fashion_model

DIFFUSION_MODELS: Registry = Registry("diffusion model")


@DIFFUSION_MODELS.register("tiny-diffusion")
def tiny_diffusion(*, seed: int = 0) -> DiffusionModel:
    """Random weights, pixel space 16x16, three down blocks: for tests."""
    tokenizer = build_tokenizer()
    return DiffusionModel("tiny-diffusion", tokenizer, build_text_encoder(len(tokenizer), hidden=16, heads=2, seed=seed),
                          build_unet(sample_size=16, widths=(8, 16, 16), cross_attention_dim=16, groups=4, head_dim=4,
                                     seed=seed), build_scheduler())


@DIFFUSION_MODELS.register("tiny-latent-diffusion")
def tiny_latent_diffusion(*, seed: int = 0) -> DiffusionModel:
    """Random weights, a VAE (16x16 pictures, 2x8x8 latents), three down blocks: for tests."""
    tokenizer = build_tokenizer()
    return DiffusionModel("tiny-latent-diffusion", tokenizer,
                          build_text_encoder(len(tokenizer), hidden=16, heads=2, seed=seed),
                          build_unet(channels=2, sample_size=8, widths=(8, 16, 16), cross_attention_dim=16, groups=4,
                                     head_dim=4, seed=seed), build_scheduler(), vae=build_vae(seed=seed))


@DIFFUSION_MODELS.register("fashion-mnist-diffusion")
def fashion_mnist_diffusion(*, quiet: bool = False) -> DiffusionModel:
    """The pixel-space model trained here on Fashion-MNIST prompts (trained on first use, then cached)."""
    return cached_fashion_model(quiet=quiet)


def load_diffusion(name: str, *, quiet: bool = False) -> DiffusionModel:
    """A registered diffusion model or a local diffusers-style directory."""
    if name in DIFFUSION_MODELS:
        factory = DIFFUSION_MODELS.get(name)
        return factory(quiet=quiet) if name == "fashion-mnist-diffusion" else factory()
    path = Path(name)
    if path.is_dir():
        return load_directory(path)
    raise ModelNotFoundError(f"unknown diffusion model {name!r}: use one of {', '.join(DIFFUSION_MODELS.names())} "
                             "or a local diffusers directory (unet/, text_encoder/, tokenizer/, scheduler/)")


def check_model_name(name: str) -> None:
    if name not in DIFFUSION_MODELS and not Path(name).is_dir():
        raise ConfigError(f"unknown diffusion model {name!r}; known: {', '.join(DIFFUSION_MODELS.names())} "
                          "(or give a local diffusers directory)")


def is_diffusion_model(name: str) -> bool:
    """A registered diffusion model or a directory holding a diffusers UNet."""
    return name in DIFFUSION_MODELS or (Path(name) / "unet").is_dir()
