"""`splitveil generate-image`: a text-to-image diffusion model run whole, or split between here and a cloud."""

from __future__ import annotations

from pathlib import Path

import typer

from splitveil.cli.common import err_console, print_json, setup, status
from splitveil.core.errors import ConfigError


def generate_image(
    prompt: str = typer.Option(..., "--prompt", "-p", help="What to draw, e.g. \"a photo of a sneaker\"."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG file to write the picture to."),
    model: str = typer.Option("fashion-mnist-diffusion", "--model", "-m", help="fashion-mnist-diffusion (trained here on "
                              "first use, then cached), tiny-diffusion, tiny-latent-diffusion (random weights) or a "
                              "local diffusers directory (unet/, text_encoder/, tokenizer/, scheduler/, vae/)."),
    placement: str = typer.Option("unet-split", "--placement", help="none (all here), reference (Λ-Split's: the cloud "
                                  "runs UNet + scheduler and holds the latents) or unet-split (the UNet Λ-split every "
                                  "step: head and tail, skips, latents and scheduler stay here)."),
    split: int = typer.Option(None, "--split", "-s", help="unet-split: down blocks in the head (and up blocks in the "
                              "tail), 1 to the UNet's number of down blocks (default 1)."),
    steps: int = typer.Option(10, "--steps", min=1, max=1000, help="Denoising steps (DDIM)."),
    guidance: float = typer.Option(3.0, "--guidance", min=0.0, help="Classifier-free guidance scale (1 = none)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial latents."),
    wire: str = typer.Option("fp32", "--wire", help="Codec of the tensors that cross: fp32, fp16, bf16 or int8 "
                             "(per-row affine quantisation)."),
    server: str = typer.Option(None, "--server", help="Run the cloud part on this `splitveil serve` (wss://HOST:PORT) "
                               "instead of in-process over loopback."),
    token_file: Path = typer.Option(None, "--token-file", help="File with the server's bearer token (default: the "
                                    "token file `splitveil serve` made in the splitveil cache)."),
    ca: Path = typer.Option(None, "--ca", help="Trust this certificate (e.g. the server's --tls-cert)."),
    pin: str = typer.Option(None, "--pin", help="Trust exactly the server certificate with this SHA-256 fingerprint."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a plaintext ws:// --server beyond loopback."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object: image_sha256 (of the uint8 pixels), "
                                     "bytes_up, bytes_down, round_trips, seconds, ..."),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """Draw a picture from a prompt through a split (or unsplit) diffusion model; the bytes that cross are counted."""
    from splitveil.diffusion.generate import DiffusionPlacement, GenerationSpec, check_placement, run_generation
    from splitveil.diffusion.models import check_model_name, load_diffusion
    from splitveil.diffusion.wire import check_wire

    where = check_placement(placement)
    check_wire(wire)
    check_model_name(model)
    if where == DiffusionPlacement.NONE and (server or split is not None):
        raise ConfigError("--placement none runs everything here; drop --server and --split")
    if where == DiffusionPlacement.REFERENCE and split is not None:
        raise ConfigError("--split chooses the cut of the unet-split placement; the reference placement has none")
    if (token_file or ca or pin or insecure) and not server:
        raise ConfigError("--token-file, --ca, --pin and --insecure concern a --server; drop them or give --server")
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out} must name a .png file")
    if not out.parent.exists():
        raise ConfigError(f"cannot write --out {out}: {out.parent} does not exist")
    setup(threads)
    with status(f"loading {model} ...", quiet=json_output):
        diffusion = load_diffusion(model, quiet=False)
    head_blocks = split if split is not None else 1
    if where == DiffusionPlacement.UNET_SPLIT:
        from splitveil.diffusion.unet_split import UNetSplittable

        UNetSplittable(diffusion.unet).cuts_for(head_blocks)  # an out-of-range cut fails here, in one line
    spec = GenerationSpec(prompt=prompt, placement=where, steps=steps, seed=seed, guidance=guidance, wire=wire,
                          head_blocks=head_blocks)
    token = None
    if server:
        from splitveil.serve.auth import read_token
        from splitveil.serve.build import default_token_file

        token = read_token(token_file or default_token_file())
    with status(f"drawing {prompt!r} ({steps} steps, {where.value}) ...", quiet=json_output):
        result = run_generation(diffusion, spec, server=server, token=token, ca_file=ca, pin_sha256=pin, insecure=insecure)
    save_png(result.pixels, out)
    if json_output:
        print_json({"image_sha256": result.image_sha256, "bytes_up": result.bytes_up, "bytes_down": result.bytes_down,
                    "round_trips": result.round_trips, "seconds": round(result.seconds, 4), "out": str(out),
                    "model": model, "placement": where.value, "split": head_blocks if where == DiffusionPlacement.UNET_SPLIT else None,
                    "steps": steps, "seed": seed, "guidance": guidance, "wire": wire, "server": server,
                    "shape": list(result.pixels.shape)})
        return
    err_console.print(f"[dim]{where.value}: {steps} steps in {result.seconds:.2f} s; {result.bytes_up} B up, "
                      f"{result.bytes_down} B down, {result.round_trips} round trips[/dim]")
    typer.echo(f"wrote {out} (sha256 of the pixels {result.image_sha256[:16]})")


def save_png(pixels, path: Path) -> None:
    """uint8 [H, W, c] -> PNG."""
    from PIL import Image

    array = pixels.numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    try:
        image.save(path)
    except OSError as error:
        raise ConfigError(f"cannot write --out {path}: {error.strerror or error}") from None
