"""Train `fashion-mnist-diffusion` (pixel space, 28x28) on Fashion-MNIST with prompts "a photo of a <class>", and
cache it under the splitveil cache beside the vision victims.

The UNet and the small text encoder are trained together on the epsilon-prediction loss; one prompt in ten is
replaced by the empty prompt so that classifier-free guidance works. The cache key names everything that decides
the weights, so a second run loads the directory in well under a second.

The package ships the trained weights (`weights/fashion-mnist-diffusion/`: safetensors, configs and `splitveil.json`,
the training record and command), so a newcomer's first `generate-image` loads them in about a second instead of
training for 10 to 20 minutes on a CPU. They are made, once, by

    python -m splitveil.diffusion.train --ship

which trains (or takes the cached model) and writes that folder. Training on first use stays as the fallback, for
an install without the folder or a config that differs from the shipped one.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

#: bump when the model or this loop changes (cached weights become stale)
CODE_VERSION = 1
#: the trained weights the package ships (package data), a diffusers directory with `splitveil.json`
SHIPPED_DIR = Path(__file__).parent / "weights" / "fashion-mnist-diffusion"
SHIP_COMMAND = "python -m splitveil.diffusion.train --ship"


@dataclass(frozen=True)
class DiffusionTrainConfig:
    steps: int = 2000  # optimiser steps
    batch_size: int = 32
    lr: float = 1e-3  # AdamW, cosine decay to 10%
    uncond_fraction: float = 0.1  # prompts dropped to "" (classifier-free guidance)
    seed: int = 0


def cache_path(config: DiffusionTrainConfig) -> Path:
    """<splitveil cache>/diffusion/fashion-mnist-diffusion-<key>, beside the vision victims' folder."""
    from splitveil.train.classifier import cache_dir

    fields = {"model": "fashion-mnist-diffusion", "code_version": CODE_VERSION, **asdict(config)}
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir().parent / "diffusion" / f"fashion-mnist-diffusion-{key}"


def shipped_fashion_model(config: DiffusionTrainConfig = DiffusionTrainConfig(), *, directory: Path | None = None):
    """The weights shipped with the package when they were trained with `config` by this code version, else None."""
    from splitveil.diffusion.pipeline import load_directory

    directory = SHIPPED_DIR if directory is None else Path(directory)
    try:
        info = json.loads((directory / "splitveil.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("config") != asdict(config) or info.get("code_version") != CODE_VERSION:
        return None
    return load_directory(directory, name="fashion-mnist-diffusion")


def cached_fashion_model(config: DiffusionTrainConfig = DiffusionTrainConfig(), *, quiet: bool = False,
                         device: str = "cpu"):
    """The shipped weights, else the trained model from the cache, else trained now (progress bar on stderr) and
    cached."""
    shipped = shipped_fashion_model(config)
    if shipped is not None:
        return shipped
    return trained_fashion_model(config, quiet=quiet, device=device)


def trained_fashion_model(config: DiffusionTrainConfig = DiffusionTrainConfig(), *, quiet: bool = False,
                          device: str = "cpu"):
    """The trained model from the cache, or trained now (progress bar on stderr) and cached."""
    from splitveil.diffusion.pipeline import load_directory

    path = cache_path(config)
    if (path / "splitveil.json").is_file():
        return load_directory(path, name="fashion-mnist-diffusion")
    if not quiet:
        print(f"splitveil: training fashion-mnist-diffusion once ({config.steps} steps, 10 to 20 minutes on a CPU; the "
              f"package ships these weights unless its weights/ folder is missing); cached in {path}", file=sys.stderr)
    model = train_fashion_model(config, quiet=quiet, device=device)
    tmp = path.with_name(path.name + ".tmp")
    try:
        model.save(tmp)
        (tmp / "splitveil.json").write_text(json.dumps(model.info, indent=1))
        if path.exists():
            import shutil

            shutil.rmtree(path)
        tmp.replace(path)
    except OSError as error:  # a read-only cache only costs time
        print(f"splitveil: could not cache the model in {path}: {error}", file=sys.stderr)
    return model


def train_fashion_model(config: DiffusionTrainConfig, *, quiet: bool = False, device: str = "cpu"):
    """Trains the model; `device` only moves the arithmetic (every random draw is made on the CPU generator)."""
    from diffusers import DDPMScheduler

    from splitveil.data.images import load_dataset
    from splitveil.diffusion.pipeline import (DiffusionModel, build_scheduler, build_text_encoder, build_tokenizer,
                                              build_unet, prompt_for_class)
    from splitveil.train.classifier import progress

    data = load_dataset("fashion-mnist")
    images, labels = data.images[:60000] * 2 - 1, data.labels[:60000]  # the train file only; [-1, 1]
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), seed=config.seed)
    unet = build_unet(seed=config.seed)
    scheduler = build_scheduler()
    noise_schedule = DDPMScheduler.from_config(scheduler.config)
    model = DiffusionModel("fashion-mnist-diffusion", tokenizer, text_encoder, unet, scheduler)
    class_ids = model.tokenize([prompt_for_class(c) for c in range(10)])  # [10, L]
    empty_ids = model.tokenize([""])  # [1, L]
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, config.steps, eta_min=config.lr / 10)
    generator = torch.Generator().manual_seed(config.seed)
    unet.to(device).train(), text_encoder.to(device).train()
    class_ids, empty_ids = class_ids.to(device), empty_ids.to(device)
    start, losses = time.perf_counter(), []
    bar = progress(range(config.steps), total=config.steps, desc="train fashion-mnist-diffusion", quiet=quiet)
    for _ in bar:
        batch = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        x0 = images[batch].to(device)
        ids = class_ids[labels[batch].to(device)]
        drop = torch.rand(config.batch_size, generator=generator) < config.uncond_fraction
        ids = torch.where(drop[:, None].to(device), empty_ids, ids)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (config.batch_size,), generator=generator)
        noise, t = noise.to(device), t.to(device)
        noisy = noise_schedule.add_noise(x0, noise, t)
        context = text_encoder(ids).last_hidden_state
        loss = torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, noise)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        decay.step()
        losses.append(float(loss.detach()))
        if hasattr(bar, "set_postfix") and len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
    unet.to("cpu").eval(), text_encoder.to("cpu").eval()
    model.info = {"config": asdict(config), "code_version": CODE_VERSION, "train_seconds": round(time.perf_counter() - start, 1),
                  "final_loss": round(sum(losses[-100:]) / min(100, len(losses)), 5), "train_images": len(images),
                  "prompt": "a photo of a <class>", "device": str(device)}
    return model


def ship(model, directory: Path = SHIPPED_DIR) -> Path:
    """Writes `model` (trained by `train_fashion_model`) as the package's shipped weights: safetensors and configs,
    and `splitveil.json` with its training record, the command that made it and the code it came from."""
    import shutil

    from splitveil.core.records import environment

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save(tmp)
    env = environment()
    record = {**model.info, "command": SHIP_COMMAND, "cache_key": cache_path(DiffusionTrainConfig(**model.info["config"])).name,
              "shipped_from": {key: env.get(key) for key in ("git_sha", "git_dirty", "versions")}}
    (tmp / "splitveil.json").write_text(json.dumps(record, indent=1) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    tmp.replace(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m splitveil.diffusion.train", description=__doc__.splitlines()[0])
    parser.add_argument("--ship", action="store_true", help=f"write the package's shipped weights ({SHIPPED_DIR.name}/)")
    parser.add_argument("--device", default="cpu", help="where the arithmetic runs (draws stay on the CPU generator)")
    args = parser.parse_args(argv)
    model = trained_fashion_model(DiffusionTrainConfig(), device=args.device)  # the cache's, or trained now
    print(json.dumps(model.info))
    if args.ship:
        print(f"wrote {ship(model)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
