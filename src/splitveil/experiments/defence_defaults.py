"""Per data set and model, the strongest setting of an image defence whose accuracy cost stays within a budget.

SiftFunnel's paper promises less than 3 points of accuracy; one default strength cannot keep that on every data set
and model we ship (fashion-mnist, mnist, digits, lfw; lenet, vgg, resnet). `calibrate_defaults` trains (or loads)
the defended victim at every strength of the defence's `frontier_strengths` ladder, measures its accuracy cost
against the undefended victim on the same test images, and picks the largest strength within `max_cost`. The
chosen table becomes the package's `protect/image/defaults.json` (`make_defence` reads it when no strength is
given), and the record says what every strength cost.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import torch

DATASETS = ("fashion-mnist", "mnist", "digits", "lfw")
MODELS = ("lenet", "vgg", "resnet")


@dataclass(frozen=True)
class DefaultsSpec:
    defence: str = "siftfunnel"
    datasets: tuple[str, ...] = DATASETS
    models: tuple[str, ...] = MODELS
    cut: int = 2  # the cut of the published defence records
    max_cost: float = 0.03  # accuracy points, as a fraction (the paper's "< 3%")
    quick: bool = True  # ImageAttackSpec.quick's victims (3 epochs on up to 10,000 images), else the full ones
    seed: int = 0

    def __post_init__(self):
        from splitveil.core.errors import ConfigError
        from splitveil.data.images import DATASETS as KNOWN_DATASETS
        from splitveil.models.vision_zoo import VISION_MODELS
        from splitveil.protect.image import IMAGE_DEFENCES

        if not IMAGE_DEFENCES.get(self.defence).frontier_strengths:
            raise ConfigError(f"the {self.defence} defence has no ladder of strengths to calibrate")
        for name in self.datasets:
            KNOWN_DATASETS.get(name)
        for name in self.models:
            VISION_MODELS.get(name)
        if not 0 < self.max_cost < 1:
            raise ConfigError(f"--max-cost must be between 0 and 1 (a fraction of accuracy), got {self.max_cost:g}")
        if self.cut < 1:
            raise ConfigError(f"--cut must be at least 1, got {self.cut}")


def calibrate_one(spec: DefaultsSpec, dataset: str, model: str, *, progress=None) -> dict:
    """The accuracy cost of every ladder strength on (`dataset`, `model`) at `spec.cut`, and the chosen strength."""
    from splitveil.experiments.image_privacy import ImageAttackSpec, accuracy_cost, seeded_accuracy
    from splitveil.train.victims import splits_and_victim
    from splitveil.protect.image import IMAGE_DEFENCES

    base = (ImageAttackSpec.quick if spec.quick else ImageAttackSpec)(dataset=dataset, model=model, split=spec.cut,
                                                                      seed=spec.seed, defence=spec.defence)
    splits, undefended, _ = splits_and_victim(base)
    test = splits.test
    clean = seeded_accuracy(undefended, test, spec.seed)
    points = []
    for strength in IMAGE_DEFENCES.get(spec.defence).frontier_strengths:
        if progress is not None:
            progress(f"{dataset} {model}: {spec.defence} {strength:g} ...")
        began = time.perf_counter()
        point = accuracy_cost(replace(base, strength=strength), splits, undefended, clean)
        points.append({**point, "seconds": time.perf_counter() - began})
    # a cost is measurable only where the undefended victim beats always answering the commonest test class by a
    # clear margin (two binomial standard errors at that rate): else "no cost" means both models guess
    majority = float(torch.bincount(test.labels).max()) / len(test)
    margin = 2 * (majority * (1 - majority) / len(test)) ** 0.5
    measurable = clean > majority + margin
    within = [p for p in points if p["cost"] <= spec.max_cost] if measurable else []
    chosen = max(within, key=lambda p: p["strength"]) if within else None
    reason = (None if chosen else f"the undefended victim ({clean:.3f}) does not beat the commonest class "
              f"({majority:.3f}) by two standard errors: no cost can be measured" if not measurable
              else f"every strength costs more than {100 * spec.max_cost:g} points")
    return {"dataset": dataset, "model": model, "cut": spec.cut, "accuracy_undefended": clean,
            "majority_class_rate": majority, "measurable": measurable,
            "test_images": len(test), "one_image": 1 / len(test), "points": points,
            "chosen": chosen["strength"] if chosen else None,
            "chosen_cost": chosen["cost"] if chosen else None, "not_chosen_because": reason}


def calibrate_defaults(spec: DefaultsSpec, *, progress=None, on_result=None) -> dict:
    """Every (data set, model) of `spec`: the record (JSON-ready) with each one's ladder and chosen strength."""
    from splitveil.core.records import environment

    stamp = environment()
    began = time.perf_counter()
    results = []
    for dataset in spec.datasets:
        for model in spec.models:
            results.append(calibrate_one(spec, dataset, model, progress=progress))
            if on_result is not None:
                on_result(results[-1])
    return {"kind": "defence-defaults", "spec": asdict(spec), "results": results,
            "strengths": {f"{r['dataset']}/{r['model']}": r["chosen"] for r in results if r["chosen"] is not None},
            "uncalibrated": {f"{r['dataset']}/{r['model']}": r["not_chosen_because"] for r in results
                             if r["chosen"] is None},
            "seconds": time.perf_counter() - began, "environment": stamp}


def plot_defaults(record: dict, path):
    """Accuracy cost against strength, one line per (data set, model), the budget as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splitveil.core.records import save_figure

    datasets = list(dict.fromkeys(r["dataset"] for r in record["results"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        for r in (r for r in record["results"] if r["dataset"] == dataset):
            strengths = [p["strength"] for p in r["points"]]
            line = axis.plot(strengths, [100 * p["cost"] for p in r["points"]], marker="o",
                             label=f"{r['model']} (chosen {r['chosen']:g})" if r["chosen"] is not None
                             else f"{r['model']} ({'none within budget' if r.get('measurable', True) else 'at chance: not measurable'})")[0]
            if r["chosen"] is not None:
                axis.plot([r["chosen"]], [100 * r["chosen_cost"]], marker="*", markersize=14, color=line.get_color())
        axis.axhline(100 * record["spec"]["max_cost"], linestyle="--", color="grey", linewidth=1)
        ladder = sorted({p["strength"] for r in record["results"] for p in r["points"]})
        axis.set_xscale("log")
        axis.set_xticks(ladder, [f"{s:g}" for s in ladder])
        axis.minorticks_off()
        axis.set(xlabel=f"{record['spec']['defence']} strength",
                 ylabel="accuracy cost (points)", title=f"{dataset}, cut {record['spec']['cut']}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(f"{record['spec']['defence']}: accuracy cost per strength; star = calibrated default (the strongest "
                 f"within {100 * record['spec']['max_cost']:g} points)", fontsize=9)
    return save_figure(fig, path)


def write_defaults_table(record: dict, path) -> None:
    """Merges the record's chosen strengths into the package's table (`protect/image/defaults.json`)."""
    import json
    from pathlib import Path

    path = Path(path)
    table = json.loads(path.read_text()) if path.is_file() else {"strengths": {}}
    table["strengths"][record["spec"]["defence"]] = {**table["strengths"].get(record["spec"]["defence"], {}),
                                                      **record["strengths"]}
    table["how"] = ("splitveil attack image-defaults --write-defaults: per data set and model, the strongest ladder "
                    "strength whose accuracy cost at the recorded cut is within the budget (benchmarks/results/"
                    "defence-defaults_*.json)")
    path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
