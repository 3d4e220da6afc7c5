"""Batched decode steps of many sessions on the cloud's trunk: the gathering baseline against per-session buffers.

Both algorithms run in one process, step by step in turn, on the same trunk parts (SmolLM2, cuts 2,28), with N sessions
prefilled to lengths spread over `[min_length, max_length]`:

- `gather` (the algorithm before issue 12): every step copies each session's whole cache, left-padded, into one
  `[B, kv, Lmax, hd]` tensor per layer, runs with a padding mask, and leaves each session's cache as a view into
  the grown batch tensor (kept here, as `gather_batched_step`, only as the baseline).
- `buffered` (`causal_lm.forward_batched_step`): each session appends in place to its own buffers with spare
  capacity; attention runs on each session's own keys and values (long rows one call each, short rows in one
  transient padded call); no batch tensor outlives a step.

The figure of merit is aggregate decode steps/s (sessions / median seconds of one batched step) at 1, 16 and 64
sessions, and the KV memory each algorithm keeps alive after the steps (distinct storages, spare capacity included).
At one session both run plain single steps; they differ only in the cache (concatenation vs in-place append).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from splitveil.core import validate
from splitveil.core.errors import ConfigError
from splitveil.core.records import environment, save_figure, write_json
from splitveil.plan.plan import DEFAULT_LM_CUTS


@dataclass(frozen=True)
class BatchedBenchSpec:
    model: str = "smollm2-135m"
    cuts: tuple[int, int] = DEFAULT_LM_CUTS
    sessions: tuple[int, ...] = (1, 16, 64)
    min_length: int = 64  # prefilled positions of the shortest session
    max_length: int = 256  # ... and of the longest; the others spread evenly in between
    steps: int = 24  # batched steps measured per repeat
    warmup_steps: int = 2
    repeats: int = 3  # alternating repeats per algorithm and session count
    seed: int = 0
    algorithms: tuple[str, ...] = field(default=("gather", "buffered"))

    def __post_init__(self):
        """Refuses, with one line, what no run could do."""
        validate.lambda_cuts(self.cuts)
        validate.at_least(self, 1, "sessions", "min_length", "steps", "repeats")
        validate.at_least(self, 0, "warmup_steps", "seed")
        if self.max_length < self.min_length:
            raise ConfigError(f"max_length {self.max_length} is below min_length {self.min_length}")
        validate.one_of(self, "algorithms", ("gather", "buffered"))


def _legacy_cache(config, first_layer: int, num_layers: int):
    """The part cache before issue 12: a transformers DynamicCache sliced to the part's layers."""
    from transformers import DynamicCache

    class LegacyPartCache(DynamicCache):
        def __init__(self):
            super().__init__(config=config)
            self.layers = self.layers[first_layer : first_layer + num_layers]
            self.first_layer = first_layer

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(key_states, value_states, layer_idx - self.first_layer, *args, **kwargs)

    return LegacyPartCache()


def gather_batched_step(parts, hidden):
    """The baseline: one decode step of many sessions by gathering their caches, left-padded, into one batch cache.

    Args:
        parts: the sessions' trunk parts, whose caches are `_legacy_cache` caches.
        hidden: [B, 1, H].

    Returns:
        [B, 1, H] hidden states.
    """
    import torch

    first = parts[0]
    batch, lengths = len(parts), [p.seq_len for p in parts]
    longest = max(lengths)
    batch_cache = _legacy_cache(first.owner.config, first.first_layer, first.num_layers)
    for slot in range(first.num_layers):
        sample = parts[0].cache.layers[slot]
        keys = sample.keys.new_zeros(batch, sample.keys.shape[1], longest, sample.keys.shape[3])
        values = torch.zeros_like(keys)
        for row, part in enumerate(parts):
            keys[row, :, longest - part.seq_len:] = part.cache.layers[slot].keys[0]
            values[row, :, longest - part.seq_len:] = part.cache.layers[slot].values[0]
        layer = batch_cache.layers[slot]
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    mask = torch.zeros(batch, longest + 1, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, longest - length:] = 1
    first._inject.incoming = hidden
    try:
        output = first._view(inputs_embeds=hidden, attention_mask=mask, past_key_values=batch_cache, use_cache=True,
                             position_ids=torch.tensor(lengths, dtype=torch.long).unsqueeze(1))
    finally:
        first._inject.incoming = None
    for row, part in enumerate(parts):
        keep = longest - lengths[row]
        for slot in range(part.num_layers):
            grown, own = batch_cache.layers[slot], part.cache.layers[slot]
            own.keys, own.values = grown.keys[row : row + 1, :, keep:], grown.values[row : row + 1, :, keep:]
        part.seq_len += 1
    return output.last_hidden_state


def _kv_bytes(parts) -> int:
    """Bytes of the distinct storages every session's cache keeps alive (a shared batch tensor counted once)."""
    storages = {}
    for part in parts:
        for layer in part.cache.layers:
            for tensor in vars(layer).values():
                if hasattr(tensor, "untyped_storage"):
                    storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def _make_sessions(trunk, count: int, spec: BatchedBenchSpec, algorithm: str):
    """`count` clones of the trunk, each prefilled with random hidden states of its own length."""
    import torch

    generator = torch.Generator().manual_seed(spec.seed)
    sessions = []
    for index in range(count):
        part = trunk.clone()
        if algorithm == "gather":
            part.cache = _legacy_cache(part.owner.config, part.first_layer, part.num_layers)
        span = spec.max_length - spec.min_length
        length = spec.min_length + (span * index // max(count - 1, 1) if count > 1 else span // 2)
        part(torch.randn(1, length, part.owner.hidden_size, generator=generator))
        sessions.append(part)
    return sessions


def _step(sessions, hidden, algorithm: str) -> float:
    """Seconds of one decode step of every session (a plain step for one session, as the service runs it)."""
    from splitveil.models.causal_lm import forward_batched_step

    started = time.perf_counter()
    if len(sessions) == 1:
        sessions[0](hidden)
    elif algorithm == "gather":
        gather_batched_step(sessions, hidden)
    else:
        forward_batched_step(sessions, hidden)
    return time.perf_counter() - started


def _time_interleaved(sessions: dict, spec: BatchedBenchSpec) -> dict:
    """Steps of every algorithm's sessions in turn (so that machine noise hits them alike); seconds per step."""
    import torch

    generator = torch.Generator().manual_seed(spec.seed + 1)
    count = len(next(iter(sessions.values())))
    hidden_size = next(iter(sessions.values()))[0].owner.hidden_size
    seconds: dict[str, list[float]] = {algorithm: [] for algorithm in sessions}
    with torch.inference_mode():
        for index in range(spec.warmup_steps + spec.steps):
            hidden = torch.randn(count, 1, hidden_size, generator=generator)
            for algorithm, parts in sessions.items():
                elapsed = _step(parts, hidden, algorithm)
                if index >= spec.warmup_steps:
                    seconds[algorithm].append(elapsed)
    return seconds


def run_batched_bench(spec: BatchedBenchSpec, *, progress=None) -> dict:
    """Runs the benchmark and returns its record (spec, environment, per-run figures, summary)."""
    from splitveil.models.causal_lm import CausalLMSplittable
    from splitveil.models.loading import load_causal_lm
    from splitveil.plan.plan import SplitPlan, apply

    model, _ = load_causal_lm(spec.model)
    trunk = apply(CausalLMSplittable(model), SplitPlan.from_cuts(spec.cuts))[1]
    runs: list[dict] = []
    for count in spec.sessions:
        for repeat in range(spec.repeats):
            if progress is not None:
                progress(f"{count} sessions, repeat {repeat + 1}/{spec.repeats}")
            sessions = {algorithm: _make_sessions(trunk, count, spec, algorithm) for algorithm in spec.algorithms}
            seconds = _time_interleaved(sessions, spec)
            for algorithm, parts in sessions.items():
                runs.append({"algorithm": algorithm, "sessions": count, "repeat": repeat,
                             "step_seconds": seconds[algorithm],
                             "kv_bytes": _kv_bytes(parts), "own_positions": sum(p.seq_len for p in parts)})
            del sessions
    layer = trunk.owner.config
    head_dim = getattr(layer, "head_dim", None) or layer.hidden_size // layer.num_attention_heads
    per_position = trunk.num_layers * 2 * layer.num_key_value_heads * head_dim * 4  # keys and values, fp32
    return {"benchmark": "batched-decode", "spec": asdict(spec), "environment": environment(), "runs": runs,
            "kv_bytes_per_position": per_position, "summary": _summarise(runs, spec)}


def _summarise(runs: list[dict], spec: BatchedBenchSpec) -> dict:
    """Per session count and algorithm: aggregate steps/s from the median step time over all repeats, KV memory."""
    summary: dict = {}
    for count in spec.sessions:
        row = {}
        for algorithm in spec.algorithms:
            mine = [r for r in runs if r["sessions"] == count and r["algorithm"] == algorithm]
            step = statistics.median(t for r in mine for t in r["step_seconds"])
            row[algorithm] = {"median_step_ms": 1000 * step, "steps_per_second": count / step,
                              "kv_megabytes_after": statistics.median(r["kv_bytes"] for r in mine) / 2**20,
                              "own_positions_after": mine[0]["own_positions"]}
        if {"gather", "buffered"} <= set(row):
            row["speedup"] = row["buffered"]["steps_per_second"] / row["gather"]["steps_per_second"]
        summary[str(count)] = row
    return summary


def plot_batched_bench(record: dict, path: Path) -> Path:
    """Two panels: aggregate decode steps/s and KV memory kept alive, against the number of sessions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, spec = record["summary"], record["spec"]
    counts = [int(c) for c in summary]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for algorithm, color in zip(spec["algorithms"], ("#888888", "#3b7dd8")):
        rates = [summary[str(c)][algorithm]["steps_per_second"] for c in counts]
        left.plot(counts, rates, marker="o", color=color, label=algorithm)
        for count, rate in zip(counts, rates):
            left.annotate(f"{rate:.1f}", (count, rate), textcoords="offset points", xytext=(0, 6), ha="center",
                          fontsize=8)
        right.plot(counts, [summary[str(c)][algorithm]["kv_megabytes_after"] for c in counts], marker="o", color=color,
                   label=algorithm)
    if "kv_bytes_per_position" in record:
        per_position = record["kv_bytes_per_position"]
        needed = [summary[str(c)]["buffered"]["own_positions_after"] * per_position / 2**20 for c in counts]
        right.plot(counts, needed, linestyle=":", color="black", label="the sessions' own positions")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts, [str(c) for c in counts])
    left.set_xlabel("concurrent sessions")
    left.set_ylabel("aggregate decode steps/s (sessions / median step)")
    left.set_title(f"{spec['model']} trunk, cuts {tuple(spec['cuts'])}, "
                   f"{record['environment'].get('torch_threads', 1)} thread, "
                   f"prefill {spec['min_length']}-{spec['max_length']}")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    right.set_xlabel("concurrent sessions")
    right.set_ylabel("KV memory kept alive after the steps, MiB")
    right.set_title("gather: every session keeps the batch tensor alive")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    return save_figure(fig, path)


def save_batched_bench(record: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    return write_json(out_dir / f"{stem}.json", record), plot_batched_bench(record, out_dir / f"{stem}.png")
