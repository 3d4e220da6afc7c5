"""`splitveil bench ...`: benchmarks that compare ratios in one run and write JSON + PNG."""

from __future__ import annotations

from pathlib import Path

import typer

from splitveil.cli.common import allow_dirty_option, err_console, int_list, result_stem, setup, stamp_run
from splitveil.core.errors import ConfigError
from splitveil.plan.plan import DEFAULT_LM_SPLIT

app = typer.Typer(help="Benchmarks: ratios measured in one run, written as JSON + PNG under benchmarks/results/.",
                  no_args_is_help=True)


@app.command("llm")
def llm(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registered model name or local model directory."),
    split: str = typer.Option(DEFAULT_LM_SPLIT, "--split", "-s", help="Cuts, as for `generate` (A,B = Λ-split)."),
    tokens: int = typer.Option(128, "--tokens", min=2, help="New tokens per run (end-of-sequence ignored)."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Runs per variant, alternating; medians are reported."),
    out: Path = typer.Option(Path("benchmarks/results"), "--out", help="Folder for the JSON record and PNG plot."),
    allow_dirty: bool = allow_dirty_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """Decode tokens/s of the in-process split (fp32 and fp16 wires) against the unsplit model."""
    from rich.progress import Progress

    from splitveil.experiments.bench_llm import LLMBenchSpec, run_llm_bench, save_llm_bench
    from splitveil.plan.plan import parse_cuts

    spec = LLMBenchSpec(model=model, cuts=parse_cuts(split), tokens=tokens, repeats=repeats)
    stamp_run(allow_dirty)
    setup(threads)
    total = repeats * (1 + len(spec.wires))
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("benchmark runs", total=total)
        record = run_llm_bench(spec, progress=lambda name, repeat: progress.advance(task))
    stem = result_stem("llm-decode", model, spec.cuts, threads)
    json_path, png_path = save_llm_bench(record, out, stem)
    for name, row in record["summary"].items():
        up, down = row["bytes_per_decode_step"]["up"], row["bytes_per_decode_step"]["down"]
        wire = f", {up:.0f} B up / {down:.0f} B down per step" if up else ""
        typer.echo(f"{name:12s} {row['median_decode_tokens_per_second']:6.2f} tok/s  ratio {row['ratio_to_unsplit']:.3f}  "
                   f"identical tokens: {row['identical_tokens_to_unsplit']}, max |logit diff| "
                   f"{row['max_abs_logit_difference']:.4f}{wire}")
    typer.echo(f"wrote {json_path} and {png_path}")


@app.command("service")
def service(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registered model name or local model directory."),
    split: str = typer.Option(DEFAULT_LM_SPLIT, "--split", "-s", help="Λ-split cuts (A,B)."),
    tokens: int = typer.Option(128, "--tokens", min=2, help="New tokens per generation run."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Generation runs per variant (alternating)."),
    window: float = typer.Option(8.0, "--window", min=1.0, help="Seconds measured per concurrency level."),
    sessions: str = typer.Option("1,4,16", "--sessions", help="Concurrency levels, comma-separated."),
    only: str = typer.Option("throughput,rtt,concurrency", "--only", help="Which measurements to run."),
    out: Path = typer.Option(Path("benchmarks/results"), "--out", help="Folder for the JSON record and PNG plot."),
    allow_dirty: bool = allow_dirty_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads in this process."),
) -> None:
    """TLS service: tokens/s vs unsplit and in-process, protocol round trip vs raw TCP, steps/s with concurrent sessions."""
    from splitveil.core.errors import ConfigError
    from splitveil.experiments.bench_service import ServiceBenchSpec, run_service_bench, save_service_bench
    from splitveil.plan.plan import parse_cuts

    cuts = parse_cuts(split)
    if len(cuts) != 2:
        raise ConfigError("the service benchmark needs a Λ-split: --split A,B")
    levels = tuple(int_list(sessions, "--sessions", "numbers like 1,4,16"))
    parts = tuple(p.strip() for p in only.split(","))
    unknown = set(parts) - {"throughput", "rtt", "concurrency"}
    if unknown or not levels or min(levels) < 1:
        raise ConfigError(f"bad --only/--sessions: use throughput,rtt,concurrency and positive session counts")
    spec = ServiceBenchSpec(model=model, cuts=cuts, tokens=tokens, repeats=repeats, window_seconds=window, sessions=levels)
    stamp_run(allow_dirty)
    setup(threads)
    with err_console.status("benchmarking ...") as spinner:
        record = run_service_bench(spec, parts=parts, progress=lambda message: spinner.update(message))
    stem = result_stem("service", model, cuts, threads)
    json_path, png_path = save_service_bench(record, out, stem)
    if "throughput" in record:
        for name, row in record["throughput"]["summary"].items():
            typer.echo(f"{name:16s} {row['median_decode_tokens_per_second']:6.2f} tok/s  ratio {row['ratio_to_unsplit']:.3f}  "
                       f"identical: {row['identical_tokens_to_unsplit']}  bytes/token up {row['bytes_per_token_up']:.0f} "
                       f"down {row['bytes_per_token_down']:.0f}")
    if "round_trip" in record:
        rt = record["round_trip"]["summary"]
        typer.echo(f"round trip of a {rt['frame_bytes']} B step: ours {rt['ours_tls_websocket']['median_ms']:.3f} ms, raw TCP echo "
                   f"{rt['raw_tcp_echo']['median_ms']:.3f} ms (overhead {rt['overhead_ms']:.3f} ms)")
    if "concurrency" in record:
        for row in record["concurrency"]["rows"]:
            typer.echo(f"{row['sessions']:3d} sessions, batching {'on ' if row['batching'] else 'off'}: "
                       f"{row['steps_per_second']:7.1f} steps/s ({row['speedup_vs_one_session']:.2f}x one session)"
                       + (f"  errors: {row['errors'][:1]}" if row["errors"] else ""))
    typer.echo(f"wrote {json_path} and {png_path}")


@app.command("batched")
def batched(
    sessions: str = typer.Option("1,16,64", "--sessions", help="Concurrent sessions per measurement, comma-separated."),
    steps: int = typer.Option(24, "--steps", min=1, help="Batched decode steps timed per repeat."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Alternating repeats per algorithm and session count."),
    out: Path = typer.Option(Path("benchmarks/results"), "--out", help="Folder for the JSON record and PNG plot."),
    allow_dirty: bool = allow_dirty_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """Batched decode steps of the SmolLM2 trunk (split 2,28): per-session buffers against the old gathering step,
    aggregate steps/s and KV memory kept alive, both in one run."""
    from splitveil.core.errors import ConfigError
    from splitveil.experiments.bench_batched import BatchedBenchSpec, run_batched_bench, save_batched_bench

    levels = tuple(int_list(sessions, "--sessions", "session counts like 1,16,64"))
    if not levels or min(levels) < 1:
        raise ConfigError(f"bad --sessions {sessions!r}: give positive session counts")
    spec = BatchedBenchSpec(sessions=levels, steps=steps, repeats=repeats)
    stamp_run(allow_dirty)
    setup(threads)
    with err_console.status("benchmarking ...") as spinner:
        record = run_batched_bench(spec, progress=lambda message: spinner.update(message))
    for count, row in record["summary"].items():
        typer.echo(f"{count:>3} sessions: " + ", ".join(
            f"{name} {value['steps_per_second']:.1f} steps/s" if isinstance(value, dict) else f"{name} {value:.2f}"
            for name, value in row.items()))
    stem = result_stem("batched-decode", spec.model, spec.cuts, threads)
    json_path, png_path = save_batched_bench(record, out, stem)
    typer.echo(f"wrote {json_path} and {png_path}")


@app.command("ray")
def ray(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registered model name or local model directory."),
    split: str = typer.Option(DEFAULT_LM_SPLIT, "--split", "-s", help="Λ-split cuts (A,B); the servers run the trunk."),
    replicas: str = typer.Option("1,2", "--replicas", help="Ray Serve replica counts, comma-separated."),
    sessions: str = typer.Option("1,8,32", "--sessions", help="Concurrent light sessions, comma-separated."),
    seconds: float = typer.Option(10.0, "--seconds", min=1.0, help="Measured seconds per session count."),
    warmup: float = typer.Option(3.0, "--warmup", min=0.0, help="Seconds before each measured window."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Also the plain `splitveil serve` (no Ray)."),
    repeats: int = typer.Option(2, "--repeats", min=1, help="Rounds over sessions x variants (alternating); medians."),
    out: Path = typer.Option(Path("benchmarks/results"), "--out", help="Folder for the JSON record and PNG plot."),
    allow_dirty: bool = allow_dirty_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads in this process."),
) -> None:
    """The trunk on Ray Serve (`serve --ray`) with 1 and 2 replicas: aggregate decode steps/s and p50/p99 step latency
    at 1, 8 and 32 light sessions, next to the plain server."""
    from splitveil.core.errors import ConfigError
    from splitveil.experiments.bench_ray import RayBenchSpec, run_ray_bench, save_ray_bench
    from splitveil.plan.plan import parse_cuts

    cuts = parse_cuts(split)
    counts = tuple(int_list(replicas, "--replicas", "replica counts like 1,2"))
    levels = tuple(int_list(sessions, "--sessions", "session counts like 1,8,32"))
    if len(cuts) != 2 or not counts or not levels or min(counts + levels) < 1:
        raise ConfigError("bench ray needs --split A,B and positive --replicas and --sessions counts")
    spec = RayBenchSpec(model=model, cuts=cuts, replicas=counts, sessions=levels, seconds=seconds,
                        warmup_seconds=warmup, baseline=baseline, repeats=repeats)
    stamp_run(allow_dirty)
    setup(threads)
    with err_console.status("benchmarking ...") as spinner:
        record = run_ray_bench(spec, progress=lambda message: spinner.update(message))
    for name, variant in record["variants"].items():
        if "ray_start_seconds" in variant:
            typer.echo(f"{name}: Ray started in {variant['ray_start_seconds']:.1f} s, replicas ready in "
                       f"{variant['replicas_ready_seconds']:.1f} s (listening after {variant['listening_after_seconds']:.1f} s)")
    for row in record["summary"]:
        typer.echo(f"{row['variant']:>6} {row['sessions']:>3} sessions: {row['steps_per_second']:6.1f} steps/s "
                   f"(range {row['steps_per_second_range'][0]:.1f}-{row['steps_per_second_range'][1]:.1f}), "
                   f"p50 {row['p50_step_ms']} ms, p99 {row['p99_step_ms']} ms, {row['errors']} errors")
    json_path, png_path = save_ray_bench(record, out, result_stem("ray-trunk", model, cuts, threads))
    typer.echo(f"wrote {json_path} and {png_path}")
    if not record["passed"]:
        raise typer.Exit(1)




@app.command("diffusion")
def diffusion(
    model: str = typer.Option("fashion-mnist-diffusion", "--model", "-m", help="Registered diffusion model or local "
                              "diffusers directory."),
    quick: bool = typer.Option(False, "--quick", help="2 prompts and quick attacks (minutes, not a quarter of an hour)."),
    out: Path = typer.Option(Path("benchmarks/results"), "--out", help="Folder for the records (JSONL), summary (JSON) "
                             "and plots (PNG)."),
    allow_dirty: bool = allow_dirty_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """Λ-split diffusion: bytes per step and picture quality against wire bits (fp32, fp16, bf16, int8) for every
    placement and cut, the leakage of each placement (prompt recovery, SSIM of the cloud's best reconstruction per
    step), and sample quality by our Fashion-MNIST classifier."""
    from splitveil.experiments.diffusion_bench import run_diffusion_bench

    stamp_run(allow_dirty)
    setup(threads)
    with err_console.status("generating, attacking, plotting ..."):
        written = run_diffusion_bench(model, out, quick=quick)
    typer.echo("wrote " + ", ".join(str(p) for p in written))


@app.command("dealer")
def dealer(
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", min=1, help="Tokens per generation."),
    pairs: int = typer.Option(2, "--pairs", min=1, help="Alternating repeats (unsplit, dealer fused, dealer --fuse off, "
                              "device) per configuration."),
    models: str = typer.Option("smollm2-135m,llama-1b", "--models", help="Which of the default configurations to run: "
                               "smollm2-135m (--split 0,30 and 2,28, beside --fuse off and --dealer device) and "
                               "llama-1b (random weights of Llama-3.2-1B's shape, --split 0,16, beside --fuse off; "
                               "costs only)."),
    out: Path = typer.Option(Path("benchmarks/results"), "--out", help="Folder for the JSON record and PNG plot."),
    allow_dirty: bool = allow_dirty_option(),
) -> None:
    """What SLIP's prompt deployment with a mask dealer costs the device: CPU per decode token, model weights held
    and peak RSS against the unsplit model on the device (beside the dealer with `--fuse off` and `--dealer device`),
    each generation in its own process, alternating, after one unrecorded warm-up per deployment. Trust assumption: the dealer and the executor do not collude."""
    from splitveil.core.errors import ConfigError
    from splitveil.experiments.dealer_cost import (
        DEFAULT_CASES,
        KIND_LABELS,
        DealerBenchSpec,
        run_dealer_bench,
        save_dealer_bench,
    )

    wanted = [name.strip() for name in models.split(",") if name.strip()]
    known = sorted({case.model for case in DEFAULT_CASES})
    if not wanted or any(name not in known for name in wanted):
        raise ConfigError(f"bad --models {models!r}: choose from {', '.join(known)}")
    spec = DealerBenchSpec(cases=tuple(case for case in DEFAULT_CASES if case.model in wanted),
                           max_new_tokens=max_new_tokens, pairs=pairs)
    stamp_run(allow_dirty)
    with err_console.status("benchmarking ...") as spinner:
        record = run_dealer_bench(spec, progress=lambda message: spinner.update(message))
    for row in record["rows"]:
        for kind, summary in row["summary"].items():
            typer.echo(f"{row['label']}, {KIND_LABELS[kind](summary)}: device CPU per "
                       f"decode token {summary['cpu_per_decode_token_ratio']:.3f} of the unsplit model's "
                       f"({summary['cpu_seconds_per_decode_token'] * 1000:.1f} vs "
                       f"{summary['unsplit_cpu_seconds_per_decode_token'] * 1000:.1f} ms), weights held "
                       f"{summary['weight_bytes_ratio']:.3f}, peak RSS {summary['peak_rss_ratio']:.3f}, tokens identical: "
                       f"{'yes' if summary['same_tokens'] else 'NO'}")
    json_path, png_path = save_dealer_bench(record, out)
    typer.echo(f"wrote {json_path} and {png_path} (trust assumption: the dealer and the executor do not collude)")


@app.command("link")
def link(
    deployments: str = typer.Option("split,slip", "--deployments", help="split (the plain Λ-split against `splitveil "
                                    "serve`) and/or slip (SLIP's prompt deployment with its executor and mask dealer)."),
    rtts: str = typer.Option("0,20,80,150", "--rtts", help="Round-trip times swept at the first bandwidth (ms)."),
    bandwidths: str = typer.Option("1000,50,10", "--bandwidths", help="Bandwidths (Mbit/s): the first for the RTT "
                                   "sweep, the rest swept at 80 ms."),
    slip_rtts: str = typer.Option("0,20,80", "--slip-rtts", help="RTTs for slip (54 round trips a pass with fused "
                                  "groups, 105 with --fuse off: each 80 ms condition takes minutes)."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n", min=1, help="Tokens per generation (split)."),
    slip_max_new_tokens: int = typer.Option(16, "--slip-max-new-tokens", min=1, help="Tokens per generation (slip)."),
    speculate: str = typer.Option("prompt-lookup", "--speculate", help="The drafter compared with sequential "
                                  "decoding: prompt-lookup or self."),
    draft_tokens: int = typer.Option(3, "--draft-tokens", min=1, max=64, help="The most drafts a pass verifies."),
    draft_policy: str = typer.Option("adaptive", "--draft-policy", help="adaptive (as many drafts as pay, measured) "
                                     "or fixed (every draft found, up to --draft-tokens)."),
    pairs: int = typer.Option(1, "--pairs", min=1, help="Alternating (sequential, speculative) repeats per prompt."),
    out: Path = typer.Option(Path("benchmarks/results"), "--out", help="Folder for the JSON record and PNG plot."),
    allow_dirty: bool = allow_dirty_option(),
) -> None:
    """Tokens per second over an emulated network (`splitveil link` in process): sequential against speculative
    decoding, across RTTs and bandwidths, on three kinds of prompt (chat, summary, rewrite), for the plain Λ-split
    and SLIP's prompt deployment. Trust assumption (slip): the dealer and the executor do not collude."""
    from splitveil.cli.common import name_list
    from splitveil.core.errors import ConfigError
    from splitveil.experiments.link_bench import LinkBenchSpec, run_link_bench, save_link_bench

    if speculate == "off":
        raise ConfigError("--speculate names the drafter compared with sequential decoding: prompt-lookup or self")
    spec = LinkBenchSpec(deployments=tuple(name_list(deployments)), rtts=tuple(int_list(rtts, "--rtts", "RTTs in ms")),
                         bandwidths=tuple(int_list(bandwidths, "--bandwidths", "bandwidths in Mbit/s")),
                         slip_rtts=tuple(int_list(slip_rtts, "--slip-rtts", "RTTs in ms")),
                         max_new_tokens=max_new_tokens, slip_max_new_tokens=slip_max_new_tokens, drafter=speculate,
                         draft_tokens=draft_tokens, draft_policy=draft_policy, pairs=pairs)
    from splitveil.edge.generate import GenerationConfig

    GenerationConfig(speculate=speculate, draft_policy=draft_policy)  # bad names: one line, before anything starts
    stamp_run(allow_dirty)
    with err_console.status("benchmarking ...") as spinner:
        record = run_link_bench(spec, progress=lambda message: spinner.update(message))
    for row in record["rows"]:
        typer.echo(f"{row['deployment']}, {row['rtt_ms']:g} ms, {row['bandwidth_mbit']:g} Mbit/s, {row['prompt']}: "
                   f"sequential {row['sequential_tokens_per_second']:.2f} tok/s, speculative "
                   f"{row['speculative_tokens_per_second']:.2f} ({row['speedup']:.2f}x, {row['tokens_per_pass']:.2f} "
                   f"tokens per pass), tokens identical: {'yes' if row['same_tokens'] else 'NO'}")
    for deployment, target in record["targets"].items():
        typer.echo(f"target at 80 ms ({deployment}): summary/rewrite >= 1.5x: "
                   f"{'met' if target['copy_prompts_met'] else 'NOT met'}; chat >= 1.0x: "
                   f"{'met' if target['chat_met'] else 'NOT met'} ({target['speedups']})")
    json_path, png_path = save_link_bench(record, out)
    typer.echo(f"wrote {json_path} and {png_path}")


@app.command("edge")
def edge(
    streams: str = typer.Option("1,8,32", "--streams", help="Concurrent streams to measure (comma-separated)."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1, help="Tokens each streamed completion asks for."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Measured rounds per level (levels alternating); each "
                               "level reports its median round."),
    out: Path = typer.Option(Path("benchmarks/results"), "--out", help="Folder for the JSON record and PNG plot."),
    allow_dirty: bool = allow_dirty_option(),
) -> None:
    """Concurrent streams through the OpenAI edge (`splitveil edge --server`, in front of `splitveil serve`), with the
    official `openai` client, streaming: total and per-stream tokens per second and time to first token."""
    from splitveil.experiments.edge_bench import EdgeBenchSpec, run_edge_bench, save_edge_bench

    spec = EdgeBenchSpec(streams=tuple(int_list(streams, "--streams", "stream counts like 1,8,32")), max_tokens=max_tokens,
                         rounds=rounds)
    stamp_run(allow_dirty)
    with err_console.status("benchmarking ...") as spinner:
        record = run_edge_bench(spec, progress=lambda message: spinner.update(message))
    for row in record["rows"]:
        typer.echo(f"{row['streams']} stream(s): {row['total_tokens_per_second']:.1f} tok/s in total "
                   f"({row['total_speedup_over_one_stream']:.2f}x one stream), {row['per_stream_tokens_per_second_median']:.2f} "
                   f"per stream, time to first token {row['ttft_seconds_median']:.2f} s (median); rounds: "
                   f"{', '.join(f'{x:.1f}' for x in row['rounds_total_tokens_per_second'])} tok/s")
    if record["target"]["total_speedup"] is not None:
        typer.echo(f"target (8 streams >= 3x one stream's total): {'met' if record['target']['met'] else 'NOT met'} "
                   f"({record['target']['total_speedup']:.2f}x)")
    json_path, png_path = save_edge_bench(record, out)
    typer.echo(f"wrote {json_path} and {png_path}")


@app.command("gpu")
def gpu(
    model: str = typer.Option("llama-1b", "--model", "-m", help="A dummy shape (llama-1b, llama-8b) with --load-format "
                              "dummy, or a real model with --load-format auto."),
    load_format: str = typer.Option("dummy", "--load-format", help="dummy (random weights; cost figures only) or auto."),
    split: str = typer.Option("2,14", "--split", "-s", help="Λ cuts A,B: the trunk is layers A..B-1."),
    device: str = typer.Option("cuda", "--device", help="cuda (default), cuda:N, auto, or cpu for the CPU figures."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="float32, bfloat16 or float16."),
    sessions: str = typer.Option("1,16,64", "--sessions", help="Session counts of the batched trunk steps."),
    decode_tokens: int = typer.Option(64, "--decode-tokens", min=2, help="Tokens per batch-1 generation."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", min=1, help="Prompt length of the batch-1 decode (the "
                                      "prefill measurement uses 4x)."),
    context: int = typer.Option(256, "--context", min=1, help="Positions each session holds before the timed steps."),
    steps: int = typer.Option(32, "--steps", min=1, help="Timed trunk steps per repeat."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Repeats per measurement (medians reported)."),
    out: Path = typer.Option(Path("benchmarks/results"), "--out", help="Folder for the JSON record and PNG plot."),
    allow_dirty: bool = allow_dirty_option(),
    threads: int = typer.Option(1, "--threads", help="Torch CPU threads."),
) -> None:
    """The cloud's side on an accelerator: our split's batch-1 decode against transformers' generate on the same
    device and dtype, batched trunk steps at 1/16/64 sessions, prefill, SLIP's masked products against the plain
    product, and KV memory per session. Without a CUDA GPU it says so and stops (exit 0); --device cpu measures
    the same on the CPU."""
    import torch

    from splitveil.experiments.gpu_bench import GpuBenchSpec, check_spec, run_gpu_bench, save_gpu_bench
    from splitveil.models.precision import torch_dtype
    from splitveil.plan.plan import parse_cuts

    torch_dtype(dtype)
    if device.strip().lower().startswith("cuda") and not torch.cuda.is_available():
        typer.echo("bench gpu: skipped: this machine has no CUDA GPU (torch sees none). Run benchmarks/device/run.sh "
                   "on a GPU machine, or pass --device cpu for the CPU figures.")
        return
    cuts = parse_cuts(split)
    if len(cuts) != 2:
        raise ConfigError("bench gpu measures a Λ-split: give --split A,B")
    spec = GpuBenchSpec(model=model, load_format=load_format, cuts=cuts, device=device, dtype=dtype,
                        sessions=tuple(int_list(sessions, "--sessions", "session counts like 1,16,64")),
                        decode_tokens=decode_tokens, prompt_tokens=prompt_tokens, context=context, steps=steps,
                        repeats=repeats)
    check_spec(spec)
    stamp_run(allow_dirty)
    setup(threads)
    with err_console.status("benchmarking ...") as spinner:
        record = run_gpu_bench(spec, progress=lambda message: spinner.update(message))
    decode, verdict = record["decode_batch1"], record["verdict"]
    typer.echo(f"{record['device_name']}, {record['dtype']}, {model}: decode at batch 1 {decode['ours_median']:.1f} "
               f"tok/s (ours) vs {decode['transformers_median']:.1f} (transformers generate): {decode['ratio']:.2f}x "
               f"(target >= 0.9: {'met' if verdict['batch1_met'] else 'NOT met'}); tokens identical: "
               f"{decode['tokens_identical']}")
    for row in record["trunk_steps"]:
        typer.echo(f"  trunk, {row['sessions']:>3} session(s): {row['steps_per_second']:.1f} steps/s in all")
    if verdict["sessions64_vs_one"] is not None:
        typer.echo(f"  64 sessions / 1: {verdict['sessions64_vs_one']:.1f}x (target >= 10: "
                   f"{'met' if verdict['sessions64_met'] else 'NOT met'})")
    typer.echo(f"  prefill of {record['prefill']['prompt_tokens']} tokens: {record['prefill']['ratio']:.2f}x transformers")
    for row in record["masked_products"]:
        typer.echo(f"  SLIP masked product, {row['positions']} position(s) of {row['shape'][0]}x{row['shape'][1]}: "
                   f"{row['masked_rows_per_second']:.1f} rows/s, plain {record['dtype']} {row['plain_rows_per_second']:.1f} "
                   f"({row['plain_over_masked']:.1f}x faster)")
    memory = record["memory_per_session"]
    typer.echo(f"  KV memory per session at {memory['context']} positions: {memory['kv_bytes_per_session'] / 2**20:.1f} MiB")
    slug = "".join(c if c.isalnum() else "-" for c in record["device_name"].lower()).strip("-")
    stem = f"gpu_{Path(model).name}_split-{cuts[0]}-{cuts[1]}_{slug}_{record['dtype']}"
    json_path, png_path = save_gpu_bench(record, out, stem)
    typer.echo(f"wrote {json_path} and {png_path}")
