"""`splitveil attack diffusion`: what the cloud reads of the prompt and the picture under a diffusion placement."""

from __future__ import annotations

from pathlib import Path

import typer

from splitveil.cli.attack import app
from splitveil.cli.common import err_console, print_json, setup
from splitveil.core.errors import ConfigError


@app.command("diffusion")
def diffusion(
    model: str = typer.Option("fashion-mnist-diffusion", "--model", "-m", help="fashion-mnist-diffusion, "
                              "tiny-diffusion, tiny-latent-diffusion or a local diffusers directory."),
    placement: str = typer.Option("unet-split", "--placement", help="reference or unet-split: whose cloud to attack."),
    split: int = typer.Option(None, "--split", "-s", help="unet-split: down blocks in the head (default 1)."),
    steps: int = typer.Option(10, "--steps", min=1, max=1000, help="Denoising steps."),
    guidance: float = typer.Option(3.0, "--guidance", min=0.0, help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first prompt's latents (the next prompts count up)."),
    wire: str = typer.Option("fp32", "--wire", help="Codec of what crosses: fp32, fp16, bf16 or int8."),
    prompts: Path = typer.Option(None, "--prompts", help="File with one prompt per line (default: a built-in set of 8)."),
    pictures: Path = typer.Option(None, "--pictures", help="Write the reconstructions beside the real pictures to this PNG."),
    quick: bool = typer.Option(False, "--quick", help="3 prompts and a shorter head inversion."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object: prompt_token_recovery, image_ssim "
                                     "(the last step's reconstruction: picked without the true picture), "
                                     "ssim_oracle_upper_bound (best step, chosen with it), ssim_by_step, ..."),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """Prompt recovery from the prompt embeddings (exact attack through the public text encoder) and the picture
    rebuilt from the cloud's per-step state, scored by SSIM against the final picture (the step picked without it)."""
    from splitveil.diffusion.generate import DiffusionPlacement, check_placement
    from splitveil.diffusion.models import check_model_name, load_diffusion
    from splitveil.diffusion.unet_split import UNetSplittable
    from splitveil.diffusion.wire import check_wire
    from splitveil.experiments.diffusion_privacy import DiffusionAttackSpec, run_diffusion_attack

    where = check_placement(placement)
    if where == DiffusionPlacement.NONE:
        raise ConfigError("--placement none sends the cloud nothing to attack; use reference or unet-split")
    if where == DiffusionPlacement.REFERENCE and split is not None:
        raise ConfigError("--split chooses the cut of the unet-split placement; the reference placement has none")
    check_wire(wire)
    check_model_name(model)
    lines = _read_prompts(prompts)
    if pictures is not None and (pictures.suffix.lower() != ".png" or not pictures.parent.exists()):
        raise ConfigError(f"--pictures {pictures} must name a .png file in an existing folder")
    setup(threads)
    diffusion_model = load_diffusion(model)
    head_blocks = split if split is not None else 1
    UNetSplittable(diffusion_model.unet).cuts_for(head_blocks)
    fields = {"model": model, "placement": where.value, "head_blocks": head_blocks, "steps": steps, "seed": seed,
              "guidance": guidance, "wire": wire, **({"prompts": tuple(lines)} if lines else {})}
    spec = DiffusionAttackSpec.quick(**fields) if quick else DiffusionAttackSpec(**fields)
    with err_console.status(f"attacking {len(spec.prompts)} prompt(s) ...") as spinner:
        record = run_diffusion_attack(spec, model=diffusion_model, pictures_out=pictures,
                                      progress=lambda done, total: spinner.update(f"attacked {done}/{total} prompts"))
    if json_output:
        print_json(record)
        return
    typer.echo(f"{where.value} ({wire} wire), {len(spec.prompts)} prompt(s):")
    typer.echo(f"  prompt tokens recovered {record['prompt_token_recovery']:.3f}, prompts exact {record['prompt_exact']:.2f}")
    unrelated = record["ssim_unrelated"]
    typer.echo(f"  picture: SSIM {record['image_ssim']:.3f} at step {record['image_ssim_step']} (the last, picked "
               f"without the true picture)" + (f"; another prompt's picture {unrelated:.3f}" if unrelated is not None else ""))
    typer.echo(f"  upper bound, the best step chosen with the true picture: {record['ssim_oracle_upper_bound']:.3f}; "
               "by step " + " ".join(f"{v:.2f}" for v in record["ssim_by_step"]))
    for example in record["examples"]:
        typer.echo(f"    {example['prompt']!r} -> {example['recovered']!r}")


def _read_prompts(path: Path | None) -> list[str]:
    if path is None:
        return []
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as error:
        raise ConfigError(f"cannot read --prompts {path}: {error.strerror or error}") from None
    if not lines:
        raise ConfigError(f"--prompts {path} holds no prompt")
    return lines
