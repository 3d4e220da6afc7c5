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
    lr: float = 2e-3  # Adam learning rate
    seed: int = 0


def cache_dir() -> Path:
    """$SPLITVEIL_CACHE/vision, or ~/.cache/splitveil/vision."""
    root = os.environ.get("SPLITVEIL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "splitveil") / "vision"


def progress(iterable, *, total: int, desc: str, quiet: bool = False):
    """A tqdm bar on stderr; silent when stderr is not a terminal or `quiet`."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty())


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig, *,
                     quiet: bool = False, desc: str = "train") -> nn.Module:
    """Trains `model` with cross-entropy on `images` [N, C, H, W] / `labels` [N]; returns it in eval mode."""
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    steps = (len(images) + config.batch_size - 1) // config.batch_size
    for epoch in range(config.epochs):
        order = torch.randperm(len(images), generator=generator)
        bar = progress(range(steps), total=steps, desc=f"{desc} epoch {epoch + 1}/{config.epochs}", quiet=quiet)
        for step in bar:
            batch = order[step * config.batch_size:(step + 1) * config.batch_size]
            optimiser.zero_grad()
            loss = loss_fn(model(images[batch]), labels[batch])
            loss.backward()
            optimiser.step()
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
                      quiet: bool = False, use_cache: bool = True) -> tuple[nn.Module, bool]:
    """A model from `build()` trained on (images, labels), or its cached weights; returns (model, was_cached).

    Args:
        build: makes the untrained model (seeded here, so the initial weights depend on `config.seed` only).
        key_fields: what names the training run besides `config` (data set, model name, train size ...).
    """
    torch.manual_seed(config.seed)
    model = build()
    path = cache_dir() / f"{key_fields.get('model', 'model')}-{cache_key(**key_fields, **asdict(config))}.pt"
    if use_cache and load_cached_weights(model, path):
        return model.eval(), True
    train_classifier(model, images, labels, config, quiet=quiet, desc=f"train {key_fields.get('model', '')}")
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
