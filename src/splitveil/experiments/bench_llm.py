"""Decode throughput of the in-process split against the unsplit model, measured in one run.

Runs alternate (unsplit, split fp32, split fp16, unsplit, ...) so that machine noise hits every variant alike;
the figure of merit is the ratio of median decode tokens/s (split / unsplit). End-of-sequence is ignored so that
every run generates exactly `tokens` tokens.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from splitveil.core import validate
from splitveil.core.records import environment, save_figure, write_json
from splitveil.plan.plan import DEFAULT_LM_CUTS


@dataclass(frozen=True)
class LLMBenchSpec:
    model: str = "smollm2-135m"
    cuts: tuple[int, ...] = DEFAULT_LM_CUTS
    tokens: int = 128  # new tokens per run
    repeats: int = 3  # runs per variant
    wires: tuple[str, ...] = ("fp32", "fp16")
    prompt: str = "Explain in detail how a refrigerator works."

    def __post_init__(self):
        """Refuses, with one line, what no run could do."""
        from splitveil.wire.codecs import FLOAT_CODECS

        validate.cuts(self.cuts)
        validate.at_least(self, 1, "tokens", "repeats")
        validate.one_of(self, "wires", FLOAT_CODECS)


def run_llm_bench(spec: LLMBenchSpec, *, progress=None) -> dict:
    """Runs the benchmark and returns its record (spec, environment, per-run figures, summary)."""
    import torch

    from splitveil.edge.generate import SplitCausalLM
    from splitveil.models.loading import load_causal_lm
    from splitveil.plan.plan import SplitPlan

    model, tokenizer = load_causal_lm(spec.model)
    plan = SplitPlan.from_cuts(spec.cuts)
    variants = {"unsplit": SplitCausalLM(model, tokenizer=tokenizer)}
    for wire in spec.wires:
        variants[f"split-{wire}"] = SplitCausalLM(model, plan, tokenizer=tokenizer, wire=wire)
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    tokens: dict[str, list[int]] = {}
    for name, runner in variants.items():  # warm-up, not recorded
        runner.generate(spec.prompt, max_new_tokens=4, eos_token_ids=())
    for repeat in range(spec.repeats):
        for name, runner in variants.items():
            result = runner.generate(spec.prompt, max_new_tokens=spec.tokens, eos_token_ids=())
            tokens.setdefault(name, result.token_ids)
            steps = len(result.token_ids) - 1
            runs[name].append({
                "repeat": repeat,
                "decode_tokens_per_second": steps / result.decode_seconds,
                "prefill_seconds": result.prefill_seconds,
                "seconds": result.seconds,
                "bytes_up": result.bytes_up,
                "bytes_down": result.bytes_down,
                "round_trips": result.round_trips,
                "step_seconds": result.step_seconds,
                "bytes_per_decode_step": list(result.bytes_per_decode_step),
            })
            if progress is not None:
                progress(name, repeat)
    wire_error = {}
    prompt_ids = torch.tensor([tokenizer(spec.prompt)["input_ids"]])
    with torch.inference_mode():
        unsplit_logits = model(prompt_ids).logits
    for wire in spec.wires:
        split_logits = variants[f"split-{wire}"].forward_logits(prompt_ids)
        wire_error[wire] = float((split_logits - unsplit_logits).abs().max())
    medians = {name: statistics.median(r["decode_tokens_per_second"] for r in rs) for name, rs in runs.items()}
    summary = {
        name: {
            "median_decode_tokens_per_second": medians[name],
            "ratio_to_unsplit": medians[name] / medians["unsplit"],
            "identical_tokens_to_unsplit": tokens[name] == tokens["unsplit"],
            "max_abs_logit_difference": wire_error.get(name.removeprefix("split-"), 0.0),
            "bytes_per_decode_step": {"up": runs[name][0]["bytes_per_decode_step"][0], "down": runs[name][0]["bytes_per_decode_step"][1]},
        }
        for name in runs
    }
    return {"benchmark": "llm-decode", "spec": asdict(spec), "environment": environment(), "runs": runs, "summary": summary}


def plot_llm_bench(record: dict, path: Path) -> Path:
    """Two panels: median decode tokens/s per variant, and per-step latency against position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["summary"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    values = [record["summary"][n]["median_decode_tokens_per_second"] for n in names]
    bars = left.bar(names, values, color=["#888888"] + ["#3b7dd8", "#7fb3f0", "#b5d3f7"][: len(names) - 1])
    for bar, name in zip(bars, names):
        ratio = record["summary"][name]["ratio_to_unsplit"]
        left.annotate(f"{bar.get_height():.1f} tok/s\n{ratio:.3f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=8)
    left.set_ylabel("decode tokens/s (median)")
    spec = record["spec"]
    left.set_title(f"{spec['model']}, cuts {tuple(spec['cuts'])}, {spec['tokens']} tokens, "
                   f"{record['environment']['torch_threads']} thread")
    left.set_ylim(0, max(values) * 1.25)
    for name in names:
        per_step = [statistics.median(step) for step in zip(*(r["step_seconds"] for r in record["runs"][name]))]
        right.plot(range(2, len(per_step) + 2), [1000 * s for s in per_step], label=name, linewidth=1)
    right.set_xlabel("generated token")
    right.set_ylabel("decode step latency, ms (median over repeats)")
    right.set_title("KV cache on every part: flat per-step cost")
    right.legend(fontsize=8)
    right.set_ylim(bottom=0)
    return save_figure(fig, path)


def save_llm_bench(record: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    return write_json(out_dir / f"{stem}.json", record), plot_llm_bench(record, out_dir / f"{stem}.png")
