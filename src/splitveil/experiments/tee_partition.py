"""Choosing a TEE | accelerator cut by measured attacks: attacks at every cut, the cost model, the selection rule.

`run_partition(spec)` runs the image attacks (by default the c-GAN and the inverse network, black box: trained on
the attacker's auxiliary data queried through the real first part; and rMLE, white box: the cloud that owns the model
knows the first part's weights) and MINE at every candidate cut with the image-privacy sweep (same victims, same
cache), measures each segment's compute, the sealing cost and the feature maps' release on this machine, and returns
one record: the attack records, the cost figures and the `partition --json` table (each cut's required tau, and a
verdict line that says plainly when no cut qualifies).
`write_partition_report` writes the record (JSON), the SSIM / speed-up plot and the reconstructions at p-1, p, p+1.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from splitveil.core.errors import ConfigError
from splitveil.tee.cost import CostModel
from splitveil.tee.select import DEFAULT_ATTACKS, DEFAULT_TAU


@dataclass(frozen=True)
class PartitionSpec:
    dataset: str = "fashion-mnist"
    model: str = "vgg"
    tau: float = DEFAULT_TAU  # SSIM threshold: the chosen cut's strongest attack must stay below it
    attacks: tuple[str, ...] = DEFAULT_ATTACKS  # the strongest at each cut counts; rmle is the white-box one
    cuts: tuple[int, ...] = ()  # candidate cuts (blocks in the enclave); empty = every block boundary 1..blocks
    quick: bool = False
    seed: int = 0
    jobs: int = 1  # worker processes for the attacks (one torch thread each)
    cost: CostModel = field(default_factory=CostModel)
    timing_batch: int = 64  # images per timed forward

    def __post_init__(self):
        """Refuses, with one line, what no run could do: unknown names, a cut out of range, tau outside (0, 1]."""
        from splitveil.experiments.image_privacy import check_image_names
        from splitveil.plan.plan import check_block_cut

        blocks = check_image_names(self.dataset, self.model, list(self.attacks))
        if not self.attacks:
            raise ConfigError("give at least one attack (--attacks)")
        for cut in self.cuts:
            check_block_cut(cut, blocks, flag="--cuts", model=self.model)
        if not 0 < self.tau <= 1:
            raise ConfigError(f"--tau must be in (0, 1], got {self.tau}")
        if self.jobs < 1 or self.timing_batch < 1 or self.seed < 0:
            raise ConfigError(f"jobs and timing_batch must be at least 1 and seed non-negative, got {self.jobs}, "
                              f"{self.timing_batch}, {self.seed}")

    def attack_spec(self):
        """The image-privacy spec the attacks run with: `attack image-sweep` sizes (so its cached victims are reused);
        quick runs estimate MINE once per cut instead of three times (MINE is reported, not used to choose)."""
        from splitveil.experiments.image_privacy import ImageAttackSpec

        if self.quick:
            return ImageAttackSpec.quick(dataset=self.dataset, model=self.model, seed=self.seed, mine_repeats=1)
        return ImageAttackSpec(dataset=self.dataset, model=self.model, seed=self.seed)

    def to_dict(self) -> dict:
        return {**asdict(self), "cost": self.cost.to_dict()}


def measure_costs(spec: PartitionSpec, victim, images, cuts: list[int]) -> dict:
    """Segment times, sealing and release costs on this machine, and the per-cut cost table."""
    import torch

    from splitveil.tee.cost import partition_costs, release_seconds, sealing_seconds, segment_times

    batch = images[:spec.timing_batch]
    segments = segment_times(victim, batch)
    with torch.no_grad():
        logits = victim(batch)
        releases = {cut: release_seconds(victim.run(batch, 0, victim.num_prologue + cut)) for cut in cuts}
    seal = sealing_seconds(batch.numel() * 4, logits.numel() * 4)
    costs = partition_costs(segments, cuts, model=spec.cost, seal_seconds=seal, release_seconds=releases,
                            prologue=victim.num_prologue)
    return {"batch": len(batch), "segment_seconds": segments, "seal_seconds": seal, "release_seconds": releases,
            "input_bytes": batch.numel() * 4, "output_bytes": logits.numel() * 4, "costs": costs}


def run_partition(spec: PartitionSpec, *, on_records=None, resume: bool = False) -> dict:
    """Attacks at every candidate cut, costs, and the chosen cut; one record (JSON-ready). With `resume`, cuts an
    earlier run of the same commit and settings finished are read back (`run_image_sweep`)."""
    from splitveil.experiments.image_privacy import run_image_sweep
    from splitveil.train.victims import splits_and_victim
    from splitveil.core.records import environment
    from splitveil.tee.channel import SIMULATED
    from splitveil.tee.select import partition_table

    stamp = environment()
    began = time.perf_counter()
    attack_spec = spec.attack_spec()
    splits, victim, _ = splits_and_victim(attack_spec)
    cuts = list(spec.cuts) or list(range(1, victim.num_blocks + 1))
    records = run_image_sweep(attack_spec, cuts, list(spec.attacks), jobs=spec.jobs, on_records=on_records,
                              resume=resume)
    attack_seconds = time.perf_counter() - began
    victim.eval()
    costs = measure_costs(spec, victim, splits.test.images, cuts)
    table = partition_table(records, costs["costs"], spec.tau)
    return {"kind": "tee-partition", "spec": spec.to_dict(), "attack_spec": asdict(attack_spec),
            "dataset": spec.dataset, "model": spec.model, "attestation": SIMULATED,
            **table, "costs": costs, "attack_records": records,
            "accuracy": records[0]["accuracy"], "accuracy_unsplit": records[0]["accuracy_unsplit"],
            "attack_seconds": attack_seconds, "seconds": time.perf_counter() - began, "environment": stamp}


def summary(result: dict) -> dict:
    """The `--json` object: chosen cut, tau, per cut the strongest attack's SSIM, MINE and the speed-up, and how long
    each learned attacker trained (epochs, whether it stopped on its plateau)."""
    keys = ("cut", "ssim", "attack", "white_box", "required_tau", "qualifies", "mine", "speedup_vs_all_tee",
            "ssim_by_attack", "feature_shape")
    training = [{"cut": r["split"], "attack": r["attack"], "attacker_epochs": r["attacker_epochs"],
                 "attacker_converged": r["attacker_converged"]}
                for r in result["attack_records"] if "attacker_epochs" in r]
    return {"chosen_cut": result["chosen_cut"], "tau": result["tau"], "verdict": result["verdict"],
            "attacks": result["attacks"], "attestation": result["attestation"],
            "enclave_slowdown": result["spec"]["cost"]["enclave_slowdown"],
            "accelerator_speedup": result["spec"]["cost"]["accelerator_speedup"],
            "cuts": [{k: row.get(k) for k in keys} for row in result["cuts"]],
            "attacker_training": training, "attackers_converged": all(t["attacker_converged"] for t in training)}


def partition_markdown(result: dict) -> str:
    """The report a reader (or the docs) quotes: provenance and trust assumption, the verdict, and per cut the SSIM of
    every attack, the strongest, the tau the cut would need, MINE, the speed-up, and how long each learned attacker
    trained (epochs, * = stopped by the cap before its held-out loss plateaued)."""
    env = result.get("environment", {})
    attacks = result["attacks"]
    training: dict = {}
    resumed = False
    for record in result["attack_records"]:
        resumed = resumed or bool(record.get("resumed"))
        if "attacker_epochs" in record:
            mark = "" if record["attacker_converged"] else "*"
            training.setdefault(int(record["split"]), []).append(f"{record['attack']} {record['attacker_epochs']}{mark}")
    spec = result["spec"]
    lines = [
        f"# TEE cut selection: {result['model']} on {result['dataset']}{' (--quick)' if spec.get('quick') else ''}",
        "",
        f"Attestation: {result['attestation']}. Commit {str(env.get('git_sha'))[:12]}"
        f"{' (uncommitted changes)' if env.get('git_dirty') else ''}, {env.get('timestamp', '?')}"
        f"{'; some cuts resumed from an earlier run of the same commit' if resumed else ''}. "
        f"Victim accuracy {result['accuracy']:.3f}. Enclave slow-down x{spec['cost']['enclave_slowdown']:g}, "
        f"accelerator x{spec['cost']['accelerator_speedup']:g}. Attack time {result['attack_seconds'] / 60:.0f} min.",
        "",
        f"**{result['verdict']}**",
        "",
        "| cut | " + " | ".join(f"{a} SSIM" for a in attacks) + " | strongest | needs tau > | MINE (nats) | speed-up vs all-in-TEE "
        "| attacker epochs |",
        "|---" * (len(attacks) + 6) + "|",
    ]
    for row in result["cuts"]:
        cells = [f"{row['ssim_by_attack'][a]:.3f}" if a in row["ssim_by_attack"] else "-" for a in attacks]
        mine = f"{row['mine']:.2f}" if isinstance(row.get("mine"), (int, float)) else "-"
        kind = "white box" if row["white_box"] else "black box"
        lines.append(f"| {row['cut']} | " + " | ".join(cells) + f" | {row['attack']} ({kind}) | {row['required_tau']:.3f} "
                     f"| {mine} | {row['speedup_vs_all_tee']:.2f}x | {', '.join(training.get(row['cut'], [])) or '-'} |")
    lines += ["", f"tau = {result['tau']:g}: the chosen cut is the smallest whose strongest attack scores below it. "
              "* after an epoch count: the cap stopped that attacker before its held-out loss plateaued.", ""]
    return "\n".join(lines)


def write_partition_report(result: dict, out_dir, stem: str) -> list:
    """`<stem>.json` (the record), `<stem>.md` (`partition_markdown`), `<stem>.png` (SSIM per attack and speed-up
    against the cut, tau, the chosen cut) and `<stem>_recon.png` (originals and the strongest attack's
    reconstructions at p-1, p, p+1)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splitveil.core.records import save_figure, write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = result["chosen_cut"] if result["chosen_cut"] is not None else max(r["cut"] for r in result["cuts"])
    kept = {chosen - 1, chosen, chosen + 1}  # the examples the reconstruction figure shows; the rest are dropped
    record = {**result, "attack_records": [r if int(r["split"]) in kept else {k: v for k, v in r.items() if k != "examples"}
                                           for r in result["attack_records"]]}
    paths = [write_json(out_dir / f"{stem}.json", record)]
    markdown = out_dir / f"{stem}.md"
    markdown.write_text(partition_markdown(result))
    paths.append(markdown)
    rows, chosen, tau = result["cuts"], result["chosen_cut"], result["tau"]
    cuts = [r["cut"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for attack in sorted({a for r in rows for a in r["ssim_by_attack"]}):
        ax.plot(cuts, [r["ssim_by_attack"].get(attack, float("nan")) for r in rows], "o-", label=f"{attack} SSIM")
    ax.axhline(tau, color="grey", linestyle="--", label=f"tau = {tau:g}")
    if chosen is not None:
        ax.axvline(chosen, color="green", alpha=0.4, linewidth=6, label=f"chosen cut {chosen}")
    ax.set_xlabel("cut p (blocks in the enclave)")
    ax.set_ylabel("SSIM of the reconstruction")
    ax.set_xticks(cuts)
    speed = ax.twinx()
    speed.plot(cuts, [r["speedup_vs_all_tee"] for r in rows], "s:", color="black", label="speed-up vs all-in-TEE")
    speed.set_ylabel(f"speed-up vs all-in-TEE (enclave x{result['spec']['cost']['enclave_slowdown']:g})")
    handles = ax.get_legend_handles_labels()[0] + speed.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    verdict = f"chosen cut {chosen}" if chosen is not None else f"no cut qualifies at tau {tau:g}"
    ax.set_title(f"{result['model']} on {result['dataset']}: strongest attack vs speed-up ({verdict})", fontsize=9)
    paths.append(save_figure(fig, out_dir / f"{stem}.png"))
    recon = plot_reconstructions(result, out_dir / f"{stem}_recon.png")
    if recon is not None:
        paths.append(recon)
    return paths


def plot_reconstructions(result: dict, path):
    """Originals and the strongest attack's reconstructions at the cuts around the chosen one (or the deepest)."""
    import matplotlib.pyplot as plt

    from splitveil.core.records import save_figure
    from splitveil.tee.select import strongest_by_cut

    strongest = strongest_by_cut(result["attack_records"])
    p = result["chosen_cut"] if result["chosen_cut"] is not None else max(strongest)
    shown = [c for c in (p - 1, p, p + 1) if c in strongest]
    if not shown:
        return None
    originals = strongest[shown[0]]["examples"]["originals"]
    n = min(6, len(originals))
    fig, axes = plt.subplots(1 + len(shown), n, figsize=(1.3 * n, 1.4 * (1 + len(shown))), squeeze=False)
    rows = [("input", originals)] + [(f"p={c} {strongest[c]['attack']}\nSSIM {strongest[c]['ssim']:.2f}",
                                      strongest[c]["examples"]["reconstructions"]) for c in shown]
    for i, (label, images) in enumerate(rows):
        for j in range(n):
            axes[i][j].imshow(images[j][0], cmap="gray", vmin=0, vmax=1)
            axes[i][j].set_xticks([])
            axes[i][j].set_yticks([])
        axes[i][0].set_ylabel(label, fontsize=7)
    fig.suptitle(f"reconstructions at cuts {', '.join(map(str, shown))} (chosen {result['chosen_cut']})", fontsize=8)
    return save_figure(fig, path)


def range_seconds(model, example, start: int, end: int, *, repeats: int = 20, device: str = "cpu") -> float:
    """Median seconds of segments [start, end) of `model` on `example` (input of segment `start`), on `device`."""
    import statistics

    import torch

    synchronise = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            synchronise()
            began = time.perf_counter()
            model.run(example, start, end)
            synchronise()
            if i >= 3:  # warm-up
                times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure_latency(model, images, cuts: list[int], *, device: str = "cpu", repeats: int = 20) -> dict:
    """Per cut p: the measured seconds of the enclave's part [0, p) and of the accelerator's part [p, end) on `device`,
    and the whole model's (each range timed as one run, so launch and memory effects count)."""
    import torch

    model = model.to(device).eval()
    images = images.to(device)
    end = len(model.segments)
    rows = {}
    with torch.no_grad():
        for cut in cuts:
            inside = model.num_prologue + cut
            features = model.run(images, 0, inside)
            rows[cut] = {"prefix_s": range_seconds(model, images, 0, inside, repeats=repeats, device=device),
                         "suffix_s": range_seconds(model, features, inside, end, repeats=repeats, device=device),
                         "feature_shape": list(features.shape[1:]), "feature_bytes": features[0].numel() * 4}
    whole = range_seconds(model, images, 0, end, repeats=repeats, device=device)
    return {"device": device, "batch": len(images), "whole_s": whole, "cuts": rows,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}


def latency_table(cpu: dict, *, cost: CostModel, seal_seconds: float, accelerator: dict | None = None) -> list[dict]:
    """Per cut: the enclave's time (CPU prefix x slow-down + sealing), the accelerator's (its measured suffix, or the
    CPU's divided by the cost model's speed-up) and the speed-up over all-in-TEE (CPU whole x slow-down + sealing)."""
    all_tee = cost.enclave_slowdown * cpu["whole_s"] + seal_seconds
    rows = []
    for cut, row in sorted(cpu["cuts"].items(), key=lambda item: int(item[0])):
        measured = accelerator["cuts"][str(cut)]["suffix_s"] if accelerator else None
        untrusted = measured if measured is not None else row["suffix_s"] / cost.accelerator_speedup
        trusted = cost.enclave_slowdown * row["prefix_s"] + seal_seconds
        rows.append({"cut": int(cut), "feature_shape": row["feature_shape"], "enclave_ms": trusted * 1e3,
                     "accelerator_ms": untrusted * 1e3, "total_ms": (trusted + untrusted) * 1e3,
                     "speedup_vs_all_tee": all_tee / (trusted + untrusted)})
    return rows


def run_latency(*, cost: CostModel, accelerator_file=None, repeats: int = 20) -> dict:
    """The ImageNet MobileNetV2 (real weights, scikit-image photos, batch 1) on this CPU: per-cut enclave and
    accelerator times, speed-ups over all-in-TEE; the accelerator's times from `accelerator_file` (a
    `measure_latency` JSON made on a GPU, key `cuda_b1`) when given."""
    import json

    import torch

    from splitveil.core.records import environment
    from splitveil.models.mobilenet import load_mobilenet_v2_imagenet
    from splitveil.tee.channel import SIMULATED
    from splitveil.tee.cost import sealing_seconds
    from splitveil.tee.process import imagenet_photos

    stamp = environment()
    model = load_mobilenet_v2_imagenet()
    photos = imagenet_photos()
    with torch.no_grad():
        top1 = model(photos).argmax(-1).tolist()
    image = photos[:1]
    cpu = measure_latency(model, image, list(range(1, model.num_blocks + 1)), repeats=repeats)
    cpu["cuts"] = {str(k): v for k, v in cpu["cuts"].items()}
    seal = sealing_seconds(image.numel() * 4, 1000 * 4)
    accelerator = None
    if accelerator_file is not None:
        measured = json.loads(open(accelerator_file).read())
        accelerator = measured.get("cuda_b1")
    result = {"kind": "tee-latency", "model": "mobilenet_v2 (ImageNet, torchvision weights)", "batch": 1,
              "attestation": SIMULATED, "cost": cost.to_dict(), "seal_seconds": seal, "cpu": cpu,
              "photos_top1": top1, "rows_cpu_accelerator": latency_table(cpu, cost=cost, seal_seconds=seal),
              "environment": stamp}
    if accelerator is not None:
        result["accelerator"] = {"file": str(accelerator_file), "device_name": accelerator.get("device_name"),
                                 "whole_s": accelerator["whole_s"]}
        result["rows_gpu_accelerator"] = latency_table(cpu, cost=cost, seal_seconds=seal, accelerator=accelerator)
    return result


def plot_latency(result: dict, path) -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splitveil.core.records import save_figure

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for key, label in (("rows_cpu_accelerator", "accelerator = this CPU"), ("rows_gpu_accelerator", "accelerator = GPU")):
        if key in result:
            rows = result[key]
            ax.plot([r["cut"] for r in rows], [r["speedup_vs_all_tee"] for r in rows], "o-", label=label)
    ax.axhline(1, color="grey", linestyle=":")
    ax.set_xlabel("cut p (MobileNetV2 blocks in the enclave)")
    ax.set_ylabel("speed-up vs all-in-TEE")
    ax.set_title(f"MobileNetV2 ImageNet, batch 1, enclave x{result['cost']['enclave_slowdown']:g}", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def attack_observed(lm, observed_up: bytes, prompt_ids: list[int], *, rows: int = 8, budget: int = 512) -> dict:
    """The exact text attack on what the operator relayed, and, as the control, on the clear uplink of the same prompt.

    The operator's bytes are read the attacker's best way (`observed_as_states`: every aligned run of float32 values
    that could be a hidden state); the first `rows` such rows are inverted against the prompt's first tokens.
    """
    import torch

    from splitveil.attack.text.attacks import ExactInversion
    from splitveil.attack.text.target import TextTarget
    from splitveil.metrics.text import token_recovery
    from splitveil.tee.enclave_lm import observed_as_states

    target = TextTarget.from_split(lm)
    hidden = lm.splittable.hidden_size
    states = observed_as_states(observed_up, hidden)[:rows]
    attack = ExactInversion(target, max_verified=budget)
    truth = prompt_ids[:rows]
    recovered = attack.reconstruct(states) if len(states) else []
    head = target.copy_of("head")
    with torch.no_grad():
        clear = head.forward(torch.tensor([truth]))[0]  # [T, H]: what a plain Λ-split's uplink carries
    control = ExactInversion(target, max_verified=budget).reconstruct(clear)
    return {"observed_bytes_up": len(observed_up), "plausible_rows": int(len(observed_as_states(observed_up, hidden, plausible_only=True))),
            "rows_attacked": len(states), "budget_per_position": budget,
            "token_recovery_observed": token_recovery(truth[:len(recovered)], recovered) if recovered else 0.0,
            "token_recovery_clear_control": token_recovery(truth, control),
            "prompt_bytes_in_observed": any(bytes(tok, "utf-8") in observed_up for tok in ("capital", "France"))}


def run_enclave_lm(model: str, cuts: tuple[int, ...], prompt: str, *, max_new_tokens: int = 48, observe_dir,
                   repeats: int = 3, attack_rows: int = 8) -> dict:
    """Unsplit vs Λ-split over the plain service (TLS) vs Λ-split with the trunk in the trusted executor: tokens,
    decode tokens/s (plain and enclave runs alternate, both servers up, median of `repeats`), and the exact attack on
    what the operator relayed."""
    import statistics

    from splitveil.edge.generate import GenerationConfig, SplitCausalLM
    from splitveil.core.records import environment
    from splitveil.models.loading import load_causal_lm
    from splitveil.plan.plan import SplitPlan
    from splitveil.serve.process import ServerProcess
    from splitveil.tee.channel import SIMULATED
    from splitveil.tee.enclave_lm import EnclaveOperator, read_observed
    from splitveil.transport.network import WebSocketTransport

    stamp = environment()
    weights, tokenizer = load_causal_lm(model)
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    plan = SplitPlan.from_cuts(cuts)
    reference = SplitCausalLM(weights, tokenizer=tokenizer).generate(prompt, config, chat=True)
    from pathlib import Path

    observe = Path(observe_dir) / "operator-observed.bin"
    observe.unlink(missing_ok=True)
    runs: dict[str, list] = {"unsplit": [reference], "plain_service": [], "enclave_service": []}
    with ServerProcess(model, tuple(cuts)) as server, EnclaveOperator(model, tuple(cuts), observe=observe) as operator:
        plain = SplitCausalLM(weights, plan, tokenizer=tokenizer, transport=WebSocketTransport(
            server.url, token=server.token, pin_sha256=server.fingerprint, timeout=300))
        sealed = SplitCausalLM(weights, plan, tokenizer=tokenizer, transport=operator.transport())
        for lm in (plain, sealed):
            lm.generate(prompt, GenerationConfig(max_new_tokens=2), chat=True)  # warm-up (TLS / attestation)
        for _ in range(repeats):
            runs["plain_service"].append(plain.generate(prompt, config, chat=True))
            runs["enclave_service"].append(sealed.generate(prompt, config, chat=True))
        plain.close()
        sealed.close()
        measurement = operator.measurement.hex()
    for _ in range(repeats - 1):
        runs["unsplit"].append(SplitCausalLM(weights, tokenizer=tokenizer).generate(prompt, config, chat=True))
    observed = read_observed(observe)
    attack = attack_observed(SplitCausalLM(weights, plan, tokenizer=tokenizer), observed["up"], reference.prompt_ids,
                             rows=attack_rows)
    speed = {name: statistics.median(r.decode_tokens_per_second for r in results) for name, results in runs.items()}
    return {"kind": "tee-enclave-lm", "model": model, "cuts": list(cuts), "attestation": SIMULATED,
            "measurement": measurement, "prompt": prompt, "max_new_tokens": max_new_tokens, "repeats": repeats,
            "runs": {name: {"tokens_identical_to_unsplit": all(r.token_ids == reference.token_ids for r in results),
                            "generated_tokens": len(results[0].token_ids),
                            "decode_tokens_per_second": speed[name],
                            "decode_tokens_per_second_runs": [r.decode_tokens_per_second for r in results],
                            "bytes_up": results[0].bytes_up, "bytes_down": results[0].bytes_down,
                            "round_trips": results[0].round_trips, "text": results[0].text}
                     for name, results in runs.items()},
            "enclave_vs_plain_throughput": speed["enclave_service"] / speed["plain_service"],
            "operator_observed": attack, "environment": stamp}
