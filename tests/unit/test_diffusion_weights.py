"""The trained `fashion-mnist-diffusion` weights ship with the package: loading them trains nothing and takes about a
second; a shipped folder made for another config or code version is ignored and training stays the fallback."""

from __future__ import annotations

import time
from dataclasses import asdict

import pytest
import torch

from splitveil.diffusion import train
from splitveil.diffusion.models import load_diffusion, tiny_diffusion


def _never_train(*args, **kwargs):
    raise AssertionError("trained although weights were shipped")


def _stand_in(config: train.DiffusionTrainConfig):
    model = tiny_diffusion(seed=4)
    model.info = {"config": asdict(config), "code_version": train.CODE_VERSION, "train_seconds": 0.0}
    return model


def test_shipped_weights_load_first_and_equal_what_was_shipped(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITVEIL_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(train, "train_fashion_model", _never_train)
    model = _stand_in(train.DiffusionTrainConfig())
    monkeypatch.setattr(train, "SHIPPED_DIR", train.ship(model, tmp_path / "weights" / "fashion-mnist-diffusion"))
    loaded = load_diffusion("fashion-mnist-diffusion", quiet=True)
    for ours, theirs in ((model.unet, loaded.unet), (model.text_encoder, loaded.text_encoder)):
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    assert loaded.info["command"] == train.SHIP_COMMAND and "shipped_from" in loaded.info
    assert not (tmp_path / "empty-cache").exists()  # nothing trained, nothing cached


def test_shipped_weights_of_another_config_are_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITVEIL_CACHE", str(tmp_path / "empty-cache"))
    other = _stand_in(train.DiffusionTrainConfig(steps=10))
    monkeypatch.setattr(train, "SHIPPED_DIR", train.ship(other, tmp_path / "weights" / "fashion-mnist-diffusion"))
    assert train.shipped_fashion_model(train.DiffusionTrainConfig()) is None
    monkeypatch.setattr(train, "train_fashion_model", _never_train)
    with pytest.raises(AssertionError, match="trained although"):  # falls back to training
        load_diffusion("fashion-mnist-diffusion", quiet=True)


@pytest.mark.skipif(not (train.SHIPPED_DIR / "splitveil.json").is_file(), reason="no shipped weights in this checkout")
def test_the_package_ships_the_trained_model_and_loads_it_without_training(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITVEIL_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(train, "train_fashion_model", _never_train)
    size = sum(f.stat().st_size for f in train.SHIPPED_DIR.rglob("*") if f.is_file())
    assert size < 10 * 2**20
    began = time.perf_counter()
    model = load_diffusion("fashion-mnist-diffusion", quiet=True)
    assert time.perf_counter() - began < 20  # about a second on an idle core
    assert model.info["config"] == asdict(train.DiffusionTrainConfig()) and model.info["command"] == train.SHIP_COMMAND
    assert sum(p.numel() for p in model.unet.parameters()) > 1_000_000
