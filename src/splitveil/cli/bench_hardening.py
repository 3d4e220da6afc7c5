"""`splitveil bench fuzz` and `splitveil bench load`: hostile peers against any of our servers (`--target`), and many
sessions against a real `splitveil serve`."""

from __future__ import annotations

from pathlib import Path

import typer

from splitveil.cli.bench import app
from splitveil.cli.common import allow_dirty_option, err_console, name_list, result_stem, setup, stamp_run
from splitveil.core.errors import ConfigError
from splitveil.plan.plan import DEFAULT_LM_SPLIT

DEFAULT_OUT = Path("benchmarks/results")


def _lambda_cuts(split: str) -> tuple[int, int]:
    from splitveil.plan.plan import parse_cuts

    cuts = parse_cuts(split)
    if len(cuts) != 2:
        raise ConfigError(f"this benchmark needs a Λ-split: --split A,B (got {split!r})")
    return cuts


@app.command("fuzz")
def fuzz(
    target: str = typer.Option("serve", "--target", help="The server attacked: serve, enclave (serve --enclave: relay and "
                               "trusted executor), slip (slip serve), accelerator (of partition run) or edge (the "
                               "OpenAI-compatible `splitveil edge`)."),
    model: str = typer.Option(None, "--model", "-m", help="Registered model name or local model directory (default: "
                              "smollm2-135m; the accelerator's CNN: vgg)."),
    split: str = typer.Option(None, "--split", "-s", help="Λ-split cuts A,B (serve, enclave, edge; default 2,28) or the "
                              "accelerator's cut P (default 5); slip takes none."),
    dataset: str = typer.Option(None, "--dataset", "-d", help="The accelerator's CNN data set (default fashion-mnist)."),
    messages: int = typer.Option(20000, "--messages", help="Hostile messages to send (at least)."),
    workers: int = typer.Option(4, "--workers", help="Hostile connections at a time."),
    seed: int = typer.Option(0, "--seed", help="Seed of the case generators (case i of a seed can be replayed alone)."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for any one answer before calling it a hang."),
    categories: str = typer.Option("", "--categories", help="Comma-separated fuzz categories (default: all)."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder for the JSON record and PNG plot."),
    allow_dirty: bool = allow_dirty_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads in this process."),
) -> None:
    """Hostile messages to a real server while an honest client (the bystander) works; counts per category."""
    from splitveil.harness.fuzz_service import FuzzBenchSpec, run_fuzz_bench, save_fuzz_bench
    from splitveil.harness.fuzz_targets import TARGETS
    from splitveil.plan.plan import parse_cuts

    chosen = TARGETS.get(target)  # an unknown name: one line listing the known ones
    model = model or chosen.model
    split = chosen.split if split is None else split
    if target == "slip":
        if split:
            raise ConfigError("--target slip protects every layer (the weights deployment): drop --split")
        cuts: tuple[int, ...] = ()
    elif target == "accelerator":
        cuts = parse_cuts(split)
        if len(cuts) != 1:
            raise ConfigError(f"--target accelerator takes one cut: --split P (got {split!r})")
    else:
        cuts = _lambda_cuts(split)
    if dataset is not None and target != "accelerator":
        raise ConfigError("--dataset goes with --target accelerator")
    if messages < 1 or workers < 1 or timeout <= 0:
        raise ConfigError("--messages and --workers must be at least 1 and --timeout positive")
    names = tuple(name_list(categories))
    for name in names:
        chosen.categories().get(name)  # an unknown name: one line listing the target's categories
    spec = FuzzBenchSpec(model=model, cuts=cuts, messages=messages, workers=workers, seed=seed, timeout_seconds=timeout,
                         categories=names, target=target, dataset=(dataset or chosen.dataset) if target == "accelerator" else "")
    stamp_run(allow_dirty)
    setup(threads)
    from rich.progress import Progress

    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("hostile messages", total=messages)
        record = run_fuzz_bench(spec, progress=lambda done, total: progress.update(task, completed=done))
    kind = "fuzz" if target == "serve" else f"fuzz-{target}"
    json_path, png_path = save_fuzz_bench(record, out, result_stem(kind, model, cuts, threads))
    summary, bystander, rss = record["summary"], record["bystander"], record["rss"]
    typer.echo(f"{target}: {summary['messages_sent']} hostile messages in {record['seconds']:.0f} s: {summary['error_frames']} ERROR "
               f"frames ({summary['clean_closes_after_error']} then closed), {summary['valid_results']} valid RESULTs, "
               f"{summary['closed_1009_oversize']} closed as over twice the limit, {summary['http_4xx']} HTTP 4xx, "
               f"{summary['http_2xx']} HTTP 2xx")
    typer.echo(f"failures: {summary['total_failures']} ({', '.join(f'{k} {v}' for k, v in summary['failures'].items() if v) or 'none'}); "
               f"unhandled paths {summary['unhandled_paths']}, hangs {summary['hangs']}, server tracebacks {summary['server_log_tracebacks']}")
    typer.echo(f"bystander: {bystander['generations']} generations, identical to unsplit: {bystander['identical_to_unsplit']}; "
               f"server RSS {rss.get('start_mib', 0):.0f} -> peak {rss.get('peak_mib', 0):.0f} MiB, bounded: {rss['bounded']}")
    for reproducer in record["reproducers"][:5]:
        typer.echo(f"  {reproducer['category']}: {reproducer['failure']}: {reproducer['detail'][:160]}")
    typer.echo(f"wrote {json_path} and {png_path}")
    if not record["passed"]:
        raise typer.Exit(1)


@app.command("load")
def load(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registered model name or local model directory."),
    split: str = typer.Option(DEFAULT_LM_SPLIT, "--split", "-s", help="Λ-split cuts (A,B); the server runs the trunk."),
    sessions: int = typer.Option(64, "--sessions", help="Concurrent sessions in the steady phase."),
    seconds: float = typer.Option(60.0, "--seconds", help="Measured seconds of the steady phase (after --warmup)."),
    warmup: float = typer.Option(5.0, "--warmup", help="Seconds before the measured window."),
    restart_clients: int = typer.Option(64, "--restart-clients", help="Real split clients generating through the SIGKILL and restart (0: skip)."),
    restart_tokens: int = typer.Option(24, "--restart-tokens", help="Tokens each restart client generates."),
    hold: bool = typer.Option(True, "--hold/--no-hold", help="Restart clients pause before their 10th frame until the kill, "
                              "so that every session is live at the SIGKILL (--no-hold: the kill comes when the last gets there)."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder for the JSON record and PNG plot."),
    allow_dirty: bool = allow_dirty_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads in this process."),
) -> None:
    """Many sessions for a while over TLS (latency, steps/s, RSS), then a SIGKILL and restart under real clients."""
    from splitveil.harness.load_service import LoadBenchSpec, run_load_bench, save_load_bench

    cuts = _lambda_cuts(split)
    if sessions < 1 or seconds <= 0 or warmup < 0 or restart_clients < 0 or restart_tokens < 2:
        raise ConfigError("--sessions must be at least 1, --seconds positive, --warmup and --restart-clients not negative, "
                          "--restart-tokens at least 2")
    spec = LoadBenchSpec(model=model, cuts=cuts, sessions=sessions, seconds=seconds, warmup_seconds=warmup,
                         restart_clients=restart_clients, restart_tokens=restart_tokens, hold_at_kill=hold)
    stamp_run(allow_dirty)
    setup(threads)
    from rich.progress import Progress

    with Progress(console=err_console, transient=True) as progress:
        tasks: dict[str, int] = {}

        def show(stage: str, done: float, total: float) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        record = run_load_bench(spec, progress=show)
    json_path, png_path = save_load_bench(record, out, result_stem("load", model, cuts, threads))
    steady, rss = record["load"], record["rss"]
    typer.echo(f"{steady['sessions']} sessions for {steady['seconds']:g} s over TLS: {steady['steps_per_second']:.1f} steps/s, "
               f"p50 {steady['p50_step_ms']:.0f} ms, p99 {steady['p99_step_ms']:.0f} ms per step, {steady['error_count']} errors, "
               f"max relative difference to the in-process trunk {steady['max_relative_difference_to_inprocess_trunk']:.2e}")
    typer.echo(f"server RSS {rss['start_mib']:.0f} -> peak {rss['peak_mib']:.0f} MiB (bounded: {rss['bounded']})")
    if "restart" in record:
        restart = record["restart"]
        typer.echo(f"SIGKILL + restart under {restart['clients']} clients ({restart['clients'] - restart['finished_before_kill']} "
                   f"mid-generation at the kill): {sum(restart['identical_to_unsplit'])}/{restart['clients']} identical to unsplit, "
                   f"recoveries {sum(restart['recoveries'])}, errors {restart['error_count']}")
    typer.echo(f"wrote {json_path} and {png_path}")
    if not record["passed"]:
        raise typer.Exit(1)
