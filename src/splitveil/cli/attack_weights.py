"""`splitveil attack weights`: what a thief of SLIP's residual bundle recovers of the model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from splitveil.cli.attack import app
from splitveil.cli.common import allow_dirty_option, err_console, print_json, progress, resume_option, setup
from splitveil.core.errors import ConfigError


def _is_cnn(model: str) -> bool:
    from splitveil.models.vision_zoo import VISION_MODELS

    return model in VISION_MODELS.names()


def _summary(r: dict) -> str:
    if "accuracy_original" in r:
        return _cnn_summary(r)
    alignment = "" if r["subspace_alignment"] is None else (
        f"subspace alignment {r['subspace_alignment']:.4f} (random {r['subspace_alignment_chance']:.3f}, hindsight "
        f"bound {r['subspace_alignment_hindsight']:.3f}); ")
    split = f"hardened, k = {r['rank']} + {r['mask_rank']}" if r["hardened"] else f"k = {r['rank']}"
    state = "converged" if r["attacker_converged"] else "capped"
    return (f"{r['attack']} on {r['model']} ({split}): {alignment}perplexity original {r['perplexity_original']:.1f}, "
            f"residual-only {r['perplexity_residual']:.3g}, after fitting {r['unknowns']:,} unknowns on {r['tokens']:,} "
            f"tokens {r['perplexity_after']:.4g} ({r['steps']} steps, lr {r['learning_rate']:g}, {state}); secure "
            f"FLOPs share {r['secure_flops_share']:.4f}, tokens {'identical' if r['tokens_identical'] else 'DIFFERENT'} "
            f"to the unprotected model; {r['seconds']:.0f} s")


def _cnn_summary(r: dict) -> str:
    alignment = "" if r["subspace_alignment"] is None else f"subspace alignment {r['subspace_alignment']:.4f}; "
    split = f"hardened, k = {r['rank']} + {r['mask_rank']}" if r["hardened"] else f"k = {r['rank']}"
    state = "converged" if r["attacker_converged"] else "capped"
    return (f"{r['attack']} on {r['model']} ({split}): {alignment}test accuracy original {r['accuracy_original']:.3f}, "
            f"residual-only {r['accuracy_residual']:.3f}, after fitting {r['unknowns']:,} unknowns on "
            f"{r['stolen']:,} stolen images {r['accuracy_after']:.3f} ({r['steps']} steps, lr {r['learning_rate']:g}, "
            f"{state}); {r['seconds']:.0f} s")


def _cnn_spec(model: str, rank, hardened: bool, mask_rank: int, seed: int, stolen: int = 1000):
    from splitveil.experiments.weights_cnn import CnnWeightsSpec

    return CnnWeightsSpec(model=model, rank=4 if rank is None else rank, hardened=hardened, mask_rank=mask_rank,
                          seed=seed, stolen=stolen)


@app.command("weights")
def weights(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registered causal LM, local model directory, or "
                              "a CNN (lenet, vgg, resnet: trained on fashion-mnist, attacked with stolen images)."),
    attack: str = typer.Option("nullspace", "--attack", "-a", help="nullspace (read the secret subspaces off the "
                               "residual's null spaces, fit the small block left) or lowrank (a free rank-k "
                               "correction per matrix, ignoring the structure)."),
    rank: int = typer.Option(None, "--rank", "-k", help="Secure rank k per matrix (default: the weights deployment's, "
                             "the largest k within the secure FLOPs target; 4 for a CNN)."),
    hardened: bool = typer.Option(False, "--hardened", help="Attack the hardened split: a secret random term of rank "
                                  "--mask-rank folded into the secure part, so that the residual is full rank."),
    mask_rank: int = typer.Option(4, "--mask-rank", min=1, help="--hardened: extra secret directions per matrix."),
    quick: bool = typer.Option(False, "--quick", help="12,800 tokens of attacker text and at most 58 fine-tuning "
                               "steps (minutes; the attacker stops on that cap). Default: 102,400 tokens, up to 645 "
                               "steps, stopped on a held-out plateau."),
    stolen: int = typer.Option(1000, "--stolen", help="A CNN: the thief's labelled images (10 to 10,000; a fifth held "
                               "out to choose the learning rate and stop)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the hardened split's secret term and of the attacker."),
    out: Path = typer.Option(None, "--out", help="Also write the record (JSON) to this folder."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object (subspace_alignment, "
                                     "perplexity_original, perplexity_residual, perplexity_after, tokens, "
                                     "learning_rate, attacker_converged, secure_flops_share, ...) as the last line."),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """The weights deployment's residual bundle under a structured attack: how well the secret subspaces are
    recovered, and the perplexity a thief reaches by fine-tuning only what is left on public text."""
    from splitveil.experiments.weights_attack import WeightsAttackSpec, run_weights_attack

    if out is not None and not out.parent.exists():
        raise ConfigError(f"--out {out}: its parent folder does not exist")
    setup(threads)
    if _is_cnn(model):
        from splitveil.experiments.weights_cnn import run_cnn_weights_attack

        spec = replace(_cnn_spec(model, rank, hardened, mask_rank, seed, stolen), attack=attack)
        run = run_cnn_weights_attack
    else:
        spec = WeightsAttackSpec.for_run(quick=quick, model=model, attack=attack, rank=rank, hardened=hardened,
                                         mask_rank=mask_rank, seed=seed)
        run = run_weights_attack
    with err_console.status(f"{attack} attack on {model} ...") as spinner:
        record = run(spec, progress=spinner.update)
    if out is not None:
        from splitveil.core.records import write_json

        out.mkdir(parents=True, exist_ok=True)
        stem = f"weights-attack_{Path(model).name}_{attack}{'_hardened' if hardened else ''}{'_quick' if quick else ''}"
        err_console.print(f"wrote {write_json(out / f'{stem}.json', record)}")
    if json_output:
        print_json(record)
        return
    typer.echo(_summary(record))


@app.command("weights-curves")
def weights_curves(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registered causal LM, local model directory, or "
                              "a CNN (lenet, vgg, resnet)."),
    attacks: str = typer.Option("nullspace,lowrank,full,scratch", "--attacks", help="Attacks, comma-separated: "
                                "nullspace, lowrank, full (every protected weight fine-tuned from the residual), "
                                "scratch (the protected matrices trained from a fresh start, the residual unused)."),
    budgets: str = typer.Option(None, "--budgets", help="An LM: tokens of the attacker's public text (default "
                                "12800,51200,102400; each run also holds out its own sequences to choose the learning "
                                "rate and stop). A CNN: stolen labelled images, a fifth of each held out (default "
                                "100,300,1000,3000,10000)."),
    rank: int = typer.Option(None, "--rank", "-k", help="Secure rank k per matrix (default: the weights deployment's)."),
    hardened: bool = typer.Option(False, "--hardened", help="Attack the hardened split (see `attack weights`)."),
    mask_rank: int = typer.Option(4, "--mask-rank", min=1, help="--hardened: extra secret directions per matrix."),
    seed: int = typer.Option(0, "--seed", help="Seed of the hardened split's secret term and of the attackers."),
    out: Path = typer.Option(Path("benchmarks/results"), "--out", help="Folder for the record (JSON) and its plot."),
    allow_dirty: bool = allow_dirty_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
    resume: bool = resume_option(),
) -> None:
    """Extraction curves on SLIP's residual: held-out perplexity against the thief's tokens of public text, for each
    attack, each run tuned (learning rate swept) and stopped on its plateau; a JSON record and a plot. Long: each run
    splits the model and fine-tunes (tens of minutes per run on SmolLM2 on one CPU core at 102,400 tokens)."""
    from splitveil.attack.weights import WEIGHTS_ATTACKS
    from splitveil.cli.common import int_list, name_list, stamp_run
    from splitveil.core.records import write_json
    from splitveil.experiments.weights_attack import WeightsAttackSpec, plot_weights_curves, run_weights_curves

    names = name_list(attacks)
    if not names:
        raise ConfigError("give at least one attack in --attacks, like nullspace,full")
    for name in names:
        WEIGHTS_ATTACKS.get(name)
    cnn = _is_cnn(model)
    if cnn:
        sizes = int_list(budgets or "100,300,1000,3000,10000", "--budgets", "image counts like 100,1000")
        if not sizes or min(sizes) < 10 or max(sizes) > 10_000:
            raise ConfigError(f"--budgets for a CNN must be image counts from 10 to 10000, got {budgets}")
    else:
        sizes = int_list(budgets or "12800,51200,102400", "--budgets", "token counts like 12800,51200")
        if not sizes or min(sizes) < 640:
            raise ConfigError(f"--budgets must be token counts of at least 640 (ten 64-token sequences), got {budgets}")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be >= 1 (the weights deployment keeps a secure part), got {rank}")
    if not out.parent.exists():
        raise ConfigError(f"--out {out}: its parent folder does not exist")
    stamp_run(allow_dirty)
    setup(threads)
    if cnn:
        from splitveil.experiments.weights_cnn import run_cnn_weights_curves

        spec, run = _cnn_spec(model, rank, hardened, mask_rank, seed), run_cnn_weights_curves
    else:
        spec = WeightsAttackSpec.for_run(model=model, rank=rank, hardened=hardened, mask_rank=mask_rank, seed=seed)
        run = run_weights_curves
    with progress(f"{len(names) * len(sizes)} weights-attack runs on {model} ...") as spinner:
        record = run(spec, names, sorted(sizes), progress=spinner.update, on_record=lambda r: typer.echo(_summary(r)),
                     resume=resume)
    stem = f"weights-curves_{Path(model).name}{'_hardened' if hardened else ''}"
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_json(out / f"{stem}.json", record), plot_weights_curves(record, out / f"{stem}.png")]
    typer.echo("wrote " + ", ".join(str(p) for p in paths))
