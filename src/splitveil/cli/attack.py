"""`splitveil attack ...`: measure what a split leaks, with real attacks."""

from __future__ import annotations

from pathlib import Path

import typer

from splitveil.cli.common import err_console, print_json, setup
from splitveil.core.errors import ConfigError

app = typer.Typer(help="Attacks that measure what a split leaks.", no_args_is_help=True)


@app.command("text")
def text(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registered model name or local model directory."),
    split: str = typer.Option("2,28", "--split", "-s", help="Λ-split cuts A,B: the cloud sees the states after A layers."),
    attack: str = typer.Option("exact", "--attack", "-a", help="nearest (embedding lookup), exact (sequential inversion "
                               "through the public head) or learned (a readout trained on auxiliary text, the Debian "
                               "fortunes corpus)."),
    prompts: Path = typer.Option(None, "--prompts", help="File with one prompt per line (default: a built-in set of 6)."),
    wire: str = typer.Option("fp32", "--wire", help="Codec of the states the cloud receives: fp32, fp16 or bf16."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1, help="Answer tokens generated and read back."),
    defence: str = typer.Option(None, "--defence", help="Defend the uplink on the device first: noise (Gaussian, "
                                "std = strength x each position's RMS) or permute (secret permutation of the hidden "
                                "dimensions; the cloud runs a permuted trunk). The attack adapts to it."),
    strength: float = typer.Option(0.0, "--strength", min=0.0, help="The defence's strength (0 = identity)."),
    quick: bool = typer.Option(False, "--quick", help="At most 3 prompts and 8 answer tokens."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object (token_recovery, prompt_exact, "
                                     "answer_recovery, examples, ...)."),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """How much of the prompt (uplink) and of the answer (downlink) the cloud reads, for one cut."""
    from splitveil.attack.text.attacks import TEXT_ATTACKS
    from splitveil.experiments.text_privacy import EVALUATION_PROMPTS, TextAttackSpec, run_text_attack
    from splitveil.plan.plan import parse_cuts
    from splitveil.wire.codecs import FLOAT_CODECS

    cuts = parse_cuts(split)
    if len(cuts) != 2:
        raise ConfigError("text attacks target a Λ-split: give --split A,B")
    TEXT_ATTACKS.get(attack)  # unknown names fail here, listing the known ones
    if defence is not None:
        from splitveil.protect.cut import CUT_DEFENCES

        CUT_DEFENCES.get(defence)
    if wire not in FLOAT_CODECS:
        raise ConfigError(f"unknown --wire {wire!r}; use one of {', '.join(FLOAT_CODECS)}")
    if prompts is not None:
        try:
            lines = [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
        except OSError as error:
            raise ConfigError(f"cannot read --prompts {prompts}: {error.strerror or error}") from None
        if not lines:
            raise ConfigError(f"--prompts {prompts} holds no prompt (one per line)")
    else:
        lines = list(EVALUATION_PROMPTS)
    if quick:
        lines, max_new_tokens = lines[:3], min(max_new_tokens, 8)
    spec = TextAttackSpec(model=model, cuts=cuts, attack=attack, wire=wire, max_new_tokens=max_new_tokens,
                          defence=defence, strength=strength, **({"aux_chars": 100_000, "learned_steps": 600} if quick else {}))
    setup(threads)
    with err_console.status(f"{attack} attack on {len(lines)} prompt(s) ...") as spinner:
        record = run_text_attack(spec, lines, progress=lambda done, total: spinner.update(f"{attack} attack: {done}/{total} prompts"))
    if json_output:
        print_json(record)
        return
    typer.echo(f"{attack} attack on the uplink of Λ-split {cuts[0]},{cuts[1]} ({wire} wire), {len(lines)} prompt(s):")
    typer.echo(f"  prompt token recovery {record['token_recovery']:.3f}, prompts recovered exactly {record['prompt_exact']:.2f}, "
               f"token F1 {record['token_f1']:.3f}, {record['seconds_per_token']:.2f} s per token")
    typer.echo(f"  answer read from the downlink through the public tail: {record['answer_recovery']:.3f} of its tokens")
    if record["defence"]:
        typer.echo(f"  defence {defence} at strength {strength:g}: greedy tokens equal to the undefended split "
                   f"{record['utility_greedy_match']:.3f}; the cloud holds {record['defence']['cloud_holds']}")
    for example in record["examples"]:
        typer.echo(f"  - sent     : {example['prompt']}")
        typer.echo(f"    recovered: {example['recovered']}")


@app.command("text-sweep")
def text_sweep(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registered model name or local model directory."),
    depths: str = typer.Option("0,1,2,4,8,15", "--depths", help="Head depths A of the Λ-splits A,B to attack."),
    tail_start: int = typer.Option(28, "--tail-start", help="B: where the tail starts (same for every depth)."),
    attacks: str = typer.Option("nearest,exact", "--attacks", help="Attacks to run at every depth."),
    prompts: Path = typer.Option(None, "--prompts", help="One prompt per line (default: the built-in set)."),
    wire: str = typer.Option("fp32", "--wire", help="fp32, fp16 or bf16."),
    quick: bool = typer.Option(False, "--quick", help="At most 3 prompts and 8 answer tokens per run."),
    out: Path = typer.Option(Path("benchmarks/results"), "--out", help="Folder for the records, plot and report."),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """Recovery against head depth for each attack: records (JSONL), a PNG plot and a Markdown report."""
    from splitveil.attack.text.attacks import TEXT_ATTACKS
    from splitveil.experiments.text_privacy import EVALUATION_PROMPTS, TextAttackSpec, run_text_attack, write_text_report

    try:
        levels = [int(d) for d in depths.split(",")]
    except ValueError:
        raise ConfigError(f"bad --depths {depths!r}: give layer counts like 1,2,4") from None
    names = [a.strip() for a in attacks.split(",") if a.strip()]
    for name in names:
        TEXT_ATTACKS.get(name)
    if any(not 0 <= d < tail_start for d in levels):
        raise ConfigError(f"every depth must be in 0..{tail_start - 1} (before the tail starts)")
    lines = list(EVALUATION_PROMPTS)
    if prompts is not None:
        try:
            lines = [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
        except OSError as error:
            raise ConfigError(f"cannot read --prompts {prompts}: {error.strerror or error}") from None
    new_tokens = 24
    if quick:
        lines, new_tokens = lines[:3], 8
    setup(threads)
    records = []
    with err_console.status("sweep ...") as spinner:
        for name in names:
            for depth in levels:
                spinner.update(f"{name} attack at depth {depth}")
                spec = TextAttackSpec(model=model, cuts=(depth, tail_start), attack=name, wire=wire, max_new_tokens=new_tokens)
                records.append(run_text_attack(spec, lines))
                typer.echo(f"{name:8s} depth {depth:2d}: prompt token recovery {records[-1]['token_recovery']:.3f}, "
                           f"answer {records[-1]['answer_recovery']:.3f}")
    paths = write_text_report(records, out, f"text-privacy_{Path(model).name}_{wire}{'_quick' if quick else ''}")
    typer.echo("wrote " + ", ".join(str(p) for p in paths))
