"""`splitveil partition`: choose a TEE | accelerator cut by measured attacks; `partition run` runs one partitioned
inference through a trusted executor process and an accelerator process; `partition latency` times the ImageNet
MobileNetV2 per cut. The attestation is SIMULATED (a software key stands in for the CPU's), and every output says so.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from splitveil.cli.common import (allow_dirty_option, err_console, int_list, name_list, print_json, progress, resume_option,
                                  setup, stamp_run)
from splitveil.core.errors import ConfigError
from splitveil.plan.plan import DEFAULT_LM_SPLIT
from splitveil.tee.select import DEFAULT_ATTACKS

app = typer.Typer(help="TEE layer partitioning: the first layers in a trusted executor (simulated attestation), the "
                       "rest on an untrusted accelerator, the cut chosen by measured attacks.",
                  invoke_without_command=True, no_args_is_help=False)


def _check_names(dataset: str, model: str, attacks: list[str]) -> int:
    from splitveil.attack.image import IMAGE_ATTACKS
    from splitveil.data.images import DATASETS
    from splitveil.models.vision_zoo import build_vision_model

    DATASETS.get(dataset)
    for name in attacks:
        IMAGE_ATTACKS.get(name)
    return build_vision_model(model, (1, 28, 28), 10).num_blocks


def _cost_model(slowdown: float, accelerator: float):
    from splitveil.tee.cost import CostModel

    if slowdown < 1:
        raise ConfigError(f"--enclave-slowdown must be at least 1 (the enclave is never faster), got {slowdown}")
    if accelerator <= 0:
        raise ConfigError(f"--accelerator-speedup must be positive, got {accelerator}")
    return CostModel(enclave_slowdown=slowdown, accelerator_speedup=accelerator)


@app.callback()
def partition(
    ctx: typer.Context,
    dataset: str = typer.Option("fashion-mnist", "--dataset", "-d", help="fashion-mnist, mnist, digits or lfw."),
    model: str = typer.Option("vgg", "--model", "-m", help="vgg, resnet, mobilenet or lenet (our CNNs, cached)."),
    tau: float = typer.Option(None, "--tau", help="SSIM threshold: the chosen cut is the smallest whose strongest "
                              "attack scores below it (default 0.66: see docs/tee-partition.md)."),
    cuts: str = typer.Option(None, "--cuts", help="Candidate cuts, comma-separated (default: every block)."),
    attacks: str = typer.Option(",".join(DEFAULT_ATTACKS), "--attacks", help="Attacks run at every cut; the strongest "
                                "counts. Default: c-GAN and inverse network (black box) and rMLE (white box: the cloud "
                                "that owns the model knows the enclave's layers)."),
    quick: bool = typer.Option(False, "--quick", help="The attack suite's quick sizes, MINE once per cut."),
    enclave_slowdown: float = typer.Option(None, "--enclave-slowdown", help="Enclave time / the same compute on "
                                           "this CPU (default 2.0, SGX with memory-aware execution; 1.1 for TDX/SEV)."),
    accelerator_speedup: float = typer.Option(1.0, "--accelerator-speedup", help="This CPU's time / the untrusted "
                                              "accelerator's (1 = the accelerator is this CPU)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data split, training and attacks."),
    out: Path = typer.Option(None, "--out", help="Write the record (JSON), the SSIM/speed-up plot and the "
                             "reconstructions at p-1, p, p+1 to this folder."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object {chosen_cut, tau, cuts: [...]}."),
    jobs: int = typer.Option(None, "--jobs", "-j", help="Attack worker processes (default: one per CPU core)."),
    allow_dirty: bool = allow_dirty_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
    resume: bool = resume_option(),
) -> None:
    """Choose the cut: attacks at every candidate cut, the smallest cut whose strongest attack is below tau (or none,
    said plainly, with the tau each cut would need), the speed-up over all-in-TEE."""
    if ctx.invoked_subcommand is not None:
        return
    from splitveil.core.records import write_records
    from splitveil.experiments.tee_partition import PartitionSpec, run_partition, summary, write_partition_report
    from splitveil.plan.plan import check_block_cut
    from splitveil.tee.cost import DEFAULT_ENCLAVE_SLOWDOWN
    from splitveil.tee.select import DEFAULT_TAU

    names = name_list(attacks)
    if not names:
        raise ConfigError("give at least one attack (--attacks)")
    blocks = _check_names(dataset, model, names)
    chosen_cuts = int_list(cuts, "--cuts", "cut indices like 1,2,3") if cuts else list(range(1, blocks + 1))
    for cut in chosen_cuts:
        check_block_cut(cut, blocks, flag="--cuts", model=model)
    tau = DEFAULT_TAU if tau is None else tau
    if not 0 < tau <= 1:
        raise ConfigError(f"--tau must be in (0, 1], got {tau}")
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    cost = _cost_model(DEFAULT_ENCLAVE_SLOWDOWN if enclave_slowdown is None else enclave_slowdown, accelerator_speedup)
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot write to --out {out}: {error.strerror or error}") from None
        stamp_run(allow_dirty)
    setup(threads)
    jobs = min(jobs or len(os.sched_getaffinity(0)), len(chosen_cuts))
    spec = PartitionSpec(dataset=dataset, model=model, tau=tau, attacks=tuple(names), cuts=tuple(sorted(set(chosen_cuts))),
                         quick=quick, seed=seed, jobs=jobs, cost=cost)
    began, done = time.perf_counter(), set()
    stem = f"tee-partition_{dataset}_{model}{'_quick' if quick else ''}"
    with progress(f"{', '.join(names)} at {len(chosen_cuts)} cut(s) of {model} ({dataset}), {jobs} process(es) "
                            "(converged attackers: hours on a CPU) ...") as spinner:
        def report(records: list[dict]) -> None:  # a line per finished attack on stderr (stdout stays --json's)
            for record in records:
                key = (record["split"], record["attack"])
                if key in done:
                    continue
                done.add(key)
                trained = ""
                if "attacker_epochs" in record:
                    trained = f", {record['attacker_epochs']} epochs" + ("" if record["attacker_converged"]
                                                                         else " (stopped by the cap)")
                err_console.print(f"cut {record['split']} {record['attack']}: SSIM {record['ssim']:.3f}{trained}"
                                  f"{' (resumed)' if record.get('resumed') else ''}", highlight=False)
            cuts_done = len({record["split"] for record in records})
            spinner.update(f"{cuts_done} of {len(chosen_cuts)} cut(s) done, {time.perf_counter() - began:.0f} s ...")
            if out is not None:  # what is measured so far, readable while the run goes on (removed at the end)
                write_records(records, out, f"{stem}.partial")

        result = run_partition(spec, resume=resume, on_records=report)
    if out is not None:
        paths = write_partition_report(result, out, stem)
        (out / f"{stem}.partial.jsonl").unlink(missing_ok=True)
        err_console.print("wrote " + ", ".join(str(p) for p in paths))
    if json_output:
        print_json(summary(result))
        return
    typer.echo(f"{model} on {dataset}: accuracy {result['accuracy']:.3f}; attestation: {result['attestation']}; "
               f"enclave slow-down x{cost.enclave_slowdown:g}, accelerator x{cost.accelerator_speedup:g}")
    for row in result["cuts"]:
        kind = "white box" if row["white_box"] else "black box"
        typer.echo(f"  cut {row['cut']}: strongest {row['attack']:7s} ({kind}) SSIM {row['ssim']:.3f} (qualifies for "
                   f"tau > {row['required_tau']:.3f})  MINE {row['mine']:.2f} nats  speed-up vs all-in-TEE "
                   f"{row['speedup_vs_all_tee']:.2f}x")
    typer.echo(result["verdict"])
    typer.echo(f"{time.perf_counter() - began:.0f} s")


def _choice(model: str, dataset: str, quick: bool, full: bool, seed: int):
    from splitveil.data.images import DATASETS
    from splitveil.models.vision_zoo import VISION_MODELS
    from splitveil.tee.process import IMAGENET_MODEL, ModelChoice

    if model != IMAGENET_MODEL:
        VISION_MODELS.get(model)
        DATASETS.get(dataset)
    if quick and full:
        raise ConfigError("give --quick or --full, not both")
    return ModelChoice(model=model, dataset=dataset, quick=not full, seed=seed)


def _check_run_cut(model: str, cut: int) -> None:
    from splitveil.models.vision_zoo import build_vision_model
    from splitveil.tee.process import IMAGENET_MODEL

    from splitveil.plan.plan import check_block_cut

    check_block_cut(cut, 19 if model == IMAGENET_MODEL else build_vision_model(model, (1, 28, 28), 10).num_blocks,
                    flag="--cut", model=model)


_MODEL_HELP = "vgg, resnet, mobilenet, lenet (Fashion-MNIST-style CNNs, cached) or mobilenet_v2 (ImageNet weights)."


@app.command("run")
def run(
    cut: int = typer.Option(..., "--cut", "-p", help="Blocks [0, p) run in the trusted executor, the rest on the accelerator."),
    model: str = typer.Option("vgg", "--model", "-m", help=_MODEL_HELP),
    dataset: str = typer.Option("fashion-mnist", "--dataset", "-d", help="The CNN's data set (ignored for mobilenet_v2)."),
    quick: bool = typer.Option(False, "--quick", help="The victim of `partition --quick` (the default)."),
    full: bool = typer.Option(False, "--full", help="The victim trained at the attack suite's default sizes."),
    images: int = typer.Option(64, "--images", min=1, help="Test images classified through the two processes."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data split and the victim."),
    out: Path = typer.Option(None, "--out", help="Also write the record as JSON into this folder."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
    allow_dirty: bool = allow_dirty_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """One partitioned inference through a trusted executor process and an accelerator process over TLS; compares with
    the whole model and shows a tampered and a replayed sealed message refused."""
    from splitveil.core.records import environment, write_json
    from splitveil.tee.process import run_partitioned

    choice = _choice(model, dataset, quick, full, seed)
    _check_run_cut(model, cut)
    if out is not None:
        stamp_run(allow_dirty)
    setup(threads)
    with err_console.status("partitioned inference ...") as spinner:
        result = run_partitioned(choice, cut, images=images, progress=spinner.update)
    record = {**result.to_dict(), "environment": environment()}
    if out is not None:
        path = write_json(out / f"tee-run_{model}_cut{cut}.json", record)
        err_console.print(f"wrote {path}")
    if json_output:
        print_json(record)
        return
    typer.echo(f"attestation: {record['attestation']}; executor measurement {result.measurement[:16]}...")
    typer.echo(f"{model} cut {cut}: {result.images} images through the trusted executor and the accelerator; max |logit "
               f"diff| vs unpartitioned {result.max_abs_logit_diff:.2e}, same labels: {result.same_labels}"
               + (f", accuracy {result.accuracy:.3f}" if result.accuracy is not None else ""))
    typer.echo(f"partitioned {result.seconds_partitioned * 1000:.1f} ms, whole model in this process "
               f"{result.seconds_unpartitioned * 1000:.1f} ms (processes started in {result.startup_seconds:.1f} s)")
    for kind, message in result.refusals.items():
        typer.echo(f"{kind} sealed input: {message}")


@app.command("latency")
def latency(
    enclave_slowdown: float = typer.Option(None, "--enclave-slowdown", help="Enclave time / this CPU's (default 2.0)."),
    accelerator_speedup: float = typer.Option(1.0, "--accelerator-speedup", help="This CPU's time / the accelerator's, "
                                              "used when no --accelerator-times are given."),
    accelerator_times: Path = typer.Option(None, "--accelerator-times", help="Per-cut times measured on the accelerator "
                                           "(JSON of `measure_latency`, e.g. benchmarks/results/tee-latency_mobilenet-v2_h100.json)."),
    repeats: int = typer.Option(20, "--repeats", min=1, help="Timed runs per range (median)."),
    out: Path = typer.Option(None, "--out", help="Write the record (JSON) and the speed-up plot to this folder."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
    allow_dirty: bool = allow_dirty_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """Per-cut latency and speed-up over all-in-TEE of the ImageNet MobileNetV2 (real weights), batch 1."""
    from splitveil.core.records import write_json
    from splitveil.experiments.tee_partition import plot_latency, run_latency
    from splitveil.tee.cost import DEFAULT_ENCLAVE_SLOWDOWN

    cost = _cost_model(DEFAULT_ENCLAVE_SLOWDOWN if enclave_slowdown is None else enclave_slowdown, accelerator_speedup)
    if accelerator_times is not None and not accelerator_times.is_file():
        raise ConfigError(f"no such file: {accelerator_times}")
    if out is not None:
        stamp_run(allow_dirty)
    setup(threads)
    with err_console.status("timing MobileNetV2 per cut ..."):
        result = run_latency(cost=cost, accelerator_file=accelerator_times, repeats=repeats)
    if out is not None:
        stem = "tee-latency_mobilenet-v2_cpu-1thread"
        paths = [write_json(out / f"{stem}.json", result), plot_latency(result, out / f"{stem}.png")]
        err_console.print("wrote " + ", ".join(str(p) for p in paths))
    if json_output:
        print_json({k: v for k, v in result.items() if k != "cpu"})
        return
    typer.echo(f"MobileNetV2 (ImageNet weights), batch 1, this CPU whole model {result['cpu']['whole_s'] * 1e3:.1f} ms; "
               f"enclave x{cost.enclave_slowdown:g}; sealing {result['seal_seconds'] * 1e3:.3f} ms; {result['attestation']}")
    gpu = {r["cut"]: r for r in result.get("rows_gpu_accelerator", [])}
    for row in result["rows_cpu_accelerator"]:
        extra = f"  | GPU accelerator: {gpu[row['cut']]['speedup_vs_all_tee']:.2f}x" if row["cut"] in gpu else ""
        typer.echo(f"  cut {row['cut']:2d} {'x'.join(map(str, row['feature_shape'])):>12s}: enclave {row['enclave_ms']:6.2f} ms, "
                   f"accelerator {row['accelerator_ms']:6.2f} ms, speed-up {row['speedup_vs_all_tee']:.2f}x{extra}")


@app.command("lm")
def lm(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registered model name or local model directory."),
    split: str = typer.Option(DEFAULT_LM_SPLIT, "--split", "-s", help="The Λ-split's cuts; the trunk runs in the trusted executor."),
    prompt: str = typer.Option("Explain in three sentences why the sky is blue.", "--prompt", help="The chat prompt."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1, help="Tokens generated per run."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Runs of each service (alternating); the median counts."),
    out: Path = typer.Option(None, "--out", help="Write the record (JSON) into this folder."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
    allow_dirty: bool = allow_dirty_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """`serve --enclave` measured: tokens against unsplit, decode tokens/s against the plain service, and the exact
    text attack on every byte the operator's process relayed."""
    import tempfile

    from splitveil.core.records import write_json
    from splitveil.experiments.tee_partition import run_enclave_lm
    from splitveil.plan.plan import parse_cuts

    cuts = parse_cuts(split)
    if len(cuts) != 2:
        raise ConfigError("give a Λ-split: --split A,B")
    if out is not None:
        stamp_run(allow_dirty)
    setup(threads)
    with tempfile.TemporaryDirectory(prefix="splitveil-observe-") as folder, \
            err_console.status("unsplit, plain service, enclave service, attack ..."):
        result = run_enclave_lm(model, cuts, prompt, max_new_tokens=max_new_tokens, observe_dir=Path(folder),
                                repeats=repeats)
    if out is not None:
        path = write_json(out / f"tee-enclave-lm_{Path(model).name}_split-{'-'.join(map(str, cuts))}.json", result)
        err_console.print(f"wrote {path}")
    if json_output:
        print_json(result)
        return
    typer.echo(f"{model} Λ-split {split}; attestation: {result['attestation']}")
    for name, run_ in result["runs"].items():
        typer.echo(f"  {name:16s} {run_['decode_tokens_per_second']:6.2f} tok/s, tokens identical to unsplit: "
                   f"{run_['tokens_identical_to_unsplit']}")
    seen = result["operator_observed"]
    typer.echo(f"enclave / plain throughput: {result['enclave_vs_plain_throughput']:.3f}")
    typer.echo(f"exact attack on the operator's {seen['observed_bytes_up']} relayed bytes: token recovery "
               f"{seen['token_recovery_observed']:.3f} (control, clear uplink: {seen['token_recovery_clear_control']:.3f})")
