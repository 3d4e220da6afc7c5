"""`splitveil bench ...`: benchmarks that compare ratios in one run and write JSON + PNG."""

from __future__ import annotations

from pathlib import Path

import typer

from splitveil.cli.common import err_console, setup

app = typer.Typer(help="Benchmarks: ratios measured in one run, written as JSON + PNG under benchmarks/results/.",
                  no_args_is_help=True)


@app.command("llm")
def llm(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registered model name or local model directory."),
    split: str = typer.Option("2,28", "--split", "-s", help="Cuts, as for `generate` (A,B = Λ-split)."),
    tokens: int = typer.Option(128, "--tokens", min=2, help="New tokens per run (end-of-sequence ignored)."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Runs per variant, alternating; medians are reported."),
    out: Path = typer.Option(Path("benchmarks/results"), "--out", help="Folder for the JSON record and PNG plot."),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """Decode tokens/s of the in-process split (fp32 and fp16 wires) against the unsplit model."""
    from rich.progress import Progress

    from splitveil.experiments.bench_llm import LLMBenchSpec, run_llm_bench, save_llm_bench
    from splitveil.plan.plan import parse_cuts

    spec = LLMBenchSpec(model=model, cuts=parse_cuts(split), tokens=tokens, repeats=repeats)
    setup(threads)
    total = repeats * (1 + len(spec.wires))
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("benchmark runs", total=total)
        record = run_llm_bench(spec, progress=lambda name, repeat: progress.advance(task))
    stem = f"llm-decode_{Path(model).name}_split-{'-'.join(map(str, spec.cuts))}_cpu-{threads}thread"
    json_path, png_path = save_llm_bench(record, out, stem)
    for name, row in record["summary"].items():
        up, down = row["bytes_per_decode_step"]["up"], row["bytes_per_decode_step"]["down"]
        wire = f", {up:.0f} B up / {down:.0f} B down per step" if up else ""
        typer.echo(f"{name:12s} {row['median_decode_tokens_per_second']:6.2f} tok/s  ratio {row['ratio_to_unsplit']:.3f}  "
                   f"identical tokens: {row['identical_tokens_to_unsplit']}, max |logit diff| "
                   f"{row['max_abs_logit_difference']:.4f}{wire}")
    typer.echo(f"wrote {json_path} and {png_path}")
