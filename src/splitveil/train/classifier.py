"""Train a vision classifier with a seed, Adam and a progress bar, and cache the weights on disk.

The cache key names everything that decides the weights (data set, model, epochs, train size, seed, code version),
so a second run with the same settings reloads in milliseconds instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

#: bump when a change to the models or this loop makes cached weights stale
CODE_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 64
    lr: float = 2e-3  # Adam learning rate (the peak one under "onecycle")
    seed: int = 0
    schedule: str = "constant"  # "constant", or "onecycle" (warm-up then cosine decay, per step)
    augment: bool = False  # random shifts of up to 2 pixels and horizontal flips of each training batch
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (0: plain Adam)

    def key(self) -> dict:
        """What names this configuration in a cache key: fields added after the first release appear only when they
        differ from their defaults, so weights cached before they existed keep their keys."""
        fields = asdict(self)
        for name, default in (("schedule", "constant"), ("augment", False), ("weight_decay", 0.0)):
            if fields[name] == default:
                del fields[name]
        return fields


SCHEDULES = ("constant", "onecycle")


def cache_dir() -> Path:
    """$SPLITVEIL_CACHE/vision, or ~/.cache/splitveil/vision."""
    root = os.environ.get("SPLITVEIL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "splitveil") / "vision"


def progress(iterable, *, total: int, desc: str, quiet: bool = False):
    """A tqdm bar on stderr; silent when stderr is not a terminal or `quiet`."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty())


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by up to 2 pixels each way (zero fill) and flipped left-right with probability 1/2."""
    n, _, height, width = images.shape
    padded = nn.functional.pad(images, (2, 2, 2, 2))
    shifts = torch.randint(0, 5, (n, 2), generator=generator)
    flips = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    out = torch.stack([padded[i, :, dy:dy + height, dx:dx + width] for i, (dy, dx) in enumerate(shifts.tolist())])
    out[flips] = out[flips].flip(-1)
    return out


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig, *,
                     quiet: bool = False, desc: str = "train", loss=None, parameters=None) -> nn.Module:
    """Trains `model` with cross-entropy on `images` [N, C, H, W] / `labels` [N]; returns it in eval mode.

    Args:
        loss: `loss(model, images, labels) -> scalar` instead of the cross-entropy of `model(images)` (a defence's
            training loss).
        parameters: the parameters to train (default: all of `model`'s).
    """
    if config.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {config.schedule!r}; known: {', '.join(SCHEDULES)}")
    generator = torch.Generator().manual_seed(config.seed)
    parameters = list(model.parameters() if parameters is None else parameters)
    if config.weight_decay > 0:
        optimiser = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimiser = torch.optim.Adam(parameters, lr=config.lr)
    steps = (len(images) + config.batch_size - 1) // config.batch_size
    scheduler = (torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr, total_steps=steps * config.epochs)
                 if config.schedule == "onecycle" and config.epochs * steps > 1 else None)
    loss_fn = loss or (lambda m, x, y: nn.functional.cross_entropy(m(x), y))
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(images), generator=generator)
        bar = progress(range(steps), total=steps, desc=f"{desc} epoch {epoch + 1}/{config.epochs}", quiet=quiet)
        for step in bar:
            batch = order[step * config.batch_size:(step + 1) * config.batch_size]
            inputs = augment_batch(images[batch], generator) if config.augment else images[batch]
            optimiser.zero_grad()
            value = loss_fn(model, inputs, labels[batch])
            value.backward()
            optimiser.step()
            if scheduler is not None:
                scheduler.step()
    return model.eval()


@torch.no_grad()
def predict(model, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Logits [N, classes] of `model` (any callable: a module or a chain of parts) in batches."""
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def cache_key(**fields) -> str:
    text = json.dumps({**fields, "code_version": CODE_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_classifier(build, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig, *, key_fields: dict,
                      quiet: bool = False, use_cache: bool = True, train=None) -> tuple[nn.Module, bool]:
    """A model from `build()` trained on (images, labels), or its cached weights; returns (model, was_cached).

    Args:
        build: makes the untrained model (seeded here, so the initial weights depend on `config.seed` only).
        key_fields: what names the training run besides `config` (data set, model name, train size ...).
        train: `train(model, images, labels, config, quiet=..., desc=...)` instead of `train_classifier` (a defended
            model's training); what decides its result belongs in `key_fields`.
    """
    torch.manual_seed(config.seed)
    model = build()
    path = cache_dir() / f"{key_fields.get('model', 'model')}-{cache_key(**key_fields, **config.key())}.pt"
    if use_cache and load_cached_weights(model, path):
        return model.eval(), True
    (train or train_classifier)(model, images, labels, config, quiet=quiet, desc=f"train {key_fields.get('model', '')}")
    model.eval()
    if use_cache:
        save_cached_weights(model, path)
    return model, False


def load_cached_weights(model: nn.Module, path: Path) -> bool:
    """Loads the weights cached at `path` into `model`; False when there are none or they do not fit (a stale or
    broken file: the caller trains again and overwrites it)."""
    if not path.is_file():
        return False
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return True
    except (RuntimeError, OSError, EOFError):
        return False


def save_cached_weights(model: nn.Module, path: Path) -> None:
    """Caches `model`'s weights at `path` (written aside, then renamed); a read-only cache only costs time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    except OSError:
        pass
