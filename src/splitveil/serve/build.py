"""Builds what a cloud process serves: only its parts' weights, a PartService, TLS material and a token."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from splitveil.core.errors import ConfigError
from splitveil.models.loading import cache_root, config_digest
from splitveil.plan.parts import load_causal_lm_parts
from splitveil.plan.plan import Placement, apply
from splitveil.serve.auth import new_token, read_token, write_token
from splitveil.serve.service import PartService
from splitveil.transport.tls import certificate_expires_within, fingerprint_pem, generate_self_signed, server_context
from splitveil.wire.frame import MAX_FRAME_BYTES


def default_max_kv_mb() -> int:
    """The default server-wide KV budget: half of this machine's physical memory (4096 MiB when unknown).

    The other half is left to the weights, the frames in flight and everything else on the machine, so that
    sessions are refused before the kernel has to kill the server.
    """
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        total = 0
    return max(1, total // 2 // 2**20) if total > 0 else 4096


def build_cloud_service(model: str, cuts: tuple[int, ...], *, max_sessions: int = 64, max_tokens: int | None = None,
                        max_frame_bytes: int = MAX_FRAME_BYTES, max_batch: int = 8, batch_steps: bool = True,
                        max_kv_mb: float | None = None, load_format: str = "auto", dtype: str = "float32",
                        device: str = "cpu") -> PartService:
    """Loads the weights of the cloud parts of the plan with `cuts` (and nothing else), in `dtype` on `device`, and
    serves them.

    `max_kv_mb` bounds the KV caches of all sessions together (default: `default_max_kv_mb()`; on a GPU, half of
    its free memory once the weights are loaded)."""
    from splitveil.models.precision import dtype_name
    from splitveil.plan.plan import SplitPlan

    plan = SplitPlan.from_cuts(cuts)
    cloud = tuple(i for i, place in enumerate(plan.placement) if place == Placement.CLOUD)
    if not cloud:
        raise ConfigError("this plan has no cloud part to serve; give --split A,B")
    splittable, plan = load_causal_lm_parts(model, cuts, cloud, load_format=load_format, dtype=dtype, device=device)
    smallest = splittable.hidden_size * 4 + 40  # one fp32 position and its header
    if max_frame_bytes < smallest:
        raise ConfigError(f"--max-frame-bytes {max_frame_bytes} cannot carry one position of this model; use at least {smallest}")
    parts = apply(splittable, plan)
    for part in parts:
        part.last_logits_only = True
    _warm_up(parts, cloud, splittable.hidden_size)
    context = getattr(splittable.config, "max_position_embeddings", None) or 8192
    served = parts[cloud[0]]
    if max_kv_mb is None and served.device.type == "cuda":  # the caches live in GPU memory: half of what is left
        import torch

        max_kv_mb = max(1, torch.cuda.mem_get_info(served.device)[0] // 2 // 2**20)
    info = {"model": model, "model_config_sha256": config_digest(model, load_format=load_format),
            "cuts": list(plan.cuts), "placement": [p.value for p in plan.placement],
            "dtype": dtype_name(served.dtype), "device": str(served.device)}
    return PartService({i: parts[i] for i in cloud}, hidden_size=splittable.hidden_size, info=info,
                       max_sessions=max_sessions, max_tokens=min(max_tokens or context, context),
                       max_frame_bytes=max_frame_bytes, max_batch=max_batch, batch_steps=batch_steps,
                       max_kv_bytes=int((max_kv_mb if max_kv_mb is not None else default_max_kv_mb()) * 2**20))


def _warm_up(parts, cloud: tuple[int, ...], hidden_size: int) -> None:
    """Runs each served part once on a throw-away copy, so that the first client does not pay for cold caches."""
    import torch

    for index in cloud:
        if parts[index].has_embed:
            continue
        scratch = parts[index].clone()
        scratch(torch.zeros(1, 4, hidden_size))
        scratch(torch.zeros(1, 1, hidden_size))
        if scratch.device.type == "cuda":
            torch.cuda.synchronize(scratch.device)


def default_token_file() -> Path:
    return cache_root() / "token"


def token_for_server(token_file: Path | None) -> tuple[str, Path]:
    """The token from `token_file`, or the default token file's (created with a fresh token if missing)."""
    if token_file is not None:
        return read_token(token_file), token_file
    path = default_token_file()
    if not path.is_file():
        write_token(path, new_token())
    return read_token(path), path


def tls_for_server(cert: Path | None, key: Path | None):
    """(ssl context, cert path, fingerprint): the given pair, or a self-signed localhost pair in the cache."""
    if (cert is None) != (key is None):
        raise ConfigError("give both --tls-cert and --tls-key, or neither (a self-signed localhost certificate is made)")
    if cert is None:
        cert, key = cache_root() / "tls" / "localhost.pem", cache_root() / "tls" / "localhost.key"
        if not (cert.is_file() and key.is_file()) or certificate_expires_within(cert, days=1):
            print(f"splitveil serve: generating a self-signed certificate for localhost in {cert.parent}", file=sys.stderr)
            generate_self_signed(cert, key)
    for path in (cert, key):
        if not Path(path).is_file():
            raise ConfigError(f"no such file: {path}")
    return server_context(cert, key), cert, fingerprint_pem(cert)


def build_classifier_service(model, cut: int, *, example, info: dict | None = None, max_sessions: int = 64,
                             max_frame_bytes: int = MAX_FRAME_BYTES, max_batch: int = 64,
                             max_tokens: int = 1 << 40) -> PartService:
    """Serves the cloud part of a `SequentialSplittable` classifier split at `cut` (edge | cloud).

    The served part runs on copies of the cloud's segments only. Its FORWARD frames must carry features of exactly
    the shape the edge produces for `example` (one input, as the edge takes it: an image batch of one, or a pair
    (images, salts) for a salted model); a session may classify `max_tokens` rows in all, `max_batch` per frame.
    """
    import copy
    import math

    import torch

    from splitveil.models.sequential import SequentialSplittable
    from splitveil.plan.plan import SplitPlan

    edge, cloud = apply(model, SplitPlan.two_way(cut))
    with torch.no_grad():
        feature_shape = tuple(edge(example).shape[1:])
    segments = [copy.deepcopy(module) for module in cloud.modules()]
    served = SequentialSplittable(blocks=segments, name=f"{getattr(model, 'name', 'model')} cloud part").make_part(0, len(segments))
    served.name = f"blocks {cut}.. and head"  # what `splitveil serve` prints
    smallest = math.prod(feature_shape) * 4 + 28 + 4 * (1 + len(feature_shape))  # one fp32 row and its header
    if max_frame_bytes < smallest:
        raise ConfigError(f"--max-frame-bytes {max_frame_bytes} cannot carry one row of these features; use at least {smallest}")
    info = {"model": getattr(model, "name", "model"), "cuts": [cut], "placement": ["edge", "cloud"], **(info or {})}
    return PartService({1: served}, hidden_size=math.prod(feature_shape), info=info, max_sessions=max_sessions,
                       max_tokens=max_tokens, max_frame_bytes=max_frame_bytes, max_batch=max_batch, batch_steps=False,
                       max_kv_bytes=2**30, input_shapes={1: feature_shape})  # stateless parts: the budget stays unused
