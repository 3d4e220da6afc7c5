"""`splitveil bench ray`: the trunk on Ray Serve with 1 and 2 replicas against light clients, next to the plain server.

Every variant's server is started first (`splitveil serve`, then `splitveil serve --ray --replicas R` for each R, each
Ray variant with its own local Ray instance) and they all stay up; then, `repeats` times, for each session count,
each variant in turn gets the light clients of `bench load` (`load_service.run_light_load`: one TLS WebSocket each,
the real head's hidden states precomputed, every RESULT compared with the trunk computed in-process) for
`warmup + seconds`. Alternating the variants within each repeat spreads this shared machine's drift over all of
them; the idle servers stay up meanwhile (an idle Ray instance's own processes use a little CPU). Recorded per
(variant, sessions, repeat): aggregate decode steps/s and step latency percentiles in the window, errors, the
largest difference to the in-process trunk; per variant: the start-up times (Ray start and replicas ready, from
the server's own log); the summary takes the median over repeats.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from splitveil.core import validate
from splitveil.core.records import environment, save_figure, write_json
from splitveil.plan.plan import DEFAULT_LM_CUTS


@dataclass(frozen=True)
class RayBenchSpec:
    model: str = "smollm2-135m"
    cuts: tuple[int, int] = DEFAULT_LM_CUTS
    replicas: tuple[int, ...] = (1, 2)
    sessions: tuple[int, ...] = (1, 8, 32)
    seconds: float = 10.0  # measured window per session count
    warmup_seconds: float = 3.0  # before the window: connections, first prefills (and, on Ray, first placements)
    decode_tokens: int = 48  # decode steps per light-client generation (then CLOSE, OPEN again)
    baseline: bool = True  # also the plain `splitveil serve` (one process, no Ray) at the same session counts
    repeats: int = 2  # rounds over (sessions x variants); the summary is the median

    def __post_init__(self):
        """Refuses, with one line, what no run could do."""
        validate.lambda_cuts(self.cuts)
        validate.at_least(self, 1, "replicas", "sessions", "decode_tokens", "repeats")
        validate.at_least(self, 0, "warmup_seconds")
        validate.positive(self, "seconds")


def variants(spec: RayBenchSpec) -> list[tuple[str, list[str]]]:
    """(name, extra `splitveil serve` arguments) of each server the benchmark runs."""
    room = ["--max-sessions", str(max(spec.sessions) + 8)]  # per replica: one replica must hold every session
    found = [("serve", room)] if spec.baseline else []
    return found + [(f"ray-{r}", ["--ray", "--replicas", str(r), *room]) for r in spec.replicas]


def run_ray_bench(spec: RayBenchSpec, *, progress: Callable[[str], None] | None = None) -> dict:
    from splitveil.harness.load_service import PROMPTS, build_reference, run_light_load
    from splitveil.models.loading import load_causal_lm
    from splitveil.serve.process import ServerProcess

    def note(message: str) -> None:
        if progress is not None:
            progress(message)

    note("reference: the head's states and the trunk's outputs in-process")
    model, tokenizer = load_causal_lm(spec.model)
    reference = build_reference(model, tokenizer, spec.cuts, PROMPTS, spec.decode_tokens)
    del model
    record = {"benchmark": "ray", "spec": asdict(spec), "environment": environment(), "prompts": list(PROMPTS),
              "variants": {}, "runs": []}
    with ExitStack() as stack:
        servers = {}
        for name, extra in variants(spec):
            note(f"{name}: starting the server")
            server = stack.enter_context(ServerProcess(spec.model, spec.cuts, extra_args=extra, startup_timeout=600))
            startup = {"listening_after_seconds": round(server.startup_seconds, 2), **_ray_startup(server.log_path)}
            record["variants"][name] = {"server_args": extra, **startup}
            servers[name] = server
        for repeat in range(spec.repeats):
            for sessions in spec.sessions:
                for name, server in servers.items():
                    note(f"repeat {repeat + 1}/{spec.repeats}: {name}, {sessions} sessions")
                    load = run_light_load(server.url, server.token, server.cert, reference, sessions=sessions,
                                          seconds=spec.seconds, warmup=spec.warmup_seconds)
                    record["runs"].append({"variant": name, "replicas": _replicas(name), "repeat": repeat, **load})
    record["summary"] = summary_rows(record)
    record["passed"] = all(run["error_count"] == 0 for run in record["runs"])
    return record


def _replicas(name: str) -> int | None:
    return int(name.split("-")[1]) if name.startswith("ray-") else None


def _ray_startup(log_path: Path) -> dict:
    """Ray's start-up times as `splitveil serve --ray` printed them (nothing for the plain server)."""
    found = re.search(r"Ray started in ([\d.]+) s, replicas ready in ([\d.]+) s", Path(log_path).read_text())
    return {"ray_start_seconds": float(found.group(1)), "replicas_ready_seconds": float(found.group(2))} if found else {}


def summary_rows(record: dict) -> list[dict]:
    """One row per (variant, sessions), medians over the repeats: steps/s, p50/p99 step latency; errors summed."""
    rows = []
    for name in record["variants"]:
        for sessions in record["spec"]["sessions"]:
            runs = [r for r in record["runs"] if r["variant"] == name and r["sessions"] == sessions]
            if runs:
                rows.append({"variant": name, "sessions": sessions, "repeats": len(runs),
                             "steps_per_second": _median([r["steps_per_second"] for r in runs], 2),
                             "steps_per_second_range": [round(min(r["steps_per_second"] for r in runs), 2),
                                                        round(max(r["steps_per_second"] for r in runs), 2)],
                             "p50_step_ms": _median([r["p50_step_ms"] for r in runs]),
                             "p99_step_ms": _median([r["p99_step_ms"] for r in runs]),
                             "errors": sum(r["error_count"] for r in runs)})
    return rows


def _median(values, digits: int = 1):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), digits) if values else None


def plot_ray_bench(record: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"serve": "#777777", "ray-1": "#3b7dd8", "ray-2": "#d8743b"}
    for name in record["variants"]:
        runs = [r for r in record["summary"] if r["variant"] == name]
        x = [r["sessions"] for r in runs]
        colour = colours.get(name)
        label = "splitveil serve (no Ray)" if name == "serve" else f"Ray Serve, {_replicas(name)} replica(s)"
        rate.plot(x, [r["steps_per_second"] for r in runs], "o-", color=colour, label=label)
        for row in runs:  # the range over repeats
            rate.plot([row["sessions"]] * 2, row["steps_per_second_range"], "-", color=colour, alpha=0.4, linewidth=4)
        latency.plot(x, [r["p50_step_ms"] for r in runs], "o-", color=colour, label=f"{label} p50")
        latency.plot(x, [r["p99_step_ms"] for r in runs], "s:", color=colour, label=f"{label} p99")
    env = record["environment"]
    for ax in (rate, latency):
        ax.set_xscale("log", base=2)
        ax.set_xticks(record["spec"]["sessions"], [str(s) for s in record["spec"]["sessions"]])
        ax.set_xlabel("concurrent sessions (light clients)")
        ax.legend(fontsize=7, loc="lower right")
    rate.set_ylabel("decode steps/s, all sessions")
    rate.text(0.02, 0.97, f"median of {record['spec']['repeats']} alternating runs; bars: range", transform=rate.transAxes,
              fontsize=7, va="top")
    rate.set_title(f"{record['spec']['model']} trunk {record['spec']['cuts']}, {env['cpu_count']} CPUs, 1 torch thread")
    latency.set_yscale("log")
    latency.set_ylabel("decode step latency, ms (send to RESULT)")
    latency.set_title("step latency in the window")
    return save_figure(fig, path)


def save_ray_bench(record: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    return write_json(out_dir / f"{stem}.json", record), plot_ray_bench(record, out_dir / f"{stem}.png")
