"""`splitveil bench gpu`: the cloud's side on an accelerator, measured against plain transformers on the same device.

One process, one model in one dtype on one device (default: the 1B-shaped dummy Llama in bf16 on CUDA), four
measurements, each against its baseline in the same run:

- **decode at batch 1**: our split (`--split 2,14`: head, trunk and tail all on this device, the cut crossing our
  wire codec through the in-process service, as in `generate --split`) against transformers' own `generate` on the
  same model, greedy, same prompt and token count, alternating repeats. Decode tokens/s excludes the prefill (ours
  from the generation's own timings, transformers' as its `generate` time minus one prefill forward).
- **trunk decode steps at 1, 16, 64 sessions**: the served trunk's batched step (`forward_batched_step`, what
  `serve` runs) over N sessions prefilled to `context` positions: aggregate steps/s, and its ratio to one session.
- **prefill**: tokens/s of a `prompt_tokens` prompt through our split against one transformers forward.
- **SLIP masked products**: the executor's exact ring product (`RingWeight`, int64 values in float64 limbs) of
  the model's largest MLP matrix at 1 and 64 positions against the plain product in the model's dtype.
- **memory per session**: KV bytes one session at `context` positions holds (the parts' own accounting, and on a
  GPU `torch.cuda.memory_allocated`).

Dummy weights are random: these are cost figures only. The targets (issue 28): batch-1 decode >= 0.9x transformers;
64 sessions >= 10x one session's steps/s. On a machine without CUDA the default device is refused with one line;
`--device cpu` runs the same measurements on the CPU (for a functional run and the CPU figures).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from splitveil.core import validate
from splitveil.core.errors import ConfigError
from splitveil.core.records import environment, save_figure, write_json

TARGETS = {"batch1_vs_transformers": 0.9, "sessions64_vs_one": 10.0}


@dataclass(frozen=True)
class GpuBenchSpec:
    model: str = "llama-1b"
    load_format: str = "dummy"
    cuts: tuple[int, int] = (2, 14)
    device: str = "cuda"
    dtype: str = "bfloat16"
    sessions: tuple[int, ...] = (1, 16, 64)
    prompt_tokens: int = 128  # the batch-1 decode prompt, and the prefill measurement's prompt (x4)
    decode_tokens: int = 64
    context: int = 256  # positions each session holds before the timed trunk steps
    steps: int = 32  # timed trunk steps per repeat
    repeats: int = 3
    seed: int = 0

    def __post_init__(self):
        validate.lambda_cuts(self.cuts)
        validate.at_least(self, 1, "sessions", "prompt_tokens", "decode_tokens", "context", "steps", "repeats")
        validate.at_least(self, 2, "decode_tokens")


def check_spec(spec: GpuBenchSpec) -> None:
    """Refuses, before anything loads, a device that is not here or cuts the model does not have (one line)."""
    from transformers import AutoConfig

    from splitveil.models.loading import resolve_model_dir
    from splitveil.models.precision import torch_device, torch_dtype

    torch_device(spec.device)
    torch_dtype(spec.dtype)
    layers = AutoConfig.from_pretrained(resolve_model_dir(spec.model, load_format=spec.load_format)).num_hidden_layers
    if spec.cuts[1] > layers:
        raise ConfigError(f"--split {spec.cuts[0]},{spec.cuts[1]} needs {spec.cuts[1]} layers: {spec.model} has {layers}")


def _clock(device):
    """A timer that waits for the device's queued work first (CUDA runs asynchronously)."""
    import torch

    if device.type == "cuda":
        return lambda: (torch.cuda.synchronize(device), time.perf_counter())[1]
    return time.perf_counter


def run_gpu_bench(spec: GpuBenchSpec, *, progress=lambda message: None) -> dict:
    import torch

    from splitveil.models.loading import load_causal_lm
    from splitveil.models.precision import dtype_name, torch_device

    device = torch_device(spec.device)
    check_spec(spec)
    progress(f"loading {spec.model} ({spec.load_format}) in {spec.dtype} on {device} ...")
    model, _ = load_causal_lm(spec.model, load_format=spec.load_format, dtype=spec.dtype, device=str(device),
                              with_tokenizer=False)
    clock = _clock(device)
    generator = torch.Generator().manual_seed(spec.seed)
    vocab = min(model.config.vocab_size, 49152)
    prompt = torch.randint(3, vocab, (1, spec.prompt_tokens), generator=generator)
    record = {"kind": "gpu-bench", "spec": asdict(spec), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": dtype_name(model.dtype), "parameters": sum(p.numel() for p in model.parameters()),
              "weights_are_dummy": spec.load_format == "dummy", "targets": TARGETS, "environment": environment()}
    record["decode_batch1"] = _decode_batch1(model, prompt, spec, clock, progress)
    record["prefill"] = _prefill(model, spec, generator, vocab, clock, progress)
    record["trunk_steps"], record["memory_per_session"] = _trunk_steps(model, spec, device, clock, progress)
    record["masked_products"] = _masked_products(model, spec, device, clock, progress)
    one = next((row for row in record["trunk_steps"] if row["sessions"] == 1), None)
    most = next((row for row in record["trunk_steps"] if row["sessions"] == 64), None)
    ratio = record["decode_batch1"]["ratio"]
    scaling = most["steps_per_second"] / one["steps_per_second"] if one and most else None
    record["verdict"] = {
        "batch1_vs_transformers": ratio, "batch1_met": ratio >= TARGETS["batch1_vs_transformers"],
        "sessions64_vs_one": scaling,
        "sessions64_met": scaling >= TARGETS["sessions64_vs_one"] if scaling is not None else None,
    }
    return record


def _decode_batch1(model, prompt, spec: GpuBenchSpec, clock, progress) -> dict:
    """Our split's decode tokens/s against transformers' `generate`, alternating, same prompt and token count."""
    import torch

    from splitveil.edge.generate import GenerationConfig, SplitCausalLM
    from splitveil.plan.plan import SplitPlan

    split = SplitCausalLM(model, SplitPlan.lambda_split(*spec.cuts))
    config = GenerationConfig(max_new_tokens=spec.decode_tokens)
    ids = prompt.to(model.device)
    ours, theirs, same = [], [], True
    for repeat in range(spec.repeats + 1):  # the first round warms both up and is not counted
        progress(f"decode at batch 1: repeat {repeat}/{spec.repeats}")
        result = split.generate(prompt[0].tolist(), config)
        with torch.inference_mode():
            start = clock()
            model(input_ids=ids, logits_to_keep=1)
            prefill = clock() - start
            start = clock()
            output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec.decode_tokens,
                                    min_new_tokens=spec.decode_tokens, do_sample=False)
            total = clock() - start
        same = same and output[0, ids.shape[1]:].tolist() == result.token_ids
        if repeat:
            ours.append(result.decode_tokens / result.decode_seconds)
            theirs.append((spec.decode_tokens - 1) / max(total - prefill, 1e-9))
    split.close()
    ours_median, theirs_median = statistics.median(ours), statistics.median(theirs)
    return {"ours_tokens_per_second": ours, "transformers_tokens_per_second": theirs,
            "ours_median": ours_median, "transformers_median": theirs_median,
            "ratio": ours_median / theirs_median, "tokens_identical": same}


def _prefill(model, spec: GpuBenchSpec, generator, vocab: int, clock, progress) -> dict:
    """Tokens/s of one long prompt through our split against one transformers forward."""
    import torch

    from splitveil.edge.generate import GenerationConfig, SplitCausalLM
    from splitveil.plan.plan import SplitPlan

    length = 4 * spec.prompt_tokens
    prompt = torch.randint(3, vocab, (1, length), generator=generator)
    split = SplitCausalLM(model, SplitPlan.lambda_split(*spec.cuts))
    ours, theirs = [], []
    for repeat in range(spec.repeats + 1):
        progress(f"prefill of {length} tokens: repeat {repeat}/{spec.repeats}")
        result = split.generate(prompt[0].tolist(), GenerationConfig(max_new_tokens=1))
        with torch.inference_mode():
            start = clock()
            model(input_ids=prompt.to(model.device), logits_to_keep=1)
            seconds = clock() - start
        if repeat:
            ours.append(length / result.prefill_seconds)
            theirs.append(length / seconds)
    split.close()
    return {"prompt_tokens": length, "ours_tokens_per_second": ours, "transformers_tokens_per_second": theirs,
            "ratio": statistics.median(ours) / statistics.median(theirs)}


def _trunk_steps(model, spec: GpuBenchSpec, device, clock, progress) -> tuple[list[dict], dict]:
    """Aggregate trunk decode steps/s at each session count (the served trunk's batched step), and the memory one
    session's KV cache holds at `context` positions."""
    import torch

    from splitveil.models.causal_lm import CausalLMSplittable, forward_batched_step
    from splitveil.plan.plan import SplitPlan, apply

    splittable = CausalLMSplittable(model)
    plan = SplitPlan.lambda_split(*spec.cuts)
    hidden_size = splittable.hidden_size
    rows, memory = [], {}
    for count in spec.sessions:
        progress(f"trunk steps: {count} session(s), prefilling {spec.context} positions each")
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        parts = [apply(splittable, plan)[1] for _ in range(count)]
        for part in parts:
            part(torch.randn(1, spec.context, hidden_size))
        state = sum(part.state_bytes() for part in parts)
        allocated = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else None
        memory = {"context": spec.context, "kv_bytes_per_session": state / count,
                  "cuda_allocated_bytes_per_session": allocated / count if allocated is not None else None}
        step = (lambda h: parts[0](h)) if count == 1 else (lambda h: forward_batched_step(parts, h))
        hidden = torch.randn(count, 1, hidden_size)
        step(hidden)  # warm-up (and the batched step's one-time agreement check)
        rates = []
        for repeat in range(spec.repeats):
            progress(f"trunk steps: {count} session(s), repeat {repeat + 1}/{spec.repeats}")
            start = clock()
            for _ in range(spec.steps):
                step(hidden)
            rates.append(count * spec.steps / (clock() - start))
        rows.append({"sessions": count, "steps_per_second": statistics.median(rates), "repeats": rates,
                     "batched": count > 1 and all(splittable.batch_verdicts.values())})
        del parts
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, memory


def _masked_products(model, spec: GpuBenchSpec, device, clock, progress) -> list[dict]:
    """SLIP's exact ring product of the largest MLP matrix against the plain product in the model's dtype."""
    import torch

    from splitveil.protect.slip.fixedpoint import FixedPoint, RingWeight, uniform_ring

    from splitveil.models.causal_lm import CausalLMSplittable

    layer = CausalLMSplittable(model).layers[spec.cuts[0]]
    linear = max((m for m in layer.modules() if isinstance(m, torch.nn.Linear)), key=lambda m: m.weight.numel())
    weight = linear.weight.detach()
    m, n = weight.shape
    ring = RingWeight(FixedPoint().encode_w(weight.float().cpu()), compact=True, device=device)
    rows = []
    for positions in (1, 64):
        progress(f"masked products: {positions} position(s) of a {m}x{n} matrix")
        x = uniform_ring((positions, n))
        plain_x = torch.randn(positions, n, dtype=weight.dtype, device=weight.device)
        ring.matmul(x)
        plain_x @ weight.t()
        masked, plain = [], []
        for _ in range(spec.repeats):
            start = clock()
            ring.matmul(x)
            masked.append(positions / (clock() - start))
            start = clock()
            for _ in range(16):
                plain_x @ weight.t()
            plain.append(16 * positions / (clock() - start))
        rows.append({"positions": positions, "shape": [m, n], "masked_rows_per_second": statistics.median(masked),
                     "plain_rows_per_second": statistics.median(plain),
                     "plain_over_masked": statistics.median(plain) / statistics.median(masked),
                     "limb_bits": ring.limb_bits})
    return rows


def save_gpu_bench(record: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    return write_json(Path(out_dir) / f"{stem}.json", record), _plot(record, Path(out_dir) / f"{stem}.png")


def _plot(record: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    decode, prefill = record["decode_batch1"], record["prefill"]
    axes[0].bar(["ours (split)", "transformers"], [decode["ours_median"], decode["transformers_median"]],
                color=["tab:blue", "tab:gray"])
    axes[0].set_title(f"decode, batch 1: {decode['ratio']:.2f}x")
    axes[0].set_ylabel("tokens/s")
    axes[1].bar(["ours (split)", "transformers"], [statistics.median(prefill["ours_tokens_per_second"]),
                                                  statistics.median(prefill["transformers_tokens_per_second"])],
                color=["tab:blue", "tab:gray"])
    axes[1].set_title(f"prefill of {prefill['prompt_tokens']} tokens: {prefill['ratio']:.2f}x")
    axes[1].set_ylabel("tokens/s")
    steps = record["trunk_steps"]
    axes[2].plot([r["sessions"] for r in steps], [r["steps_per_second"] for r in steps], "o-")
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("sessions")
    axes[2].set_ylabel("trunk steps/s (all sessions)")
    axes[2].set_title("batched trunk steps")
    products = record["masked_products"]
    labels = [f"{r['positions']} pos." for r in products]
    axes[3].bar([f"{label}\nmasked" for label in labels], [r["masked_rows_per_second"] for r in products],
                color="tab:red")
    axes[3].bar([f"{label}\nplain" for label in labels], [r["plain_rows_per_second"] for r in products],
                color="tab:gray")
    axes[3].set_yscale("log")
    axes[3].set_ylabel("rows/s")
    axes[3].set_title("SLIP masked vs plain product")
    fig.suptitle(f"{record['spec']['model']} ({'dummy weights, ' if record['weights_are_dummy'] else ''}"
                 f"{record['dtype']}) on {record['device_name']}")
    fig.tight_layout()
    return save_figure(fig, path)
