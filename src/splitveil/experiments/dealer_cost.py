"""What the mask dealer saves the device: `splitveil bench dealer`.

For each configuration (a model, its offloaded layers, where the LM head runs) the bench runs, alternating in one
run, `splitveil generate --json` processes: the unsplit model on the device (the baseline), the prompt deployment
with a local mask dealer (fused groups, two round trips per layer: `--fuse auto`), the same with `--fuse off` (four
round trips per layer), and (on models whose float64 ring copies fit this machine) the prompt deployment with
`--dealer device` (the device deals the mask terms itself). Each generation is its own process, so CPU time,
peak RSS and resident weights are that process's alone. The figures are the device's CPU seconds per decode token,
the model weight bytes it holds and its peak RSS, as ratios to the unsplit model's from the same pair; beside them
the executor's and the dealer's CPU seconds, bytes to and from each party, round trips per decode step and the time
the device waited for the dealer per step.

Dummy-weight models (`--load-format dummy`) are random: their figures are costs only, never privacy.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from splitveil.core.errors import ConfigError
from splitveil.core.records import environment, save_figure, write_json
from splitveil.core.validate import at_least

PROMPT = "Explain in detail how a refrigerator works."


@dataclass(frozen=True)
class DealerCase:
    """One configuration: a model, the offloaded layers A,B, where the head runs, and whether `--fuse off` and
    `--dealer device` are run beside it."""

    model: str
    split: str
    head: str = "masked"
    load_format: str = "auto"
    with_device_dealer: bool = True
    with_unfused: bool = True

    @property
    def label(self) -> str:
        return f"{self.model} --split {self.split} (head {self.head})"


DEFAULT_CASES = (DealerCase("smollm2-135m", "0,30"), DealerCase("smollm2-135m", "2,28"),
                 DealerCase("llama-1b", "0,16", load_format="dummy", with_device_dealer=False))


@dataclass(frozen=True)
class DealerBenchSpec:
    cases: tuple[DealerCase, ...] = DEFAULT_CASES
    max_new_tokens: int = 32
    pairs: int = 2  # alternating (unsplit, dealt[, device]) repeats per case
    prompt: str = PROMPT
    timeout: float = 3600.0

    def __post_init__(self):
        at_least(self, 1, "max_new_tokens", "pairs")
        if not self.cases:
            raise ConfigError("give at least one configuration")


def _generate(case: DealerCase, kind: str, spec: DealerBenchSpec) -> dict:
    args = ["--model", case.model, "--prompt", spec.prompt, "--max-new-tokens", str(spec.max_new_tokens), "--json",
            "--load-format", case.load_format]
    if kind == "unsplit":
        args += ["--no-split"]
    else:
        args += ["--split", case.split, "--protect", "prompt", "--dealer", "device" if kind == "device" else "local"]
        if kind in ("dealer", "unfused"):
            args += ["--head", case.head, "--fuse", "off" if kind == "unfused" else "auto"]
    if kind == "device":
        args = [a for a in args if a not in ("--load-format", case.load_format)]
    done = subprocess.run([sys.executable, "-m", "splitveil.cli.main", "generate", *args], capture_output=True,
                          text=True, timeout=spec.timeout)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise ConfigError(f"{case.label} ({kind}) failed: {lines[-1] if lines else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


KEEP = ("token_ids", "decode_tokens", "cpu_seconds_decode", "cpu_seconds_prefill", "cpu_seconds_per_decode_token",
        "peak_rss_bytes", "weight_bytes_resident", "decode_seconds", "round_trips_per_decode_step", "bytes_up",
        "bytes_down", "executor_cpu_seconds", "dealer_cpu_seconds", "dealer_bytes_up", "dealer_bytes_down",
        "dealer_wait_seconds_per_decode_step", "dealer_wait_seconds_prefill", "offline_seconds", "fused")


def run_dealer_bench(spec: DealerBenchSpec, *, progress=None) -> dict:
    rows = []
    for case in spec.cases:
        kinds = ["unsplit", "dealer"] + (["unfused"] if case.with_unfused else []) + \
            (["device"] if case.with_device_dealer else [])
        runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for kind in kinds[1:]:  # once, unrecorded: the bundles and the device's keys, so the pairs time generation
            if progress is not None:
                progress(f"{case.label}: {kind}, warm-up (bundle and keys)")
            _generate(case, kind, replace(spec, max_new_tokens=1))
        for pair in range(spec.pairs):
            for kind in kinds:
                if progress is not None:
                    progress(f"{case.label}: {kind}, pair {pair + 1}/{spec.pairs}")
                report = _generate(case, kind, spec)
                runs[kind].append({key: report.get(key) for key in KEEP})
        rows.append({"case": asdict(case), "label": case.label, "runs": runs, "summary": _summarise(runs)})
    return {"benchmark": "dealer-cost", "spec": {**asdict(spec), "cases": [asdict(c) for c in spec.cases]},
            "environment": environment(), "rows": rows,
            "trust": "the dealer and the executor do not collude (together they would unmask every input)",
            "note": "each generation in its own process, after one unrecorded warm-up generation per deployment (the "
                    "public bundle and the device's Freivalds keys are built once per model and cached); ratios are to "
                    "the unsplit model run in the same pair; dummy-weight models are random (costs only)"}


def _summarise(runs: dict[str, list[dict]]) -> dict:
    unsplit = runs["unsplit"]
    summary = {}
    for kind, reports in runs.items():
        if kind == "unsplit":
            continue
        cpu = [r["cpu_seconds_per_decode_token"] / u["cpu_seconds_per_decode_token"] for r, u in zip(reports, unsplit)]
        summary[kind] = {
            "cpu_per_decode_token_ratio": statistics.median(cpu),
            "cpu_per_decode_token_ratios": cpu,
            "weight_bytes_ratio": reports[0]["weight_bytes_resident"] / unsplit[0]["weight_bytes_resident"],
            "peak_rss_ratio": reports[0]["peak_rss_bytes"] / unsplit[0]["peak_rss_bytes"],
            "same_tokens": all(r["token_ids"] == u["token_ids"] for r, u in zip(reports, unsplit)),
            "cpu_seconds_per_decode_token": statistics.median(r["cpu_seconds_per_decode_token"] for r in reports),
            "unsplit_cpu_seconds_per_decode_token": statistics.median(u["cpu_seconds_per_decode_token"] for u in unsplit),
            "round_trips_per_decode_step": reports[0]["round_trips_per_decode_step"],
            "dealer_wait_seconds_per_decode_step": reports[0].get("dealer_wait_seconds_per_decode_step"),
            "fused": reports[0].get("fused"),
        }
    return summary


WEIGHT_TARGET = 0.25  # device-resident weights / the model's, every model


def cpu_target(model: str) -> float:
    """The target for the device's CPU per decode token over the unsplit model's: 0.10 for the 1B shape
    (and larger), where offloading matters most; 0.25 for SmolLM2-135M."""
    return 0.10 if model.startswith("llama-") else 0.25


KIND_LABELS = {
    "dealer": lambda summary: f"mask dealer{', fused (2 round trips per layer)' if summary.get('fused') else ''}",
    "unfused": lambda summary: "mask dealer, --fuse off (4 round trips per layer)",
    "device": lambda summary: "device deals (baseline)",
}


def plot_dealer_bench(record: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, cpu, weights, colours, cpu_targets = [], [], [], [], []
    for row in record["rows"]:
        for kind, summary in row["summary"].items():
            labels.append(f"{row['label']}\n{KIND_LABELS[kind](summary)}")
            cpu.append(summary["cpu_per_decode_token_ratio"])
            weights.append(summary["weight_bytes_ratio"])
            colours.append({"dealer": "tab:green", "unfused": "tab:olive"}.get(kind, "tab:grey"))
            cpu_targets.append(cpu_target(row["case"]["model"]))
    figure, axes = plt.subplots(1, 2, figsize=(13, 0.9 * len(labels) + 2), sharey=True)
    for axis, values, title, targets in (
            (axes[0], cpu, "device CPU per decode token / unsplit on the device", cpu_targets),
            (axes[1], weights, "model weights held by the device / the model's", [WEIGHT_TARGET] * len(labels))):
        axis.barh(range(len(labels)), values, color=colours)
        axis.axvline(1.0, color="black", linewidth=0.8)
        for index, target in enumerate(targets):  # each bar its own target (0.10 for the 1B shape)
            axis.vlines(target, index - 0.45, index + 0.45, color="tab:red", linestyle="--", linewidth=1.0,
                        label="target" if index == 0 else None)
            axis.text(target, index + 0.45, f"{target:g}", color="tab:red", fontsize=7, ha="center", va="bottom")
        for index, value in enumerate(values):
            axis.text(value, index, f" {value:.3f}", va="center", fontsize=8)
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=8)
    axes[0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0].invert_yaxis()
    figure.suptitle("SLIP prompt deployment: what the device does and holds (non-collusion assumed)", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def save_dealer_bench(record: dict, out_dir: Path) -> tuple[Path, Path]:
    stem = "dealer-cost_cpu-1thread"
    return write_json(out_dir / f"{stem}.json", record), plot_dealer_bench(record, out_dir / f"{stem}.png")
