"""Diffusion benchmarks in stages: grid -> raw records (JSONL) -> summary (JSON) -> plots (PNG).

- traffic: bytes up and down, per step and per picture, for each placement, cut and wire codec;
- quality against bits: PSNR and SSIM of the fp16, bf16 and int8 wire's pictures against the fp32 wire's (which
  equals the unsplit picture), per placement;
- leakage: prompt recovery and the SSIM of the cloud's reconstruction per step, per placement (and cut);
- sample quality: the Fashion-MNIST classifier's accuracy on generated pictures.

Run: `python -m splitveil.experiments.diffusion_bench --out benchmarks/results` (records are stamped with the
commit; `--allow-dirty` to run on uncommitted code, the records then say so; `--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

WIRES = ("fp32", "fp16", "bf16", "int8")
BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8}
PROMPTS = ("a photo of a sneaker", "a photo of a bag", "a photo of a dress", "a photo of a coat", "a photo of a trouser")


def traffic_and_quality(model, *, prompts=PROMPTS, steps: int = 10, guidance: float = 3.0) -> list[dict]:
    """One record per (placement, cut, wire, prompt): bytes and round trips counted by the transport, and the
    picture's PSNR/SSIM against the unsplit one."""
    from splitveil.diffusion.generate import GenerationSpec, generate_image, loopback_transport
    from splitveil.diffusion.unet_split import UNetSplittable
    from splitveil.metrics.image import psnr, ssim

    grid = [("reference", None)] + [("unet-split", a) for a in range(1, UNetSplittable(model.unet).n + 1)]
    records = []
    for seed, prompt in enumerate(prompts):
        base = generate_image(model, GenerationSpec(prompt, placement="none", steps=steps, seed=seed, guidance=guidance))
        for placement, head_blocks in grid:
            for wire in WIRES:
                transport = loopback_transport(model, placement, head_blocks or 1)
                result = generate_image(model, GenerationSpec(prompt, placement=placement, steps=steps, seed=seed,
                                                              guidance=guidance, wire=wire, head_blocks=head_blocks or 1),
                                        transport=transport)
                records.append({
                    "kind": "diffusion-traffic", "model": model.name, "placement": placement, "split": head_blocks,
                    "wire": wire, "bits": BITS[wire], "prompt": prompt, "seed": seed, "steps": steps,
                    "guidance": guidance, "bytes_up": result.bytes_up, "bytes_down": result.bytes_down,
                    "round_trips": result.round_trips, "bytes_per_step": round((result.bytes_up + result.bytes_down) / steps, 1),
                    "identical_to_unsplit": result.image_sha256 == base.image_sha256,
                    "psnr_vs_unsplit": None if result.image_sha256 == base.image_sha256 else round(psnr(result.picture[None], base.picture[None]), 3),
                    "ssim_vs_unsplit": round(ssim(result.picture[None], base.picture[None]), 5),
                    "seconds": round(result.seconds, 4)})
    return records


def summarise_traffic(records: list[dict]) -> list[dict]:
    """Mean figures per (placement, split, wire)."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["placement"], r["split"], r["wire"]), []).append(r)
    rows = []
    for (placement, split, wire), rs in groups.items():
        finite = [r["psnr_vs_unsplit"] for r in rs if r["psnr_vs_unsplit"] is not None]
        rows.append({"placement": placement, "split": split, "wire": wire, "bits": BITS[wire], "pictures": len(rs),
                     "bytes_up": rs[0]["bytes_up"], "bytes_down": rs[0]["bytes_down"], "round_trips": rs[0]["round_trips"],
                     "bytes_per_step": rs[0]["bytes_per_step"],
                     "identical_to_unsplit": sum(r["identical_to_unsplit"] for r in rs) / len(rs),
                     "psnr_vs_unsplit_db": round(sum(finite) / len(finite), 2) if finite else "inf (identical)",
                     "ssim_vs_unsplit": round(sum(r["ssim_vs_unsplit"] for r in rs) / len(rs), 5)})
    return rows


def leakage(model, *, quick: bool = False, pictures_stem: Path | None = None) -> list[dict]:
    """Both attacks per placement, cut and wire; the fp32 runs of reference and unet-split (head 1) also save their
    reconstructions beside the real pictures as `<pictures_stem>_reconstructions_<placement>.png`."""
    from splitveil.diffusion.unet_split import UNetSplittable
    from splitveil.experiments.diffusion_privacy import DiffusionAttackSpec, run_diffusion_attack

    make = DiffusionAttackSpec.quick if quick else DiffusionAttackSpec
    grid = [("reference", 1, "fp32"), ("reference", 1, "int8")]
    grid += [("unet-split", a, "fp32") for a in range(1, UNetSplittable(model.unet).n + 1)] + [("unet-split", 1, "int8")]
    records = []
    for p, a, w in grid:
        pictures = None
        if pictures_stem is not None and a == 1 and w == "fp32":
            pictures = pictures_stem.with_name(f"{pictures_stem.name}_reconstructions_{p}.png")
        records.append(run_diffusion_attack(make(model=model.name, placement=p, head_blocks=a, wire=w), model=model,
                                            pictures_out=pictures))
    return records


def plot_quality(summary: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splitveil.core.records import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    finite = [r["psnr_vs_unsplit_db"] for r in summary if not isinstance(r["psnr_vs_unsplit_db"], str)]
    top = round(max(finite, default=50) + 10)  # where bit-identical pictures (infinite PSNR) are drawn
    for placement, split in sorted({(r["placement"], r["split"]) for r in summary}, key=str):
        rows = sorted([r for r in summary if r["placement"] == placement and r["split"] == split], key=lambda r: WIRES.index(r["wire"]))
        label = placement if split is None else f"{placement} (head {split})"
        psnrs = [top if isinstance(r["psnr_vs_unsplit_db"], str) else r["psnr_vs_unsplit_db"] for r in rows]
        left.plot([r["wire"] for r in rows], psnrs, marker="o", label=label)
        right.plot([r["wire"] for r in rows], [r["ssim_vs_unsplit"] for r in rows], marker="o", label=label)
    left.set_ylabel(f"PSNR vs unsplit (dB; identical at {top})")
    right.set_ylabel("SSIM vs unsplit")
    for ax in (left, right):
        ax.set_xlabel("wire codec (32, 16, 16, 8 bits)")
        ax.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle("Picture quality against the bits on the wire", fontsize=9)
    return save_figure(fig, path)


def plot_traffic(summary: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splitveil.core.records import save_figure

    fig, ax = plt.subplots(figsize=(7, 3.4))
    configs = sorted({(r["placement"], r["split"]) for r in summary}, key=str)
    width = 0.2
    for offset, wire in enumerate(WIRES):
        values = [next(r["bytes_per_step"] for r in summary if (r["placement"], r["split"]) == c and r["wire"] == wire) / 1024
                  for c in configs]
        ax.bar([i + (offset - 1.5) * width for i in range(len(configs))], values, width, label=wire)
    ax.set_xticks(range(len(configs)), [p if s is None else f"{p}\nhead {s}" for p, s in configs], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("KiB per denoising step (up + down)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Traffic per step, counted by the transport", fontsize=9)
    return save_figure(fig, path)


def plot_leakage(records: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splitveil.core.records import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for r in records:
        spec = r["spec"]
        label = f"{r['placement']}" + (f" head {spec['head_blocks']}" if r["placement"] == "unet-split" else "") + f" {spec['wire']}"
        ax.plot(range(len(r["ssim_by_step"])), r["ssim_by_step"], marker=".", label=f"{label} (prompt {r['prompt_token_recovery']:.2f})")
    ax.set_xlabel("denoising step the cloud holds (reference: step N = final latents)")
    ax.set_ylabel("SSIM of the better rebuild vs final\n(chosen with the true picture)", fontsize=7)
    ax.set_ylim(-0.3, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.suptitle("What the cloud sees of the picture, per step (legend: prompt token recovery)", fontsize=9)
    return save_figure(fig, path)


def run_diffusion_bench(model_name: str, out: Path, *, quick: bool = False) -> list[Path]:
    """Traffic and quality against wire bits, leakage per placement and sample quality for `model_name`: records,
    summary and plots under `out`. The caller stamps the run (`stamp_run`) first."""
    from splitveil.diffusion.models import load_diffusion
    from splitveil.experiments.diffusion_quality import sample_quality
    from splitveil.core.records import environment, write_json, write_records

    env = environment()
    model = load_diffusion(model_name)
    stem = f"diffusion_{Path(model_name).name}"
    prompts = PROMPTS[:2] if quick else PROMPTS
    traffic = traffic_and_quality(model, prompts=prompts)
    write_records([{**r, "environment": env} for r in traffic], out, f"{stem}_traffic")
    summary = summarise_traffic(traffic)
    leaks = leakage(model, quick=quick, pictures_stem=out / stem)
    write_records(leaks, out, f"{stem}_leakage")
    quality = sample_quality(model, per_class=5 if quick else 20) if model_name == "fashion-mnist-diffusion" else None
    report = {"kind": "diffusion-summary", "model": model_name, "environment": env, "traffic": summary,
              "sample_quality": quality,
              "leakage": [{"placement": r["placement"], "split": r["spec"]["head_blocks"] if r["placement"] == "unet-split" else None,
                           "wire": r["spec"]["wire"], "prompt_token_recovery": r["prompt_token_recovery"],
                           "prompt_exact": r["prompt_exact"], "image_ssim": r["image_ssim"],
                           "image_ssim_step": r["image_ssim_step"], "ssim_oracle_upper_bound": r["ssim_oracle_upper_bound"],
                           "ssim_by_step": r["ssim_by_step"]} for r in leaks]}
    write_json(out / f"{stem}_summary.json", report)
    plot_quality(summary, out / f"{stem}_quality_vs_bits.png")
    plot_traffic(summary, out / f"{stem}_bytes_per_step.png")
    plot_leakage(leaks, out / f"{stem}_leakage_by_step.png")
    return sorted(out.glob(f"{stem}_*"))


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m splitveil.experiments.diffusion_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--model", default="fashion-mnist-diffusion")
    parser.add_argument("--quick", action="store_true", help="2 prompts, quick attacks")
    parser.add_argument("--allow-dirty", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from splitveil.core.errors import SplitveilError
    from splitveil.core.records import stamp_run

    torch.set_num_threads(1)
    try:
        stamp_run(allow_dirty=args.allow_dirty)
        written = run_diffusion_bench(args.model, args.out, quick=args.quick)
    except SplitveilError as error:
        print(f"diffusion_bench: error: {error.message}", file=sys.stderr)
        return 2
    print(json.dumps({"wrote": [str(p) for p in written]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
