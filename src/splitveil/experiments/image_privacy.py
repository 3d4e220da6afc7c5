"""What the cloud reconstructs of a split image classifier's private inputs: train (cached), split, attack, score.

`run_image_attack(spec)` gives one record (a dict, JSON-ready); `write_image_report` turns records into JSONL, a grid
of originals vs reconstructions, a plot of SSIM and MINE against split depth, and a Markdown report.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from splitveil.core.errors import ConfigError

#: examples kept in each record for the report's grid
GRID_EXAMPLES = 8


@dataclass(frozen=True)
class ImageAttackSpec:
    dataset: str = "fashion-mnist"
    model: str = "vgg"
    split: int = 1  # cut after this many blocks: the edge runs blocks [0, split), the cloud the rest
    attack: str = "inverse"
    seed: int = 0
    samples: int = 500  # test images attacked and scored
    train_size: int = 30_000  # victim's training images (capped at 45% of the data set)
    aux_size: int = 15_000  # attacker's auxiliary images, disjoint from the victim's (capped at 40%)
    test_size: int = 2_000  # held-out images: attacked ones are the first `samples`; MINE uses all
    epochs: int = 1  # victim classifier epochs
    attack_epochs: int = 2  # decoder / substitute / c-GAN epochs over the auxiliary set ...
    min_attack_steps: int = 300  # ... or more, so that a small auxiliary set still gets this many batches of 64
    rmle_steps: int = 300
    mine_steps: int = 500
    mine_repeats: int = 3  # MINE estimates (seeds seed, seed+1, ...) averaged per cut: one is noisy
    mine_lr: float = 5e-4  # at 500 steps, 1e-3 sent some seeds astray (cut 3: 2.17 to 4.44 nats; 5e-4: 4.36 to 4.38)
    attack_options: dict = field(default_factory=dict)  # extra keyword arguments of the attack

    @classmethod
    def quick(cls, **overrides) -> "ImageAttackSpec":
        """Sizes for a run of a minute or two on one thread once the victim is cached."""
        return cls(**{"samples": 200, "train_size": 10_000, "aux_size": 5_000, "test_size": 1_000, "epochs": 1,
                      "attack_epochs": 1, "min_attack_steps": 100, "rmle_steps": 150, "mine_steps": 200, "mine_repeats": 3,
                      "mine_lr": 1e-3, **overrides})


def _sizes(n: int, spec: ImageAttackSpec) -> tuple[int, int, int]:
    train = min(spec.train_size, int(0.45 * n))
    aux = min(spec.aux_size, int(0.4 * n))
    test = min(spec.test_size, n - train - aux)
    return train, aux, test


def splits_and_victim(spec, *, quiet: bool = True):
    """The data splits of `spec` and its model trained on the train split (cached): what the image and the output
    privacy experiments share. `spec` has dataset, model, seed, epochs and train/aux/test sizes.

    Returns:
        (splits, victim, was_cached).
    """
    from splitveil.data.images import load_dataset, split_dataset
    from splitveil.models.vision_zoo import VISION_MODELS, build_vision_model
    from splitveil.train.classifier import TrainConfig, cached_classifier

    VISION_MODELS.get(spec.model)
    data = load_dataset(spec.dataset)
    train, aux, test = _sizes(len(data), spec)
    splits = split_dataset(data, train=train, aux=aux, test=test, seed=spec.seed)
    shape, classes = data.image_shape, data.num_classes
    victim, cached = cached_classifier(
        lambda: build_vision_model(spec.model, shape, classes), splits.train.images, splits.train.labels,
        TrainConfig(epochs=spec.epochs, seed=spec.seed), quiet=quiet,
        key_fields={"dataset": spec.dataset, "model": spec.model, "train": train, "split_seed": spec.seed})
    return splits, victim, cached


def prepare_victim(spec: ImageAttackSpec, *, quiet: bool = True) -> dict:
    """Data splits, the trained victim (cached) and the separately trained evaluator for reconstructions."""
    from splitveil.models.vision_zoo import build_vision_model
    from splitveil.train.classifier import TrainConfig, cached_classifier

    splits, victim, cached = splits_and_victim(spec, quiet=quiet)
    shape, classes = splits.train.image_shape, splits.train.num_classes
    aux = len(splits.aux)
    # the evaluator: another architecture and seed, trained on the attacker-side (auxiliary) split
    evaluator_name = "lenet" if spec.model != "lenet" else "resnet"
    evaluator, _ = cached_classifier(
        lambda: build_vision_model(evaluator_name, shape, classes), splits.aux.images, splits.aux.labels,
        TrainConfig(epochs=5, seed=spec.seed + 1), quiet=quiet,
        key_fields={"dataset": spec.dataset, "model": f"{evaluator_name}-evaluator", "train": aux, "split_seed": spec.seed})
    return {"splits": splits, "victim": victim, "victim_cached": cached, "evaluator": evaluator,
            "evaluator_model": evaluator_name}


def attack_options(spec: ImageAttackSpec, aux_size: int) -> dict:
    """The attack's keyword arguments: its optimisation steps (rMLE) or training epochs (the others)."""
    epochs = max(spec.attack_epochs, math.ceil(spec.min_attack_steps / math.ceil(aux_size / 64)))
    options = {"steps": spec.rmle_steps} if spec.attack == "rmle" else {"epochs": epochs}
    return {**options, **spec.attack_options}


def run_image_attack(spec: ImageAttackSpec, *, quiet: bool = True, victim: dict | None = None,
                     mine_cache: dict | None = None) -> dict:
    """Runs one attack on one split and returns its record.

    Args:
        victim: a `prepare_victim(spec)` result to reuse (a sweep prepares it once).
        mine_cache: a dict reused across runs of one sweep: MINE depends on the split, not on the attack.
    """
    from splitveil.attack.image import IMAGE_ATTACKS, ImageTarget
    from splitveil.experiments.records import environment
    from splitveil.metrics.image import distance_correlation, mse, psnr, ssim
    from splitveil.metrics.mine import mine_estimate
    from splitveil.plan.plan import SplitPlan, apply
    from splitveil.train.classifier import accuracy, predict

    stamp = environment()  # the code and machine as the run starts
    attack_class = IMAGE_ATTACKS.get(spec.attack)
    began = time.perf_counter()
    victim = victim or prepare_victim(spec, quiet=quiet)
    splits, model = victim["splits"], victim["victim"]
    plan = SplitPlan.two_way(spec.split)
    edge, cloud = apply(model, plan)
    test = splits.test
    logits_unsplit = predict(model, test.images)
    logits_split = predict(lambda x: cloud(edge(x)), test.images)
    if not torch.equal(logits_split.argmax(-1), logits_unsplit.argmax(-1)):
        raise RuntimeError("the split classifier disagrees with the unsplit one")  # the Splittable contract broke
    target = ImageTarget.from_parts(edge, cloud, image_shape=test.image_shape, aux=splits.aux)
    n = min(spec.samples, len(test))
    if n < 2:
        raise ConfigError(f"{spec.dataset} leaves {len(test)} test image(s): too few to attack")
    originals = test.images[:n]  # [n, C, H, W]
    features = target.query(originals)  # [n, *feature_shape]: what the cloud receives
    attack = attack_class(target, seed=spec.seed, quiet=quiet, **attack_options(spec, len(splits.aux)))
    attack_began = time.perf_counter()
    attack.fit(features)
    reconstructions = attack.reconstruct(features).clamp(0, 1)
    attack_seconds = time.perf_counter() - attack_began
    baseline = splits.aux.images.mean(0, keepdim=True).expand_as(originals)  # the attacker's prior: the mean image
    key = (spec.dataset, spec.model, spec.split, spec.seed, len(test), spec.mine_steps, spec.mine_repeats, spec.mine_lr)
    if mine_cache is not None and key in mine_cache:
        mine_runs = mine_cache[key]
    else:
        test_features = target.query(test.images)
        mine_runs = [mine_estimate(test.images, test_features, steps=spec.mine_steps, lr=spec.mine_lr, seed=spec.seed + i)
                     for i in range(spec.mine_repeats)]
        if mine_cache is not None:
            mine_cache[key] = mine_runs
    evaluator = victim["evaluator"]
    return {
        "kind": "image-privacy",
        "spec": asdict(spec),
        "plan": plan.to_dict(),
        "dataset": spec.dataset, "model": spec.model, "split": spec.split, "attack": spec.attack,
        "threat_model": attack.describe(),
        "feature_shape": list(target.feature_shape),
        "image_shape": list(test.image_shape),
        "sizes": {"train": len(splits.train), "aux": len(splits.aux), "test": len(test), "attacked": n},
        "accuracy": accuracy(logits_split, test.labels),
        "accuracy_unsplit": accuracy(logits_unsplit, test.labels),
        "split_max_abs_logit_diff": float((logits_split - logits_unsplit).abs().max()),
        "mse": mse(reconstructions, originals),
        "psnr": psnr(reconstructions, originals),
        "ssim": ssim(reconstructions, originals),
        "baseline_mse": mse(baseline, originals),
        "baseline_psnr": psnr(baseline, originals),
        "baseline_ssim": ssim(baseline, originals),
        "recon_accuracy": accuracy(predict(evaluator, reconstructions), test.labels[:n]),
        "evaluator": {"model": victim["evaluator_model"], "accuracy_on_originals": accuracy(predict(evaluator, originals), test.labels[:n])},
        "mine": sum(mine_runs) / len(mine_runs),
        "mine_runs": mine_runs,
        "dcor": distance_correlation(originals, features),
        "dcor_unbiased": distance_correlation(originals, features, bias_corrected=True),
        "attack_seconds": attack_seconds,
        "seconds": time.perf_counter() - began,
        "victim_cached": victim["victim_cached"],
        "examples": {"originals": _rounded(originals[:GRID_EXAMPLES]), "reconstructions": _rounded(reconstructions[:GRID_EXAMPLES])},
        "environment": stamp,
    }


def sweep_cut(spec: ImageAttackSpec, attacks: list[str], victim: dict | None = None) -> list[dict]:
    """Every attack at `spec.split` (MINE estimated once): a sweep's unit of work, also in a worker process."""
    victim = victim or prepare_victim(spec)
    mine_cache: dict = {}
    return [run_image_attack(replace(spec, attack=name), victim=victim, mine_cache=mine_cache) for name in attacks]


def run_image_sweep(spec: ImageAttackSpec, cuts: list[int], attacks: list[str], *, jobs: int = 1,
                    on_records=None) -> list[dict]:
    """Every attack at every cut; records sorted by (attack, cut).

    The victim is trained (or loaded) once here, so its checkpoint is cached before any worker starts. With
    `jobs` > 1 the cuts run in that many worker processes of one torch thread each, the deepest (slowest) first;
    `on_records(records_so_far)` is called whenever a cut finishes (a long sweep can write what it has).
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from splitveil.core.runtime import set_threads

    victim = prepare_victim(spec)
    records: list[dict] = []

    def collect(new: list[dict]) -> None:
        records.extend(new)
        records.sort(key=lambda r: (attacks.index(r["attack"]), r["split"]))
        if on_records is not None:
            on_records(records)

    if jobs <= 1 or len(cuts) == 1:
        for cut in cuts:
            collect(sweep_cut(replace(spec, split=cut), attacks, victim))
        return records
    with ProcessPoolExecutor(min(jobs, len(cuts)), mp_context=get_context("spawn"), initializer=set_threads,
                             initargs=(1,)) as pool:
        futures = [pool.submit(sweep_cut, replace(spec, split=cut), attacks) for cut in sorted(cuts, reverse=True)]
        for future in as_completed(futures):
            collect(future.result())
    return records


def _rounded(images: torch.Tensor) -> list:
    """Pixel values to 3 decimals, as short JSON numbers (in float64 so 0.123 prints as 0.123)."""
    return (images.double() * 1000).round().div(1000).tolist()


def write_image_report(records: list[dict], out_dir, stem: str) -> tuple:
    """Records -> `<stem>.jsonl`, `<stem>_grid.png`, `<stem>_depth.png` and `<stem>.md`; returns the paths."""
    from splitveil.experiments.image_report import mine_intervals, mine_trend, plot_depth, plot_grid
    from splitveil.experiments.records import write_records

    out_dir, jsonl = write_records(records, out_dir, stem)
    grid, depth = out_dir / f"{stem}_grid.png", out_dir / f"{stem}_depth.png"
    plot_grid(records, grid)
    plot_depth(records, depth)
    first = records[0]
    lines = [f"# Image privacy: {first['model']} on {first['dataset']}", "",
             f"Generated from the records in `{jsonl.name}` by `write_image_report`. Split accuracy (= unsplit, "
             f"checked per run): {first['accuracy']:.3f} on {first['sizes']['test']} test images; victim trained on "
             f"{first['sizes']['train']} images, attacker's auxiliary set {first['sizes']['aux']} (disjoint), "
             f"{first['sizes']['attacked']} test images attacked. Mean-image baseline: SSIM {first['baseline_ssim']:.3f}, "
             f"PSNR {first['baseline_psnr']:.2f} dB.", "",
             "| attack | split | features | SSIM | PSNR (dB) | MSE | recon accuracy | MINE (nats) [min, max over seeds] | dCor² | dCor² (unbiased) | attack s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    intervals = mine_intervals(records)
    for r in sorted(records, key=lambda r: (r["attack"], r["split"])):
        mine = intervals[r["split"]]
        interval = f" [{mine['low']:.2f}, {mine['high']:.2f}] ({mine['seeds']})" if mine["seeds"] > 1 else " (1 seed)"
        lines.append(f"| {r['attack']} | {r['split']} | {'x'.join(map(str, r['feature_shape']))} | {r['ssim']:.3f} | "
                     f"{r['psnr']:.2f} | {r['mse']:.4f} | {r['recon_accuracy']:.3f} | {r['mine']:.3f}{interval} | "
                     f"{r['dcor']:.3f} | {r['dcor_unbiased']:.3f} | {r['attack_seconds']:.1f} |")
    trend = mine_trend(intervals)
    lines += [*(["", trend] if trend else []), "", f"Recon accuracy: a {first['evaluator']['model']} trained on the auxiliary split classifies the "
              f"reconstructions (it scores {first['evaluator']['accuracy_on_originals']:.3f} on the originals).", "",
              "## Threat models", ""]
    for name, threat in sorted({r["attack"]: r["threat_model"] for r in records}.items()):
        lines.append(f"- **{name}**: {threat['description']}")
    lines += ["", f"![originals and reconstructions]({grid.name})", "", f"![SSIM and MINE against split depth]({depth.name})", ""]
    markdown = out_dir / f"{stem}.md"
    markdown.write_text("\n".join(lines))
    return jsonl, grid, depth, markdown
