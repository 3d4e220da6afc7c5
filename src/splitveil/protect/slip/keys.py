"""Freivalds keys for a device that holds no linear weight: s W computed once per model, by streaming each public
matrix from the model's safetensors file and dropping it, and cached on the device's disk.

Per model and group the cache holds a secret base of K vectors S [K, m] (uniform over Z_2^64) and S W [K, n], and
the facts a range check needs (max |W_ij| and max_i ||W_i||_2 in ring integers, max |W| in floats for the
fixed-point overflow check). No session uses the base as such: each session draws fresh coefficients C [t, K]
(uniform) and checks with s = C S and s W = C (S W) (`SessionKeys`). For an error e the executor or the dealer
chose without knowing S, each (S e)_k is uniform over the multiples of 2^b (b the lowest set bit of e), and a fresh
c misses C S e = 0 with probability 2^-(64 - b), as fresh uniform vectors would; the range check bounds b as in
`freivalds.py`. The base never leaves the device; an executor that tampers learns at most whether it was caught,
and a failed check ends the session.

The file is the device's secret (mode 0600 in the splitveil cache); deleting it only costs one more pass over the
weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitveil.protect.slip.decompose import LinearGroup
from splitveil.protect.slip.fixedpoint import FixedPoint, RingWeight, uniform_ring

BASE_VECTORS = 8
KEYS_VERSION = 1


@dataclass
class GroupKeys:
    """One group's base: S [K, m], S W [K, n] (int64 ring elements) and its range facts."""

    s: np.ndarray
    sw: np.ndarray
    row_norm: float  # max_i ||W_i||_2, ring integers
    largest: int  # max |W_ij|, ring integers
    w_max: float  # max |W_ij|, floats (the fixed-point overflow check)


def member_sources(model, found: list[tuple[LinearGroup, list]]) -> list:
    """Each group's matrix source (see `stacked`) from its modules, as `causal_lm_groups` gives them."""
    names = {id(module): name for name, module in model.named_modules()}
    return [stacked([f"{names[id(module)]}.weight" for module in modules]) for _, modules in found]


def stacked(names: list[str]):
    """A group's matrix source: a function of a `plan.parts.Checkpoint` that reads the members' weights (float32)
    and stacks them [sum m, n]."""
    def read(checkpoint) -> torch.Tensor:
        tensors = checkpoint.read(names)
        return torch.cat([tensors[name] for name in names]) if len(names) > 1 else tensors[names[0]]
    return read


def build_keys(checkpoint, sources: list, fixed_point: FixedPoint, *, base: int = BASE_VECTORS,
               progress=None) -> list[GroupKeys]:
    """Reads every group's matrix from its source (one group in memory at a time) and computes its base."""
    keys = []
    for index, source in enumerate(sources):
        matrix = source(checkpoint)
        ring = RingWeight(fixed_point.encode_w(matrix), compact=True)
        s = uniform_ring((base, matrix.shape[0]))
        keys.append(GroupKeys(s.numpy(), ring.left_matmul(s).numpy(), ring.row_norm(), ring.largest,
                              float(matrix.abs().max())))
        del matrix, ring
        if progress is not None:
            progress(index + 1, len(sources))
    return keys


def keys_path(model_dir: Path, groups: list[LinearGroup], fixed_point: FixedPoint) -> Path:
    from splitveil.models.loading import cache_root

    key = {"v": KEYS_VERSION, "config": hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest(),
           "groups": [g.to_dict() for g in groups], "fixed_point": fixed_point.to_dict(), "base": BASE_VECTORS}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root() / "slip" / "keys" / f"{digest}.safetensors"


def load_or_build_keys(model, model_dir: Path, groups: list[LinearGroup], sources: list, fixed_point: FixedPoint,
                       *, progress=None) -> tuple[list[GroupKeys], float]:
    """The keys of `groups`, whose matrices `sources` read from the checkpoint (`member_sources`, or the fused
    groups' sources), from the cache or built (streaming the weights) and cached. `model` (meta weights are fine)
    names the checkpoint's parameters. Returns (keys, seconds spent building; 0 when cached)."""
    from safetensors.numpy import load_file, save_file

    from splitveil.plan.parts import Checkpoint

    path = keys_path(model_dir, groups, fixed_point)
    if path.is_file():
        data = load_file(str(path))
        facts = json.loads(path.with_suffix(".json").read_text())
        return [GroupKeys(data[f"s.{i}"], data[f"sw.{i}"], *facts[i]) for i in range(len(groups))], 0.0
    started = time.perf_counter()
    keys = build_keys(Checkpoint(model_dir, model), sources, fixed_point, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.tmp{os.getpid()}")
    tensors = {f"{kind}.{i}": np.ascontiguousarray(getattr(k, kind)) for i, k in enumerate(keys) for kind in ("s", "sw")}
    save_file(tensors, str(partial))
    os.chmod(partial, 0o600)
    path.with_suffix(".json").write_text(json.dumps([[k.row_norm, k.largest, k.w_max] for k in keys]))
    os.replace(partial, path)
    return keys, time.perf_counter() - started


class SessionKeys:
    """One session's check vectors for one group: s = C S, s W = C (S W) with C fresh and uniform."""

    def __init__(self, keys: GroupKeys, count: int):
        coefficients = uniform_ring((count, keys.s.shape[0])).numpy()
        self.keys = keys
        self.s = coefficients @ keys.s  # [t, m], wraps mod 2^64
        self.sw = coefficients @ keys.sw  # [t, n]

    def ensure(self, vectors: int) -> None:
        """Draws more vectors for this session when it has fewer than `vectors`."""
        if vectors > self.s.shape[0]:
            more = SessionKeys(self.keys, vectors - self.s.shape[0])
            self.s, self.sw = np.concatenate([self.s, more.s]), np.concatenate([self.sw, more.sw])

    def passes(self, product: np.ndarray, encoded: np.ndarray, vectors: int) -> bool:
        """product [P, m] == encoded [P, n] W^T, checked with `vectors` vectors (more are drawn when needed)."""
        self.ensure(vectors)
        return bool(np.array_equal(product @ self.s[:vectors].T, encoded @ self.sw[:vectors].T))
