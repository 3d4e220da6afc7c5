"""What `splitveil serve` runs for a diffusion model: the cloud part of one placement, as a `DiffusionService`."""

from __future__ import annotations

from splitveil.core.errors import ConfigError
from splitveil.plan.plan import DEFAULT_LM_SPLIT  # `serve`'s --split default; for a diffusion model: the default cut


def diffusion_service(model_name: str, split: str, placement: str | None, **limits):
    """Loads `model_name` (training it on first use) and serves the cloud part of `placement` (default unet-split)
    with `split` = the head's number of down blocks."""
    from splitveil.diffusion.cloud import build_diffusion_service
    from splitveil.diffusion.generate import DiffusionPlacement, check_placement
    from splitveil.diffusion.models import load_diffusion
    from splitveil.diffusion.unet_split import UNetSplittable

    where = check_placement(placement or DiffusionPlacement.UNET_SPLIT.value)
    if where == DiffusionPlacement.NONE:
        raise ConfigError("--placement none has no cloud part to serve; use reference or unet-split")
    head_blocks = 1
    if split != DEFAULT_LM_SPLIT:
        try:
            head_blocks = int(split)
        except ValueError:
            raise ConfigError(f"bad --split {split!r}: a diffusion model's cut is one number, the head's down blocks") from None
    model = load_diffusion(model_name)
    if where == DiffusionPlacement.UNET_SPLIT:
        UNetSplittable(model.unet).cuts_for(head_blocks)
    elif split != DEFAULT_LM_SPLIT:
        raise ConfigError("--split chooses the cut of the unet-split placement; the reference placement has none")
    return build_diffusion_service(model, where.value, head_blocks, **limits)
