"""Shared fixtures: one torch thread, offline, and the real SmolLM2 loaded once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct from the shipped package (converted once)."""
    from splitveil.models.loading import load_causal_lm

    return load_causal_lm("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_models():
    """One tiny random model per registered family, built once."""
    from splitveil.models.tiny import TINY_FAMILIES, tiny_causal_lm

    return {family: tiny_causal_lm(family) for family in TINY_FAMILIES}


@pytest.fixture(autouse=True)
def _no_stamped_run(monkeypatch):
    """A command run in-process stamps its git state into the environment; no test inherits another's stamp."""
    from splitveil.core.records import RUN_STATE_VARIABLE

    monkeypatch.delenv(RUN_STATE_VARIABLE, raising=False)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped, with the reason, where torch sees no CUDA device (`pytest -m gpu` here)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch sees none on this machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not a parameter id that reads "gpu"
            item.add_marker(skip)
