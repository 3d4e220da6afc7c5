"""The cloud service, measured in one run on this machine.

1. Decode tokens/s: unsplit, in-process Λ-split, Λ-split with the trunk in a `splitveil serve` process over TLS
   (runs alternate; medians).
2. Round-trip overhead per decode step: our protocol (TLS WebSocket, frames, sessions, scheduler) with a part that
   computes nothing, against a raw asyncio TCP echo of the same bytes.
3. Aggregate trunk decode steps/s served to 1, 4 and 16 concurrent light clients (they send hidden states and do
   no model compute, so that client compute does not hide the server), with batching on and off.
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from splitveil.core import validate
from splitveil.core.records import environment, save_figure, write_json
from splitveil.plan.plan import DEFAULT_LM_CUTS
from splitveil.serve.process import stop_process


@dataclass(frozen=True)
class ServiceBenchSpec:
    model: str = "smollm2-135m"
    cuts: tuple[int, int] = DEFAULT_LM_CUTS
    tokens: int = 128  # new tokens per generation run
    repeats: int = 3  # generation runs per variant
    prompt: str = "Explain in detail how a refrigerator works."
    rtt_samples: int = 400  # round trips per echo measurement
    sessions: tuple[int, ...] = (1, 4, 16)
    window_seconds: float = 8.0  # measuring window per concurrency level
    warmup_seconds: float = 2.0

    def __post_init__(self):
        """Refuses, with one line, what no run could do."""
        validate.lambda_cuts(self.cuts)
        validate.at_least(self, 1, "tokens", "repeats", "rtt_samples", "sessions")
        validate.at_least(self, 0, "warmup_seconds")
        validate.positive(self, "window_seconds")


def _note(progress, message: str) -> None:
    if progress is not None:
        progress(message)


def measure_throughput(spec: ServiceBenchSpec, progress=None) -> dict:
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.models.loading import load_causal_lm
    from splitveil.plan.plan import SplitPlan
    from splitveil.serve.process import ServerProcess

    model, tokenizer = load_causal_lm(spec.model)
    runs: dict[str, list[dict]] = {"unsplit": [], "split-inprocess": [], "split-tls": []}
    with ServerProcess(spec.model, spec.cuts) as server:
        variants = {
            "unsplit": SplitCausalLM(model, tokenizer=tokenizer),
            "split-inprocess": SplitCausalLM(model, SplitPlan.from_cuts(spec.cuts), tokenizer=tokenizer),
            "split-tls": SplitCausalLM.connect(server.url, token=server.token, model=spec.model, ca_file=server.cert,
                                               tokenizer=tokenizer),
        }
        for runner in variants.values():
            runner.generate(spec.prompt, max_new_tokens=4, eos_token_ids=())  # warm-up
        tokens = {}
        for repeat in range(spec.repeats):
            for name, runner in variants.items():
                _note(progress, f"throughput {name} run {repeat + 1}/{spec.repeats}")
                result = runner.generate(spec.prompt, max_new_tokens=spec.tokens, eos_token_ids=())
                tokens.setdefault(name, result.token_ids)
                up, down = result.bytes_per_decode_step
                runs[name].append({"decode_tokens_per_second": result.decode_tokens_per_second,
                                   "seconds": result.seconds, "prefill_seconds": result.prefill_seconds,
                                   "bytes_per_decode_step_up": up, "bytes_per_decode_step_down": down,
                                   "bytes_up": result.bytes_up, "bytes_down": result.bytes_down,
                                   "round_trips": result.round_trips})
        variants["split-tls"].close()
    medians = {n: statistics.median(r["decode_tokens_per_second"] for r in rs) for n, rs in runs.items()}
    return {
        "runs": runs,
        "summary": {n: {"median_decode_tokens_per_second": medians[n], "ratio_to_unsplit": medians[n] / medians["unsplit"],
                        "identical_tokens_to_unsplit": tokens[n] == tokens["unsplit"],
                        "bytes_per_token_up": runs[n][0]["bytes_per_decode_step_up"],
                        "bytes_per_token_down": runs[n][0]["bytes_per_decode_step_down"]} for n in runs},
    }


def _start(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    line = proc.stdout.readline()
    if "listening" not in line:
        proc.kill()
        raise RuntimeError(f"echo server did not start: {line.strip()}")
    # drain the rest: a pipe nobody reads blocks the child once 64 KiB of output fill it
    threading.Thread(target=proc.stdout.read, daemon=True, name="echo-server-output").start()
    return proc


def measure_round_trips(spec: ServiceBenchSpec, hidden: int, progress=None) -> dict:
    """Median and p90 round-trip time of one decode step's frame: ours vs raw TCP echo."""
    import torch

    from splitveil.serve.auth import new_token
    from splitveil.serve.process import free_port
    from splitveil.transport.tls import generate_self_signed
    from splitveil.transport.network import WebSocketTransport
    from splitveil.wire.frame import Frame, FrameKind, decode_frame, encode_frame

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        generate_self_signed(cert, key)
        token = new_token()
        port = free_port()
        _note(progress, "round trips: our protocol")
        proc = _start([sys.executable, "-m", "splitveil.experiments.echo_servers", "ours", str(port), str(cert), str(key), token, str(hidden)])
        try:
            transport = WebSocketTransport(f"wss://127.0.0.1:{port}", token=token, ca_file=cert)
            session = decode_frame(transport.request(encode_frame(Frame(FrameKind.OPEN)))).session
            hidden_state = torch.randn(1, 1, hidden)
            times = []
            for seq in range(spec.rtt_samples):
                started = time.perf_counter()
                reply = decode_frame(transport.request(encode_frame(Frame(FrameKind.FORWARD, hidden_state, session=session, seq=seq, part=1))))
                times.append(time.perf_counter() - started)
                assert reply.kind == FrameKind.RESULT
            frame_bytes = len(encode_frame(Frame(FrameKind.FORWARD, hidden_state, session=session, seq=0, part=1)))
            transport.close()
            results["ours_tls_websocket"] = times
        finally:
            stop_process(proc, 5)
        _note(progress, "round trips: raw asyncio TCP echo")
        port = free_port()
        proc = _start([sys.executable, "-m", "splitveil.experiments.echo_servers", "tcp", str(port)])
        try:
            payload = os.urandom(frame_bytes)
            times = []
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for _ in range(spec.rtt_samples):
                    started = time.perf_counter()
                    sock.sendall(struct.pack("<I", len(payload)) + payload)
                    need, got = len(payload) + 4, b""
                    while len(got) < need:
                        got += sock.recv(need - len(got))
                    times.append(time.perf_counter() - started)
            results["raw_tcp_echo"] = times
        finally:
            stop_process(proc, 5)

    def stats(values):
        ordered = sorted(values[10:])  # first round trips warm up
        return {"median_ms": 1000 * statistics.median(ordered), "p90_ms": 1000 * ordered[int(0.9 * len(ordered))]}

    summary = {name: stats(values) for name, values in results.items()}
    summary["frame_bytes"] = frame_bytes
    summary["overhead_ms"] = summary["ours_tls_websocket"]["median_ms"] - summary["raw_tcp_echo"]["median_ms"]
    return {"samples_ms": {k: [1000 * t for t in v] for k, v in results.items()}, "summary": summary}


def _light_client(url, token, cert, hidden, stop_at, warm_until, counts, index, errors):
    import torch

    from splitveil.transport.network import WebSocketTransport
    from splitveil.wire.frame import Frame, FrameKind, decode_frame, encode_frame

    try:
        transport = WebSocketTransport(url, token=token, ca_file=cert, timeout=120)
        session = decode_frame(transport.request(encode_frame(Frame(FrameKind.OPEN)))).session
        generator = torch.Generator().manual_seed(index)
        prefill = encode_frame(Frame(FrameKind.FORWARD, torch.randn(1, 16, hidden, generator=generator), session=session, seq=0, part=1))
        assert decode_frame(transport.request(prefill)).kind == FrameKind.RESULT
        step = torch.randn(1, 1, hidden, generator=generator)
        seq = 1
        while time.monotonic() < stop_at:
            reply = decode_frame(transport.request(encode_frame(Frame(FrameKind.FORWARD, step, session=session, seq=seq, part=1))))
            if reply.kind != FrameKind.RESULT:
                raise RuntimeError(reply.message)
            seq += 1
            if time.monotonic() >= warm_until:
                counts[index] += 1
        transport.close()
    except Exception as error:  # reported in the record
        errors.append(repr(error))


def measure_concurrency(spec: ServiceBenchSpec, hidden: int, progress=None) -> dict:
    from splitveil.serve.process import ServerProcess

    rows = []
    for batching in (True, False):
        extra = ["--max-sessions", str(max(spec.sessions) + 4)] + ([] if batching else ["--no-batch"])
        with ServerProcess(spec.model, spec.cuts, extra_args=extra) as server:
            for sessions in spec.sessions:
                _note(progress, f"concurrency: {sessions} session(s), batching {'on' if batching else 'off'}")
                start = time.monotonic() + 1.0
                warm_until, stop_at = start + spec.warmup_seconds, start + spec.warmup_seconds + spec.window_seconds
                counts, errors = [0] * sessions, []
                threads = [threading.Thread(target=_light_client, args=(server.url, server.token, server.cert, hidden, stop_at,
                                                                         warm_until, counts, i, errors)) for i in range(sessions)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                rows.append({"sessions": sessions, "batching": batching, "steps": sum(counts),
                             "steps_per_second": sum(counts) / spec.window_seconds,
                             "per_session_steps_per_second": [c / spec.window_seconds for c in counts], "errors": errors})
    single = {r["batching"]: r["steps_per_second"] for r in rows if r["sessions"] == 1}
    for row in rows:
        row["speedup_vs_one_session"] = row["steps_per_second"] / single[row["batching"]] if single[row["batching"]] else None
    return {"rows": rows}


def run_service_bench(spec: ServiceBenchSpec, *, progress=None, parts: tuple[str, ...] = ("throughput", "rtt", "concurrency")) -> dict:
    from transformers import AutoConfig

    from splitveil.models.loading import resolve_model_dir

    hidden = AutoConfig.from_pretrained(resolve_model_dir(spec.model)).hidden_size
    record = {"benchmark": "service", "spec": asdict(spec), "environment": environment()}
    if "throughput" in parts:
        record["throughput"] = measure_throughput(spec, progress)
    if "rtt" in parts:
        record["round_trip"] = measure_round_trips(spec, hidden, progress)
    if "concurrency" in parts:
        record["concurrency"] = measure_concurrency(spec, hidden, progress)
    return record


def plot_service_bench(record: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("throughput", "round_trip", "concurrency") if k in record]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, panel in zip(axes, panels):
        if panel == "throughput":
            summary = record["throughput"]["summary"]
            names = list(summary)
            values = [summary[n]["median_decode_tokens_per_second"] for n in names]
            bars = ax.bar(names, values, color=["#888888", "#3b7dd8", "#d8743b"])
            for bar, name in zip(bars, names):
                ax.annotate(f"{bar.get_height():.1f}\n{summary[name]['ratio_to_unsplit']:.3f}x",
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
            ax.set_ylim(0, max(values) * 1.3)
            ax.set_ylabel("decode tokens/s (median)")
            ax.set_title(f"{record['spec']['model']} Λ-split {tuple(record['spec']['cuts'])}, 1 thread/process")
        elif panel == "round_trip":
            samples = record["round_trip"]["samples_ms"]
            ax.boxplot([samples[k][10:] for k in samples], showfliers=False)
            ax.set_xticks(range(1, len(samples) + 1), [k.replace("_", " ") for k in samples], fontsize=8)
            ax.set_ylabel("round trip, ms")
            ax.set_title(f"one decode step's frame ({record['round_trip']['summary']['frame_bytes']} B), no compute")
        else:
            rows = record["concurrency"]["rows"]
            for batching, style in ((True, "o-"), (False, "s--")):
                sel = [r for r in rows if r["batching"] == batching]
                ax.plot([r["sessions"] for r in sel], [r["steps_per_second"] for r in sel], style,
                        label=f"batching {'on' if batching else 'off'}")
                for r in sel:
                    ax.annotate(f"{r['speedup_vs_one_session']:.1f}x", (r["sessions"], r["steps_per_second"]), fontsize=8,
                                textcoords="offset points", xytext=(4, 4))
            ax.set_xscale("log", base=2)
            ax.set_xticks(record["spec"]["sessions"], [str(s) for s in record["spec"]["sessions"]])
            ax.set_xlabel("concurrent sessions (light clients)")
            ax.set_ylabel("trunk decode steps/s served")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8)
            ax.set_title("aggregate trunk throughput")
    return save_figure(fig, path)


def save_service_bench(record: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    return write_json(out_dir / f"{stem}.json", record), plot_service_bench(record, out_dir / f"{stem}.png")
