"""Concurrent streams through the OpenAI edge: `splitveil bench edge`.

A `splitveil serve` child process runs the trunk; a `splitveil edge --server` child process serves the OpenAI API in
front of it (head and tail there, one lane per concurrent request, each with its own trunk session: the server
batches their decode steps). Clients are threads of this process using the official `openai` package, streaming
greedy chat completions. For each concurrency level, one round warms the edge's lanes up, then a measured round:
every stream sends one request at the same moment. Reported: total generated tokens per second (all tokens over
the round's wall time), per-stream tokens per second, and time to first token (first content chunk).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from splitveil.core.errors import ConfigError
from splitveil.core.records import environment, save_figure, write_json
from splitveil.core.validate import at_least

QUESTIONS = ["What is a good way to learn a new language?", "Name three uses of a paperclip.",
             "Why is the sky blue?", "Give me a tip for cooking rice.", "What makes a good friend?",
             "How do plants grow?", "Describe a calm morning.", "What is the moon made of?"]


@dataclass(frozen=True)
class EdgeBenchSpec:
    model: str = "smollm2-135m"
    split: tuple[int, int] = (2, 28)
    streams: tuple[int, ...] = (1, 8, 32)
    max_tokens: int = 32
    rounds: int = 3  # measured rounds per level, the levels alternating; each level's figures are the median round's
    timeout: float = 900.0

    def __post_init__(self):
        at_least(self, 1, "max_tokens", "rounds")
        if not self.streams or any(n < 1 for n in self.streams):
            raise ConfigError("streams must be positive counts of concurrent streams")
        if 1 not in self.streams:
            raise ConfigError("--streams must include 1: every figure is compared with one stream's")


class EdgeProcess:
    """`splitveil edge --server URL` as a child process on 127.0.0.1 with a fresh API key file."""

    def __init__(self, server, spec: EdgeBenchSpec, concurrency: int):
        self.server, self.spec, self.concurrency = server, spec, concurrency

    def __enter__(self) -> "EdgeProcess":
        from splitveil.serve.process import free_port

        self.folder = Path(tempfile.mkdtemp(prefix="splitveil-edge-bench-"))
        self.port = free_port()
        key_file = self.folder / "api-key"
        command = [sys.executable, "-m", "splitveil.cli.main", "edge", "--server", self.server.url, "--ca",
                   str(self.server.cert), "--token-file", str(self.server.token_file), "--model", self.spec.model,
                   "--split", ",".join(map(str, self.spec.split)), "--port", str(self.port), "--api-key-file",
                   str(key_file), "--concurrency", str(self.concurrency), "--max-pending", str(2 * self.concurrency + 8)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 180
        lines = []
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if "OpenAI API on" in line:
                threading.Thread(target=self.process.stdout.read, daemon=True).start()  # keep the pipe drained
                self.api_key = key_file.read_text().strip()
                return self
        self.__exit__(None, None, None)
        raise ConfigError(f"the edge did not start: {lines[-1] if lines else 'no output'}")

    def __exit__(self, *exc) -> None:
        from splitveil.serve.process import stop_process

        stop_process(self.process)


def _round(base_url: str, api_key: str, streams: int, spec: EdgeBenchSpec) -> dict:
    from openai import OpenAI

    results: list[dict | None] = [None] * streams
    barrier = threading.Barrier(streams)

    def one(index: int) -> None:
        client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=spec.timeout)
        barrier.wait()
        started = time.perf_counter()
        first = None
        tokens = None
        for chunk in client.chat.completions.create(
                model=spec.model, messages=[{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
                max_tokens=spec.max_tokens, temperature=0, stream=True):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
            extra = (chunk.model_extra or {}).get("splitveil")
            if extra:
                tokens = len(extra["token_ids"])
        ended = time.perf_counter()
        results[index] = {"started": started, "first_token": first, "ended": ended, "tokens": tokens}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(spec.timeout)
    if any(r is None or r["tokens"] is None for r in results):
        raise ConfigError(f"a stream of the {streams}-stream round failed or did not report its tokens")
    start, end = min(r["started"] for r in results), max(r["ended"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    per_stream = [r["tokens"] / (r["ended"] - r["started"]) for r in results]
    ttft = [r["first_token"] - r["started"] for r in results if r["first_token"] is not None]
    return {"streams": streams, "tokens": tokens, "seconds": end - start, "total_tokens_per_second": tokens / (end - start),
            "per_stream_tokens_per_second_median": statistics.median(per_stream),
            "per_stream_tokens_per_second_min": min(per_stream),
            "ttft_seconds_median": statistics.median(ttft) if ttft else None,
            "ttft_seconds_max": max(ttft) if ttft else None}


def run_edge_bench(spec: EdgeBenchSpec, *, progress=None) -> dict:
    from splitveil.serve.process import ServerProcess

    measured: dict[int, list[dict]] = {streams: [] for streams in spec.streams}
    with ServerProcess(spec.model, spec.split) as server, EdgeProcess(server, spec, max(spec.streams)) as edge:
        base_url = f"http://127.0.0.1:{edge.port}/v1"
        for streams in spec.streams:
            if progress is not None:
                progress(f"{streams} stream(s): warming the edge's lanes up")
            _round(base_url, edge.api_key, streams, spec)
        for index in range(spec.rounds):  # the levels alternate, so a slow spell of the machine hits them alike
            for streams in spec.streams:
                if progress is not None:
                    progress(f"{streams} stream(s): measuring, round {index + 1}/{spec.rounds}")
                measured[streams].append(_round(base_url, edge.api_key, streams, spec))
    rows = []
    for streams, rounds in measured.items():
        median = sorted(rounds, key=lambda r: r["total_tokens_per_second"])[(len(rounds) - 1) // 2]
        rows.append({**median, "rounds_total_tokens_per_second": [r["total_tokens_per_second"] for r in rounds]})
    one = next((r for r in rows if r["streams"] == 1), None)
    for row in rows:
        row["total_speedup_over_one_stream"] = row["total_tokens_per_second"] / one["total_tokens_per_second"] if one else None
    eight = next((r for r in rows if r["streams"] == 8), None)
    return {"benchmark": "edge", "spec": asdict(spec), "environment": environment(), "rows": rows,
            "target": {"streams": 8, "total_speedup": eight["total_speedup_over_one_stream"] if eight and one else None,
                       "met": bool(eight and one and eight["total_speedup_over_one_stream"] >= 3.0)},
            "note": "serve and edge are child processes on this machine; clients are threads using the openai package "
                    "(streaming, greedy); one warm-up round per concurrency level, then `rounds` measured rounds with the levels "
                    "alternating; each row is the level's median round (every round's total tokens/s listed beside it)"}


def plot_edge_bench(record: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    streams = [r["streams"] for r in rows]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(streams, [r["total_tokens_per_second"] for r in rows], "-o")
    axes[0].set_title("total tokens / s", fontsize=9)
    axes[1].plot(streams, [r["per_stream_tokens_per_second_median"] for r in rows], "-o")
    axes[1].set_title("tokens / s per stream (median)", fontsize=9)
    axes[2].plot(streams, [r["ttft_seconds_median"] for r in rows], "-o")
    axes[2].set_title("time to first token, s (median)", fontsize=9)
    for axis in axes:
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent streams")
        axis.grid(alpha=0.3)
    figure.suptitle(f"OpenAI edge in front of `splitveil serve` ({record['spec']['model']}, split "
                    f"{','.join(map(str, record['spec']['split']))})", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def save_edge_bench(record: dict, out_dir: Path) -> tuple[Path, Path]:
    stem = f"edge_{record['spec']['model']}_split-{'-'.join(map(str, record['spec']['split']))}_cpu-1thread"
    return write_json(out_dir / f"{stem}.json", record), plot_edge_bench(record, out_dir / f"{stem}.png")
