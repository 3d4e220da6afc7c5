"""Runtime glue: a protected model from a registered name (decompositions cached), the executor as a child process
on 127.0.0.1 over TLS, and one generation through it with its figures."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from splitveil.protect.slip.trusted import SlipConfig, SlipModel
from splitveil.serve.process import ChildServer

CACHE_VERSION = 1
MAX_PREFILL_ROWS = 512  # mask pairs per group made before a generation starts


def slip_cache_dir(model_name: str, config: SlipConfig, *, load_format: str = "auto") -> Path:
    """The model owner's cache of (model, config): the decomposition, and in `residual/` the executor's bundle."""
    from splitveil.models.loading import cache_root, config_digest

    key = {"v": CACHE_VERSION, "model": config_digest(model_name, load_format=load_format), "rank": config.rank,
           "energy": config.energy,
           "layers": config.layers, "head": config.include_head,
           **({"mask_rank": config.mask_rank} if config.mask_rank else {}),  # (plain caches keep their key)
           **({"fuse": True} if config.fuse else {})}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root() / "slip" / digest


def protect_registered(model_name: str, config: SlipConfig, *, generator=None, with_tokenizer: bool = True):
    """Loads `model_name`, protects it with `config`, and makes sure the executor's residual bundle exists.

    Returns:
        (slip model, tokenizer, the residual-only bundle folder to serve (`bundle.RESIDUAL_DIR` of the cache, never
        the cache folder itself, which holds the decomposition), seconds spent decomposing (0 when cached)).
    """
    from splitveil.models.loading import load_causal_lm
    from splitveil.protect.slip.bundle import RESIDUAL_DIR, has_bundle, load_decompositions, save_decompositions
    from splitveil.protect.slip.decompose import causal_lm_groups

    model, tokenizer = load_causal_lm(model_name, with_tokenizer=with_tokenizer)
    folder = slip_cache_dir(model_name, config)
    start, stop = config.layers if config.layers is not None else (0, model.config.num_hidden_layers)
    groups = [g for g, _ in causal_lm_groups(model, layers=range(start, stop), include_head=config.include_head)]
    cached = load_decompositions(folder, groups)
    started = time.perf_counter()
    slip = SlipModel(model, config, decompositions=cached, generator=generator)
    seconds = 0.0 if cached is not None else time.perf_counter() - started
    if cached is None:
        partial = folder.with_name(folder.name + f".tmp{os.getpid()}")
        save_decompositions(partial, slip.decompositions)
        _write_residual(partial / RESIDUAL_DIR, slip, model_name)
        _publish(partial, folder)
    bundle = folder / RESIDUAL_DIR
    if not has_bundle(bundle):
        # a cache made before the bundle had a folder of its own
        partial = folder / f"{RESIDUAL_DIR}.tmp{os.getpid()}"
        _write_residual(partial, slip, model_name)
        _publish(partial, bundle)
    return slip, tokenizer, bundle, seconds


def cached_bundle(model_name: str, config: SlipConfig) -> Path:
    """The residual-only bundle folder of (model, config) in the owner's cache, made (decomposing once) if missing."""
    from splitveil.protect.slip.bundle import RESIDUAL_DIR, has_bundle

    bundle = slip_cache_dir(model_name, config) / RESIDUAL_DIR
    if not has_bundle(bundle):
        bundle = protect_registered(model_name, config, with_tokenizer=False)[2]
    return bundle


def export_bundle(model_name: str, config, out: Path, *, dealt: bool = False) -> dict:
    """Writes the executor's residual-only bundle of (`model_name`, `config`) into `out` (decomposing the model
    once, into the owner's cache, when it is not cached) and checks it. With `dealt`, the public-weights bundle a
    device with a mask dealer uses (`ensure_bundle`: W itself, the head per `config.include_head`, fused groups per
    `config.fuse`), which both the executor and the dealer serve. Returns the bundle's manifest."""
    import shutil

    from splitveil.core.errors import ConfigError
    from splitveil.protect.slip.bundle import BUNDLE_FILES, check_residual_only

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        try:
            check_residual_only(out)  # writing over an earlier bundle is fine; over anything else it is not
        except ConfigError:
            raise ConfigError(f"{out} exists and is not an empty folder or a residual bundle: give a new folder") from None
    source = ensure_bundle(model_name, config) if dealt else cached_bundle(model_name, config)
    out.mkdir(parents=True, exist_ok=True)
    for name in BUNDLE_FILES:
        shutil.copyfile(source / name, out / name)
    check_residual_only(out)
    return json.loads((out / "manifest.json").read_text())


def _write_residual(folder: Path, slip: SlipModel, model_name: str) -> None:
    import shutil

    from splitveil.protect.slip.executor import save_residual

    shutil.rmtree(folder, ignore_errors=True)  # what a crashed run of this process id left
    save_residual(folder, slip.groups, slip.residual_weights(), model=model_name, fixed_point=slip.config.fixed_point)


def _publish(partial: Path, final: Path) -> None:
    """Renames a finished folder into place; another process that got there first keeps theirs."""
    import shutil

    if final.exists():
        shutil.rmtree(partial, ignore_errors=True)
        return
    try:
        partial.rename(final)
    except OSError:  # lost a race
        shutil.rmtree(partial, ignore_errors=True)


class FrameLog:
    """Appends every frame an executor receives to a file (4-byte length, then the frame): its whole view."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "ab")

    def append(self, data: bytes) -> None:
        self._file.write(struct.pack("<I", len(data)) + bytes(data))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_frame_log(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    frames, offset = [], 0
    while offset + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, offset)
        frames.append(data[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return frames


@dataclass
class ExecutorProcess(ChildServer):
    """`splitveil slip serve` as a child process on 127.0.0.1 with a fresh certificate and token
    (`serve.process.ChildServer`, as `ServerProcess`; only the command differs)."""

    bundle: Path
    mode: str
    log_frames: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    startup_timeout: float = 180.0
    prefix = "splitveil-slip-"
    log_name = "executor.log"
    what = "the SLIP executor"

    def _command_args(self) -> tuple[list[str], list[str]]:
        head = ["slip", "serve", "--bundle", str(self.bundle), "--mode", self.mode]
        tail = list(self.extra_args)
        if self.log_frames is not None:
            tail += ["--log-frames", str(self.log_frames)]
        return head, tail

    def __enter__(self) -> "ExecutorProcess":
        return super().__enter__()


def connect_client(url: str, *, token: str, mode: str, residual_sha256: str | None, groups: int,
                   ca_file: Path | None = None, pin_sha256: str | None = None):
    """A `SlipClient` over TLS WebSockets to the executor at `url`, checking its mode and residual."""
    from splitveil.protect.slip.client import SlipClient
    from splitveil.transport.network import WebSocketTransport

    transport = WebSocketTransport(url, token=token, ca_file=ca_file, pin_sha256=pin_sha256)
    expect = {"mode": mode, "groups": groups}
    if residual_sha256 is not None:
        expect["residual_sha256"] = residual_sha256
    client = SlipClient(transport, expect=expect)
    client.open()
    return client, transport


def run_generation(slip: SlipModel, tokenizer, client, transport, prompt: str, *, max_new_tokens: int,
                   chat: bool = False, fill_rows: int | None = None, prompt_ids: list[int] | None = None,
                   ignore_eos: bool = False) -> dict:
    """Generates greedily through the protected model; returns the result and its figures.

    The mask pools are filled before the clock starts (offline work), for `fill_rows` rows per group (default:
    every position the run can take, prompt + max_new_tokens, at most `MAX_PREFILL_ROWS`: a pair costs 8 (n + m)
    bytes, 2.4 MB per position over SmolLM2's 121 groups; beyond that the pools refill during the run and the
    result counts those refills)."""
    from splitveil.edge.generate import GenerationConfig, SplitCausalLM

    runner = SplitCausalLM(slip.model, None, tokenizer=tokenizer, transport=transport)
    if prompt_ids is None:
        prompt_ids = runner.encode_prompt(prompt, chat=chat)
    offline_before = slip.offline_seconds
    pad = slip.config.pad_to
    prompt_rows = -(-len(prompt_ids) // pad) * pad  # what the executor sees of the prompt (`SlipConfig.pad_to`)
    slip.fill_pools(fill_rows if fill_rows is not None else min(prompt_rows + max_new_tokens, MAX_PREFILL_ROWS))
    slip.attach(client)
    trips: list[int] = []  # round trips of each forward (prefill, then one per decode step)
    forward = runner.step

    def counted_step(input_ids):
        before_step = transport.stats.round_trips
        logits = forward(input_ids)
        trips.append(transport.stats.round_trips - before_step)
        return logits

    runner.step = counted_step
    before = transport.stats.snapshot()
    cost_before = slip.cost.to_dict()
    refills_before = sum(r.pool.refills_during_use for r in slip.runtimes)
    checks_before = _checks(slip)
    eos = () if tokenizer is None or ignore_eos else None  # without a tokenizer (token-id prompts): run to the length
    result = runner.generate(prompt_ids, GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=eos))
    moved = transport.stats.since(before)
    checks = _checks(slip)
    cost = {key: value - cost_before[key] for key, value in slip.cost.to_dict().items() if isinstance(value, int)}
    trusted = sum(cost[key] for key in ("secure_linear_flops", "check_flops", "mask_flops", "local_linear_flops", "other_flops"))
    untrusted = cost["untrusted_flops"]
    steps = trips[1:]
    return {
        "token_ids": result.token_ids,
        "text": result.text,
        **result.cost_fields(),
        "weight_bytes_resident": result.weight_bytes_resident + slip.held_weight_bytes(),
        "prompt_tokens": len(prompt_ids),
        "prompt_rows_seen_by_executor": prompt_rows,
        "finish_reason": result.finish_reason,
        "round_trips": moved.round_trips,
        "round_trips_prefill": trips[0] if trips else 0,
        "round_trips_per_decode_step": (sum(steps) / len(steps)) if steps else None,
        "bytes_up": moved.bytes_up,
        "bytes_down": moved.bytes_down,
        "online_seconds": round(result.seconds, 6),
        "prefill_seconds": round(result.prefill_seconds, 6),
        "decode_seconds": round(result.decode_seconds, 6),
        "decode_tokens_per_second": round(len(steps) / result.decode_seconds, 3) if steps and result.decode_seconds > 0 else None,
        "offline_seconds": round(slip.offline_seconds - offline_before, 6),
        "pool_refills_during_generation": sum(r.pool.refills_during_use for r in slip.runtimes) - refills_before,
        "secure_flops_share": trusted / (trusted + untrusted) if trusted + untrusted else 0.0,
        "freivalds_soundness_bits": slip.soundness_bits(),  # a wrong reply passed with probability <= 2^-bits
        "freivalds_vectors_per_product": round((checks[0] - checks_before[0]) / (checks[1] - checks_before[1]), 3)
        if checks[1] > checks_before[1] else None,
        "trusted_flops": trusted,
        "untrusted_flops": untrusted,
        "unprotected_flops": untrusted + cost["local_linear_flops"] + cost["other_flops"],
        "flops": cost,
    }


def _checks(slip: SlipModel) -> tuple[int, int]:
    """(check vectors used, products checked) so far, over every group."""
    return (sum(r.check.vectors_used for r in slip.runtimes), sum(r.check.products for r in slip.runtimes))


@dataclass
class DealerProcess(ChildServer):
    """`splitveil slip dealer` as a child process on 127.0.0.1 with a fresh certificate and token."""

    bundle: Path
    startup_timeout: float = 180.0
    prefix = "splitveil-dealer-"
    log_name = "dealer.log"
    what = "the SLIP mask dealer"

    def _command_args(self) -> tuple[list[str], list[str]]:
        return ["slip", "dealer", "--bundle", str(self.bundle)], []

    def __enter__(self) -> "DealerProcess":
        return super().__enter__()


def ensure_bundle(model_name: str, config: SlipConfig, *, load_format: str = "auto") -> Path:
    """The public-weights bundle (secure rank 0: W_residual is W) of (model, config) in the owner's cache, written
    in a child process when missing: a device that holds no linear weight must never load them, not even once to
    write the servers' bundle."""
    import subprocess
    import sys

    from splitveil.core.errors import ConfigError
    from splitveil.protect.slip.bundle import RESIDUAL_DIR, has_bundle

    if config.rank or config.energy:
        raise ConfigError("a dealer deals for the public weights: the bundle has secure rank 0")
    bundle = slip_cache_dir(model_name, config, load_format=load_format) / RESIDUAL_DIR
    if has_bundle(bundle):
        return bundle
    code = ("import sys, json; from splitveil.protect.slip.runtime import write_public_bundle; "
            "c = json.loads(sys.argv[2]); write_public_bundle(sys.argv[1], tuple(c['layers']), c['include_head'], "
            "c['load_format'], fuse=c['fuse'])")
    done = subprocess.run([sys.executable, "-c", code, model_name, json.dumps(
        {"layers": list(config.layers), "include_head": config.include_head, "load_format": load_format,
         "fuse": config.fuse})],
        capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise ConfigError(f"could not write the public-weights bundle of {model_name}: {lines[-1] if lines else done.returncode}")
    return bundle


def write_public_bundle(model_name: str, layers: tuple[int, int], include_head: bool, load_format: str = "auto", *,
                        fuse: bool = False) -> Path:
    """Writes the bundle of the public weights of `layers` (and the LM head) into the owner's cache: each group's
    matrices read from the checkpoint (no model is built with its weights), W_residual = W; with `fuse`, the fused
    groups' matrices (`fused.py`)."""
    import shutil

    from splitveil.plan.parts import Checkpoint, empty_causal_lm
    from splitveil.protect.slip.bundle import RESIDUAL_DIR
    from splitveil.protect.slip.executor import save_residual

    config = SlipConfig(mode="fixed", rank=0, layers=layers, include_head=include_head, fuse=fuse)
    folder = slip_cache_dir(model_name, config, load_format=load_format) / RESIDUAL_DIR
    model, model_dir = empty_causal_lm(model_name, load_format=load_format)
    groups, sources = dealt_groups(model, config)
    checkpoint = Checkpoint(model_dir, model)
    weights = {group.group_id: source(checkpoint) for group, source in zip(groups, sources)}
    partial = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    save_residual(partial, groups, weights, model=model_name, fixed_point=config.fixed_point)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _publish(partial, folder)
    return folder


def dealt_groups(model, config: SlipConfig) -> tuple[list, list]:
    """(groups, their matrix sources) the executor and the dealer serve for a dealt device: the fused groups with
    `config.fuse`, else one group per set of linear maps that read the same input. `model` may hold meta weights."""
    from splitveil.protect.slip.decompose import causal_lm_groups
    from splitveil.protect.slip.fused import fused_groups
    from splitveil.protect.slip.keys import member_sources

    layers = range(*config.layers) if config.layers is not None else range(model.config.num_hidden_layers)
    if config.fuse:
        found = fused_groups(model, layers, config.include_head)
        return [group for group, _ in found], [source for _, source in found]
    found = causal_lm_groups(model, layers=layers, include_head=config.include_head)
    return [group for group, _ in found], member_sources(model, found)


def connect_dealer(url: str, *, token: str, widths: list[tuple[int, int]], residual_sha256: str,
                   ca_file: Path | None = None, pin_sha256: str | None = None):
    """A `DealerClient` over TLS WebSockets to the dealer at `url`, checking it deals for the same weights."""
    from splitveil.protect.slip.dealer import DealerClient
    from splitveil.transport.network import WebSocketTransport

    transport = WebSocketTransport(url, token=token, ca_file=ca_file, pin_sha256=pin_sha256)
    return DealerClient(transport, widths=widths, expect={"residual_sha256": residual_sha256}), transport
