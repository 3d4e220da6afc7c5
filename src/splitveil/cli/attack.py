"""`splitveil attack ...`: measure what a split leaks, with real attacks."""

from __future__ import annotations

from pathlib import Path

import typer

from splitveil.cli.common import (allow_dirty_option, err_console, int_list, name_list, print_json, progress, setup,
                                  stamp_run)
from splitveil.core.errors import ConfigError
from splitveil.plan.plan import DEFAULT_LM_SPLIT

app = typer.Typer(help="Attacks that measure what a split leaks.", no_args_is_help=True)


@app.command("text")
def text(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registered model name or local model directory."),
    split: str = typer.Option(DEFAULT_LM_SPLIT, "--split", "-s", help="Λ-split cuts A,B: the cloud sees the states after A layers."),
    attack: str = typer.Option("exact", "--attack", "-a", help="nearest (embedding lookup), exact (sequential inversion "
                               "through the public head) or learned (a readout trained on auxiliary text, the Debian "
                               "fortunes corpus)."),
    prompts: Path = typer.Option(None, "--prompts", help="File with one prompt per line (default: a built-in set of 6)."),
    wire: str = typer.Option("fp32", "--wire", help="Codec of the states the cloud receives: fp32, fp16 or bf16."),
    ranker: str = typer.Option(None, "--ranker", help="exact attack only: learned = order the candidates with a readout "
                               "trained on auxiliary text (faster at deep cuts; every token is still verified)."),

    max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1, help="Answer tokens generated and read back."),
    defence: str = typer.Option(None, "--defence", help="A text protection of `splitveil protections`: none, noise "
                                "(Gaussian, std = strength x each position's RMS), permute (secret permutation of the "
                                "hidden dimensions; the cloud runs a permuted trunk), randcut (the cut moved "
                                "0..strength layers deeper by a per-session secret), slip (SLIP's prompt deployment: "
                                "the trunk's linear layers computed by an executor process on one-time-masked "
                                "fixed-point inputs; its logged view is attacked) or enclave (the trunk in a trusted "
                                "executor, SIMULATED attestation; the operator's relayed bytes are attacked). The "
                                "attack adapts to it."),
    strength: float = typer.Option(0.0, "--strength", min=0.0, help="The defence's strength (0 = identity; randcut: "
                                   "a whole number of layers; slip: the secure rank k, 0 for public weights)."),
    quick: bool = typer.Option(False, "--quick", help="At most 3 prompts and 8 answer tokens; the "
                               "learned readout reads a third of the auxiliary text and still trains to convergence."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object (token_recovery, prompt_exact, "
                                     "answer_recovery, examples, ...)."),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """How much of the prompt (uplink) and of the answer (downlink) the cloud reads, for one cut."""
    from splitveil.attack.text.attacks import TEXT_ATTACKS
    from splitveil.experiments.text_privacy import TextAttackSpec, run_text_attack
    from splitveil.plan.plan import parse_cuts
    from splitveil.wire.codecs import FLOAT_CODECS

    cuts = parse_cuts(split)
    if len(cuts) != 2:
        raise ConfigError("text attacks target a Λ-split: give --split A,B")
    TEXT_ATTACKS.get(attack)  # unknown names fail here, listing the known ones
    if defence == "none":  # the plain Λ-split, as without --defence
        if strength:
            raise ConfigError("--defence none has no strength: drop --strength")
        defence = None
    if defence is not None:
        _check_defence(defence, strength, cuts)
    if wire not in FLOAT_CODECS:
        raise ConfigError(f"unknown --wire {wire!r}; use one of {', '.join(FLOAT_CODECS)}")
    lines = _read_prompts(prompts)
    if quick:
        lines, max_new_tokens = lines[:3], min(max_new_tokens, 8)
    spec = TextAttackSpec(model=model, cuts=cuts, attack=attack, wire=wire, max_new_tokens=max_new_tokens,
                          defence=defence, strength=strength, ranker=_check_ranker(ranker, attack),
                          **({"aux_chars": 100_000} if quick else {}))
    setup(threads)
    with err_console.status(f"{attack} attack on {len(lines)} prompt(s) ...") as spinner:
        record = run_text_attack(spec, lines, progress=lambda done, total: spinner.update(f"{attack} attack: {done}/{total} prompts"))
    if json_output:
        print_json(record)
        return
    _print_record(record, cuts, wire, defence, strength)


def _print_record(record: dict, cuts, wire: str, defence: str | None, strength: float) -> None:
    attack, examples = record["spec"]["attack"], record["examples"]
    typer.echo(f"{attack} attack on the uplink of Λ-split {cuts[0]},{cuts[1]} ({wire} wire), {len(examples)} prompt(s):")
    typer.echo(f"  prompt token recovery {record['token_recovery']:.3f}, prompts recovered exactly {record['prompt_exact']:.2f}, "
               f"token F1 {record['token_f1']:.3f}, {record['seconds_per_token']:.2f} s per token")
    typer.echo(f"  answer read from the downlink through the public tail: {record['answer_recovery']:.3f} of its tokens")
    if record["defence"]:
        typer.echo(f"  defence {defence} at strength {strength:g}: greedy tokens equal to the undefended split "
                   f"{record['utility_greedy_match']:.3f}; the cloud holds {record['defence']['cloud_holds']}")
        described = record["defence"]
        if "control_clear_view_token_recovery" in described:
            typer.echo(f"  the same attack on the rows before the defence hides them (an unmasked offload) recovers "
                       f"{described['control_clear_view_token_recovery']:.3f}")
        search = described.get("exact_search")
        if search:
            typer.echo(f"  exact search: {search['mean_verified_per_position']:.0f} candidates verified per position; "
                       f"closest candidate at relative distance {search['closest_relative_distance_min']:.3g} "
                       f"(match tolerance {search['tolerance']:g}); {search['positions_unmatchable']} of "
                       f"{search['positions']} positions proven unmatchable by the output bound")
        ppl = record.get("perplexity")
        if ppl:
            typer.echo(f"  held-out perplexity {ppl['defended']:.2f} defended vs {ppl['undefended']:.2f} undefended "
                       f"({ppl['tokens']} tokens)")
    for example in examples:
        typer.echo(f"  - sent     : {example['prompt']}")
        typer.echo(f"    recovered: {example['recovered']}")


def _read_prompts(path: Path | None) -> list[str]:
    """One prompt per line of `path`, or the built-in evaluation set."""
    from splitveil.experiments.text_privacy import EVALUATION_PROMPTS

    if path is None:
        return list(EVALUATION_PROMPTS)
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as error:
        raise ConfigError(f"cannot read --prompts {path}: {error.strerror or error}") from None
    if not lines:
        raise ConfigError(f"--prompts {path} holds no prompt (one per line)")
    return lines


def _check_defence(name: str, strength: float, cuts) -> None:
    """Fails before any model loads: an unknown defence, a bad strength, or a randomised cut that reaches the tail."""
    from splitveil.protect.text import deployment_for

    deployment_for(name).check(strength, tuple(cuts))


def _check_ranker(ranker: str | None, attack: str) -> str | None:
    if ranker is None:
        return None
    if ranker != "learned":
        raise ConfigError(f"unknown --ranker {ranker!r}; use learned (or leave it out: gradient ranking)")
    if attack != "exact":
        raise ConfigError("--ranker orders the exact attack's candidates: use it with --attack exact")
    return ranker


def _parse_defences(text: str) -> list[tuple[str, float]]:
    """"noise:0.1,permute:1" -> [("noise", 0.1), ("permute", 1.0)]."""
    pairs = []
    for item in filter(None, (piece.strip() for piece in text.split(","))):
        name, _, value = item.partition(":")
        try:
            pairs.append((name, float(value or 1.0)))
        except ValueError:
            raise ConfigError(f"bad --defences item {item!r}: use NAME:STRENGTH, like noise:0.1") from None
    return pairs


@app.command("text-sweep")
def text_sweep(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registered model name or local model directory."),
    depths: str = typer.Option("0,1,2,4,8,15", "--depths", help="Head depths A of the Λ-splits A,B to attack."),
    tail_start: int = typer.Option(28, "--tail-start", help="B: where the tail starts (same for every depth)."),
    attacks: str = typer.Option("nearest,exact", "--attacks", help="Attacks to run at every depth."),
    defences: str = typer.Option("", "--defences", help="Defences to measure at --defence-depth against each attack's "
                                 "adaptive version, as NAME:STRENGTH items, e.g. noise:0.1,noise:0.5,permute:1,randcut:2,slip:0."),
    defence_depth: int = typer.Option(2, "--defence-depth", help="Head depth at which the defences are measured."),
    prompts: Path = typer.Option(None, "--prompts", help="One prompt per line (default: the built-in set)."),
    wire: str = typer.Option("fp32", "--wire", help="fp32, fp16 or bf16."),
    ranker: str = typer.Option(None, "--ranker", help="exact attack only: learned = order the candidates with a readout "
                               "trained on auxiliary text (faster at deep cuts; every token is still verified)."),

    quick: bool = typer.Option(False, "--quick", help="At most 3 prompts and 8 answer tokens per run; "
                               "learned readouts read a third of the auxiliary text and still train to convergence."),
    out: Path = typer.Option(Path("benchmarks/results"), "--out", help="Folder for the records, plot and report."),
    append: bool = typer.Option(False, "--append", help="Merge into the existing records of the same report (a run "
                                "with the same settings replaces the old one), so a long sweep can run in pieces."),
    allow_dirty: bool = allow_dirty_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """Recovery against head depth for each attack, and each defence with its utility cost: records (JSONL), a PNG
    plot and a Markdown report."""
    import json
    from dataclasses import asdict

    from splitveil.attack.text.attacks import TEXT_ATTACKS
    from splitveil.experiments.text_privacy import TextAttackSpec, run_text_attack, write_text_report
    from splitveil.wire.codecs import FLOAT_CODECS

    levels = int_list(depths, "--depths", "layer counts like 1,2,4")
    names = name_list(attacks)
    for name in names:
        TEXT_ATTACKS.get(name)
    if any(not 0 <= d < tail_start for d in [*levels, defence_depth]):
        raise ConfigError(f"every depth must be in 0..{tail_start - 1} (before the tail starts)")
    if wire not in FLOAT_CODECS:
        raise ConfigError(f"unknown --wire {wire!r}; use one of {', '.join(FLOAT_CODECS)}")
    defence_list = _parse_defences(defences)
    for name, strength in defence_list:
        _check_defence(name, strength, (defence_depth, tail_start))
    lines, new_tokens = _read_prompts(prompts), 24
    if quick:
        lines, new_tokens = lines[:3], 8
    extra = {"aux_chars": 100_000} if quick else {}
    ranker = _check_ranker(ranker, "exact" if "exact" in names else names[0])
    runs = [TextAttackSpec(model=model, cuts=(depth, tail_start), attack=name, wire=wire, max_new_tokens=new_tokens,
                           ranker=ranker if name == "exact" else None, **extra) for name in names for depth in levels]
    runs += [TextAttackSpec(model=model, cuts=(defence_depth, tail_start), attack=name, wire=wire, max_new_tokens=new_tokens,
                            defence=defence, strength=strength, ranker=ranker if name == "exact" else None, **extra)
             for name in names for defence, strength in defence_list]
    stem = f"text-privacy_{Path(model).name}{'_quick' if quick else ''}"
    records = []
    existing = out / f"{stem}.jsonl"
    if append and existing.exists():
        try:
            records = [json.loads(line) for line in existing.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot read the records {existing} to append to: {error}") from None
    stamp_run(allow_dirty)
    setup(threads)
    with progress("sweep ...") as spinner:
        for number, spec in enumerate(runs, 1):
            label = f"{spec.attack} at depth {spec.cuts[0]}" + (f", {spec.defence} {spec.strength:g}" if spec.defence else "")
            spinner.update(f"run {number}/{len(runs)}: {label}")
            record = run_text_attack(spec, lines, progress=lambda done, total: spinner.update(
                f"run {number}/{len(runs)}: {label} ({done}/{total} prompts)"))
            same = json.loads(json.dumps(asdict(spec)))  # as stored: tuples become lists
            records = [r for r in records if r["spec"] != same] + [record]
            typer.echo(f"{label}: prompt token recovery {record['token_recovery']:.3f}, answer {record['answer_recovery']:.3f}, "
                       f"{record['seconds_per_token']:.2f} s per token")
            write_text_report(records, out, stem)  # after every run: a long sweep keeps what it has measured
    paths = write_text_report(records, out, stem)
    typer.echo("wrote " + ", ".join(str(p) for p in paths))
