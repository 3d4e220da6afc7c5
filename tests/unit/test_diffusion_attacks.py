"""Diffusion leakage attacks run on tiny random pipelines: the exact prompt attack recovers the prompt from fp32
embeddings, the picture attack rebuilds the picture (better than an unrelated picture scores, picked without the true
picture, below the hindsight bound), and both hold only what their threat models grant."""

from __future__ import annotations

import pytest
import torch

from splitveil.attack.diffusion import DiffusionTarget, PictureRecovery, PromptRecovery
from splitveil.diffusion.models import load_diffusion
from splitveil.experiments.diffusion_privacy import DiffusionAttackSpec, run_diffusion_attack


@pytest.fixture(scope="module")
def model():
    return load_diffusion("tiny-diffusion")


def test_exact_prompt_attack_recovers_fp32_embeddings(model):
    attack = PromptRecovery(DiffusionTarget(model))
    ids = model.tokenize(["a photo of my private striped shirt"])
    assert torch.equal(attack.reconstruct(model.encode_prompt(["a photo of my private striped shirt"])), ids)


def test_grants_are_copies(model):
    attack = PictureRecovery(DiffusionTarget(model), inversion_steps=1)
    assert attack.model is not model and attack.model.unet is not model.unet
    assert torch.equal(next(attack.model.unet.parameters()), next(model.unet.parameters()))


@pytest.mark.parametrize("placement", ["reference", "unet-split"])
def test_attacks_run_per_placement(model, placement, tmp_path):
    spec = DiffusionAttackSpec.quick(model="tiny-diffusion", placement=placement, prompts=("a photo of a bag",), steps=3,
                                     inversion_steps=30)
    record = run_diffusion_attack(spec, model=model, pictures_out=tmp_path / "r.png")
    assert record["prompt_token_recovery"] == 1.0
    steps = 3 + (1 if placement == "reference" else 0)  # the reference cloud also computes the final latents
    assert len(record["ssim_by_step"]) == steps
    assert record["image_ssim_step"] == steps - 1  # the last view, picked without the true picture
    assert record["image_ssim"] <= record["ssim_oracle_upper_bound"]
    if placement == "reference":
        assert record["image_ssim"] == pytest.approx(1.0)  # it decodes the final latents it computed
    assert (tmp_path / "r.png").is_file()


def test_unet_split_head_inversion_recovers_the_picture_without_hindsight(model):
    """One head block: the picture the attacker picks (the last step, no true picture) is far closer to the true
    picture than to another prompt's, and no better than the best step chosen with hindsight."""
    spec = DiffusionAttackSpec.quick(model="tiny-diffusion", placement="unet-split", head_blocks=1, steps=3,
                                     prompts=("a photo of a bag", "a photo of a dress"), inversion_steps=150)
    record = run_diffusion_attack(spec, model=model)
    assert record["ssim_unrelated"] is not None
    assert record["image_ssim"] > record["ssim_unrelated"] + 0.3
    assert record["image_ssim"] > 0.5
    assert record["image_ssim"] <= record["ssim_oracle_upper_bound"]
