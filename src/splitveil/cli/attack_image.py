"""`splitveil attack image` and `attack image-sweep`: model-inversion attacks on split image classifiers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from splitveil.cli.attack import app
from splitveil.cli.common import (allow_dirty_option, err_console, int_list, name_list, print_json, progress, resume_option,
                                  setup, stamp_run)
from splitveil.core.errors import ConfigError

DEFAULT_OUT = Path("benchmarks/results")


def _check_names(dataset: str, model: str, attacks: list[str]) -> int:
    """Unknown names fail with the registry's one line; returns the model's number of blocks."""
    from splitveil.experiments.image_privacy import check_image_names

    return check_image_names(dataset, model, attacks)


def _check_defence(name: str, strength: float | None) -> None:
    """An unknown defence or a strength out of its range fails with one line."""
    from splitveil.protect.image import make_defence

    make_defence(name, strength)


def parse_defences(text: str) -> list[tuple[str, float | None]]:
    """`none,noise:0.5,siftfunnel` -> [("none", None), ("noise", 0.5), ("siftfunnel", None)] (None: the default
    strength); each checked against the registry and its range."""
    defences = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, strength = item.partition(":")
        try:
            value = float(strength) if strength else None
        except ValueError:
            raise ConfigError(f"bad --defences item {item!r}: give NAME or NAME:STRENGTH, like noise:0.5") from None
        _check_defence(name.strip(), value)
        defences.append((name.strip(), value))
    if not defences:
        raise ConfigError("give at least one defence (--defences), like none,noise:0.5,siftfunnel")
    return defences


def _check_split(split: int, model: str, blocks: int) -> None:
    from splitveil.plan.plan import check_block_cut

    check_block_cut(split, blocks, model=model)


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot write to --out {out}: {error.strerror or error}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to --out {out}: permission denied")


def _spec(quick: bool, **fields):
    from splitveil.experiments.image_privacy import ImageAttackSpec

    return ImageAttackSpec.quick(**fields) if quick else ImageAttackSpec(**fields)


def _summary(record: dict) -> str:
    trained = ""
    if "attacker_epochs" in record:
        trained = (f"; attacker {record['attacker_epochs']} epochs, "
                   f"{'converged' if record['attacker_converged'] else 'stopped at the cap (not converged)'}")
    return (f"{record['attack']:7s} split {record['split']} ({'x'.join(map(str, record['feature_shape']))}): "
            f"SSIM {record['ssim']:.3f}, PSNR {record['psnr']:.2f} dB, MSE {record['mse']:.4f}, "
            f"recon accuracy {record['recon_accuracy']:.3f}, MINE {record['mine']:.2f} nats, dCor² {record['dcor']:.3f}"
            + trained + (" (resumed: kept by an earlier run of this commit)" if record.get("resumed") else ""))


MI_SEEDS_HELP = ("Seeds per mutual-information estimator (MINE, InfoNCE, k-NN; default 3): records give each one's "
                 "mean and spread, and an ordering is claimed only beyond the spread, so fewer seeds claim less.")
MI_PAIRS_HELP = "Images the mutual-information estimators use (default 5,000: test images, then auxiliary ones)."


def _mi_options(seeds: int | None, pairs: int | None) -> dict:
    """The spec fields of `--mi-seeds` / `--mi-pairs` given (the spec's defaults otherwise)."""
    return {k: v for k, v in (("mine_repeats", seeds), ("mi_pairs", pairs)) if v is not None}


@app.command("image")
def image(
    dataset: str = typer.Option("fashion-mnist", "--dataset", "-d", help="fashion-mnist, mnist (5k), digits (8x8) or lfw."),
    model: str = typer.Option("vgg", "--model", "-m", help="lenet, vgg or resnet (our own CNNs, trained and cached)."),
    split: int = typer.Option(1, "--split", "-s", help="Cut after this many blocks: the cloud sees that block's output."),
    attack: str = typer.Option("inverse", "--attack", "-a", help="rmle (white box), inverse (queries + auxiliary data), "
                               "shadow (query-free, cloud weights) or cgan (conditional GAN on queried pairs)."),
    quick: bool = typer.Option(False, "--quick", help="Small sizes: victim 3 epochs on 10k images, attack on 5k "
                               "auxiliary images, 200 test images scored; learned attackers still train until their "
                               "held-out loss plateaus."),
    samples: int = typer.Option(None, "--samples", help="Test images attacked and scored (default 500, quick 200)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data split, training and attack."),
    out: Path = typer.Option(None, "--out", help="Also write the record, grid, plot and report to this folder."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object (mse, psnr, ssim, accuracy, "
                                     "threat_model, mine, ...) and nothing else on stdout."),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
    defence: str = typer.Option("none", "--defence", help="Defence built in at the cut, its victim trained and cached: "
                                "none, noise, dropout, nopeek, vib, cem or siftfunnel. The attack knows it (adaptive)."),
    strength: float = typer.Option(None, "--strength", help="The defence's one knob (0 = undefended; default: the "
                                   "defence's own, see docs/privacy-image.md)."),
    mi_seeds: int = typer.Option(None, "--mi-seeds", min=1, help=MI_SEEDS_HELP),
    mi_pairs: int = typer.Option(None, "--mi-pairs", min=100, help=MI_PAIRS_HELP),
) -> None:
    """Reconstruct private images from what crosses one cut of a split classifier, and score the reconstructions."""
    from splitveil.experiments.image_privacy import run_image_attack, write_image_report

    blocks = _check_names(dataset, model, [attack])
    _check_split(split, model, blocks)
    _check_defence(defence, strength)
    if samples is not None and samples < 2:
        raise ConfigError(f"--samples must be at least 2, got {samples}")
    if seed < 0:
        raise ConfigError(f"--seed must be non-negative, got {seed}")
    if out is not None:
        _check_out(out)
    setup(threads)
    spec = _spec(quick, dataset=dataset, model=model, split=split, attack=attack, seed=seed, defence=defence,
                 strength=strength, **({"samples": samples} if samples else {}), **_mi_options(mi_seeds, mi_pairs))
    with err_console.status(f"{attack} attack on {model} split {split} ({dataset}, defence {defence}) ..."):
        record = run_image_attack(spec, quiet=json_output)
    if out is not None:
        suffix = "" if defence == "none" else f"_{defence}-{record['strength']:g}"
        paths = write_image_report([record], out, f"image-attack_{dataset}_{model}_{attack}_split{split}{suffix}")
        err_console.print("wrote " + ", ".join(str(p) for p in paths))
    if json_output:
        print_json({k: v for k, v in record.items() if k != "examples"})
        return
    source = {"calibrated": ", calibrated for this data set and model", "default": ", the defence's default"}.get(
        record.get("strength_source"), "") if record["defence"] != "none" else ""
    typer.echo(f"{model} on {dataset}, defence {record['defence']} (strength {record['strength']:g}{source}): split accuracy "
               f"{record['accuracy']:.3f} (unsplit {record['accuracy_unsplit']:.3f}, undefended "
               f"{record['accuracy_undefended']:.3f}); attacker: {record['threat_model']['description']}")
    typer.echo("  " + _summary(record))
    typer.echo(f"  mean-image baseline: SSIM {record['baseline_ssim']:.3f}, PSNR {record['baseline_psnr']:.2f} dB; "
               f"{record['seconds']:.1f} s")


@app.command("image-sweep")
def image_sweep(
    dataset: str = typer.Option("fashion-mnist", "--dataset", "-d", help="fashion-mnist, mnist, digits or lfw."),
    model: str = typer.Option("vgg", "--model", "-m", help="lenet, vgg or resnet."),
    splits: str = typer.Option("1,2,3,4,5", "--splits", help="Cuts to attack, comma-separated."),
    attacks: str = typer.Option("inverse", "--attacks", help="Attacks to run at every cut: rmle,inverse,shadow,cgan."),
    quick: bool = typer.Option(False, "--quick", help="Small sizes (see `attack image --help`)."),
    samples: int = typer.Option(None, "--samples", help="Test images attacked per run (default 500, quick 200)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data split, training and attacks."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder for the records (JSONL), grid, depth plot and report."),
    allow_dirty: bool = allow_dirty_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads (of this process; each worker has one)."),
    jobs: int = typer.Option(None, "--jobs", "-j", help="Worker processes, one cut (and defence) each at a time, one "
                             "torch thread each (default: one per CPU core, at most one per unit; 1 = all in this "
                             "process)."),
    defences: str = typer.Option(None, "--defences", help="Defences to attack, NAME or NAME:STRENGTH, comma-separated "
                                 "(e.g. none,noise:0.5,noise:1,siftfunnel): writes image-defences_* records, a "
                                 "privacy-utility plot, a grid per defence and a report with SiftFunnel's claims."),
    frontier: bool = typer.Option(False, "--frontier", help="With --defences: each baseline given without a strength "
                                  "(noise, dropout, nopeek, cem, vib) is swept up its ladder of strengths until its "
                                  "accuracy cost reaches SiftFunnel's, and one step beyond; the report reads every "
                                  "baseline at SiftFunnel's accuracy (interpolated) and plots each frontier."),
    mi_seeds: int = typer.Option(None, "--mi-seeds", min=1, help=MI_SEEDS_HELP),
    mi_pairs: int = typer.Option(None, "--mi-pairs", min=100, help=MI_PAIRS_HELP),
    resume: bool = resume_option(),
) -> None:
    """Every attack at every cut: SSIM, PSNR, recon accuracy and MINE against split depth (or against each defence,
    or along each defence's frontier), with a report."""
    from splitveil.experiments.image_privacy import run_image_sweep, write_image_report
    from splitveil.experiments.image_report import write_defence_report

    cuts = int_list(splits, "--splits", "cut indices like 1,2,4")
    chosen = parse_defences(defences) if defences is not None else None
    names = name_list(attacks)
    if not cuts or not names:
        raise ConfigError("give at least one cut (--splits) and one attack (--attacks)")
    blocks = _check_names(dataset, model, names)
    for cut in cuts:
        _check_split(cut, model, blocks)
    if samples is not None and samples < 2:
        raise ConfigError(f"--samples must be at least 2, got {samples}")
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if frontier and not chosen:
        raise ConfigError("--frontier sweeps the baselines of --defences: give --defences, like "
                          "none,siftfunnel,noise,nopeek")
    _check_out(out)
    stamp_run(allow_dirty)
    setup(threads)
    units = len(cuts) * (len(chosen) if chosen else 1)  # (a frontier adds settings as it walks each ladder)
    jobs = min(jobs or len(os.sched_getaffinity(0)), units if not frontier else len(os.sched_getaffinity(0)))
    kind = "image-defences" if chosen else "image-privacy"
    stem = f"{kind}_{dataset}_{model}{'_frontier' if frontier else ''}{'_quick' if quick else ''}"
    write = write_defence_report if chosen else write_image_report
    spec = _spec(quick, dataset=dataset, model=model, seed=seed, **({"samples": samples} if samples else {}),
                 **_mi_options(mi_seeds, mi_pairs))
    began, done = time.perf_counter(), set()
    with progress(f"training or loading the victim, then {len(names)} attack(s) at {len(cuts)} cut(s) "
                            f"x {len(chosen or [0])} defence(s) in {jobs} process(es) ...") as spinner:
        def report(records: list[dict]) -> None:
            for record in records:
                key = (record["defence"], record["strength"], record["attack"], record["split"])
                if key not in done:
                    done.add(key)
                    prefix = f"{record['defence']} {record['strength']:g} (accuracy {record['accuracy']:.3f}) " if chosen else ""
                    typer.echo(prefix + _summary(record))
            spinner.update(f"{len(done)} runs done, {time.perf_counter() - began:.0f} s ...")
            write(records, out, stem)  # after every unit: a long sweep keeps what it has measured

        records = run_image_sweep(spec, cuts, names, jobs=jobs, on_records=report, defences=chosen, frontier=frontier,
                                  progress=spinner.update, resume=resume)
    typer.echo(f"{len(records)} runs in {time.perf_counter() - began:.0f} s ({jobs} process(es))")
    if not chosen:
        typer.echo(f"split accuracy {records[0]['accuracy']:.3f} (= unsplit {records[0]['accuracy_unsplit']:.3f})")
    typer.echo("wrote " + ", ".join(str(p) for p in write(records, out, stem)))


@app.command("image-defaults")
def image_defaults(
    defence: str = typer.Option("siftfunnel", "--defence", help="The image defence to calibrate (one with a ladder of "
                                "strengths: siftfunnel, noise, dropout, nopeek, cem, vib)."),
    datasets: str = typer.Option("fashion-mnist,mnist,digits,lfw", "--datasets", help="Data sets, comma-separated."),
    models: str = typer.Option("lenet,vgg,resnet", "--models", help="Models, comma-separated."),
    cut: int = typer.Option(2, "--cut", help="The cut the defence is built in at."),
    max_cost: float = typer.Option(0.03, "--max-cost", help="Accuracy budget, as a fraction: the chosen strength is "
                                   "the strongest whose accuracy cost stays within it (SiftFunnel's paper: 3 points)."),
    quick: bool = typer.Option(True, "--quick/--full", help="Victims as `attack image --quick` trains them (3 epochs "
                               "on up to 10,000 images), or the full ones (15 epochs, 30,000)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data split and training."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder for the record (JSON) and its plot."),
    write_defaults: bool = typer.Option(False, "--write-defaults", help="Also write the chosen strengths into the "
                                        "package's table, which `attack image` and `image-sweep` use when a defence "
                                        "is given without a strength."),
    allow_dirty: bool = allow_dirty_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """Per data set and model, the strongest setting of a defence whose accuracy cost stays within --max-cost: each
    strength of its ladder trained (cached) and scored against the undefended victim, a JSON record and a plot."""
    from splitveil.experiments.defence_defaults import DefaultsSpec, calibrate_defaults, plot_defaults, write_defaults_table
    from splitveil.core.records import write_json
    from splitveil.protect.image.base import CALIBRATED_DEFAULTS

    chosen_datasets, chosen_models = tuple(name_list(datasets)), tuple(name_list(models))
    for flag, chosen in (("--datasets", chosen_datasets), ("--models", chosen_models)):
        if not chosen:
            raise ConfigError(f"give at least one name in {flag}")
    spec = DefaultsSpec(defence=defence, datasets=chosen_datasets, models=chosen_models, cut=cut, max_cost=max_cost,
                        quick=quick, seed=seed)
    for model in spec.models:
        _check_split(cut, model, _check_names(spec.datasets[0], model, []))
    _check_out(out)
    stamp_run(allow_dirty)
    setup(threads)
    with progress("calibrating ...") as spinner:
        def show(result: dict) -> None:
            chosen = f"{result['chosen']:g}" if result["chosen"] is not None else f"none: {result['not_chosen_because']}"
            costs = ", ".join(f"{p['strength']:g}: {100 * p['cost']:+.1f}" for p in result["points"])
            typer.echo(f"{result['dataset']} {result['model']}: undefended {result['accuracy_undefended']:.3f} on "
                       f"{result['test_images']} images; cost in points by strength {costs}; chosen {chosen}")

        record = calibrate_defaults(spec, progress=spinner.update, on_result=show)
    stem = f"defence-defaults_{defence}_cut{cut}{'_quick' if quick else ''}"
    paths = [write_json(out / f"{stem}.json", record), plot_defaults(record, out / f"{stem}.png")]
    if write_defaults:
        write_defaults_table(record, CALIBRATED_DEFAULTS)
        paths.append(CALIBRATED_DEFAULTS)
    if record["uncalibrated"]:
        typer.echo(f"not calibrated (the defence's default applies there): {', '.join(record['uncalibrated'])}")
    typer.echo("wrote " + ", ".join(str(p) for p in paths))

