"""The denoising loop's pure pieces, shared by every placement so that each computes the same floats.

One step: the latents (twice, for classifier-free guidance: [unconditional; conditional] rows, as diffusers
batches them) go through the UNet's noise prediction, the two predictions are mixed, and the scheduler steps.
Only *where* `predict_noise` runs differs between placements.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: the default classifier-free guidance scale (1 = no guidance: one row per picture instead of two)
DEFAULT_GUIDANCE = 3.0


def fresh_scheduler(model, steps: int):
    """A copy of the model's scheduler with `steps` inference timesteps set (schedulers are stateful)."""
    scheduler = type(model.scheduler).from_config(model.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def uses_guidance(guidance: float) -> bool:
    return guidance > 1.0


def prompt_context(model, prompts: list[str], guidance: float) -> torch.Tensor:
    """Prompt embeddings the UNet cross-attends to: [2B, L, D] ("" rows first) with guidance, else [B, L, D]."""
    if uses_guidance(guidance):
        return model.encode_prompt([""] * len(prompts) + list(prompts))
    return model.encode_prompt(list(prompts))


def initial_latents(model, batch: int, seed: int, scheduler) -> torch.Tensor:
    """Seeded Gaussian latents [B, C, h, w], scaled by the scheduler's initial sigma."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn((batch, *model.latent_shape), generator=generator) * scheduler.init_noise_sigma


def denoise_step(predict_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler, latents: torch.Tensor,
                 t: torch.Tensor, guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step; returns (next latents, the scheduler's estimate of the clean latents)."""
    guided = uses_guidance(guidance)
    model_input = torch.cat([latents, latents]) if guided else latents
    model_input = scheduler.scale_model_input(model_input, t)
    noise = predict_noise(model_input, t)
    if guided:
        unconditional, conditional = noise.chunk(2)
        noise = unconditional + guidance * (conditional - unconditional)
    out = scheduler.step(noise, t, latents)
    return out.prev_sample, out.pred_original_sample


def unet_noise(model, context: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`predict_noise` through the whole UNet (diffusers' own forward)."""

    @torch.no_grad()
    def predict(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model.unet(sample, t, encoder_hidden_states=context).sample

    return predict


def to_uint8(pictures: torch.Tensor) -> torch.Tensor:
    """Pictures in [0, 1] [B, c, H, W] -> uint8 [B, H, W, c], rounded as PIL pipelines do."""
    return (pictures.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8)
