"""What the cloud reconstructs of a split image classifier's private inputs: train (cached), split, attack, score.

`run_image_attack(spec)` gives one record (a dict, JSON-ready); `write_image_report` turns records into JSONL, a grid
of originals vs reconstructions, a plot of SSIM and MINE against split depth, and a Markdown report.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch

from splitveil.attack.training import StopRule
from splitveil.core.errors import ConfigError
from splitveil.train.victims import split_sizes, splits_and_victim, train_config

#: examples kept in each record for the report's grid
GRID_EXAMPLES = 8


def check_image_names(dataset: str, model: str, attacks: list[str]) -> int:
    """Unknown data sets, models or attacks fail with the registry's one line; returns the model's number of blocks."""
    from splitveil.attack.image import IMAGE_ATTACKS
    from splitveil.data.images import DATASETS
    from splitveil.models.vision_zoo import build_vision_model

    DATASETS.get(dataset)
    for name in attacks:
        IMAGE_ATTACKS.get(name)
    return build_vision_model(model, (1, 28, 28), 10).num_blocks


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
    test_size: int = 2_000  # held-out images: attacked ones are the first `samples`
    epochs: int = 15  # victim classifier epochs
    attacker: StopRule = field(default_factory=StopRule)  # learned attacks (decoder, substitute, c-GAN) train until
    # their held-out loss plateaus, the same rule in quick and full runs (a cap reached is recorded as not converged)
    rmle_steps: int = 300
    mine_steps: int = 3000  # cap of each neural MI bound's training (MINE, InfoNCE); they stop on a held-out plateau
    mine_repeats: int = 3  # seeds per MI estimator (seed, seed+1, ...): records give each one's mean and min-max spread
    mine_lr: float = 5e-4  # the first release's fixed 500 steps at 1e-3 sent some seeds astray (2.17 to 4.44 nats)
    mi_estimators: tuple[str, ...] = ("mine", "infonce", "knn")  # metrics/mi_compare.py; an ordering needs two
    mi_pairs: int = 5_000  # images for the MI estimators: the test ones, then auxiliary ones (same distribution; on
    # digits, 271 pairs left InfoNCE's seeds 1.8 nats apart, 989 pairs 0.1-0.3)
    attack_options: dict = field(default_factory=dict)  # extra keyword arguments of the attack
    defence: str = "none"  # a registered image defence (protect.image), built in at the cut
    strength: float | None = None  # its one knob; None: the defence's default
    defence_options: dict = field(default_factory=dict)  # its other keyword arguments
    schedule: str = "onecycle"  # the victims' learning-rate schedule (TrainConfig.schedule)
    augment: bool = True  # shifts and flips of the victims' training batches
    lr: float = 2e-3  # victims' (peak) learning rate
    heldout_accuracy: bool = True  # also score the undefended victim on every image outside train and aux

    def __post_init__(self):
        """Refuses, with one line, what no run could do: unknown names, a cut out of range, a strength out of the
        defence's range, sizes that are not positive."""
        from splitveil.plan.plan import check_block_cut

        check_block_cut(self.split, check_image_names(self.dataset, self.model, [self.attack]), model=self.model)
        if self.samples < 2 or self.samples > self.test_size:
            raise ConfigError(f"--samples must be from 2 to the test images ({self.test_size}), got {self.samples}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be non-negative, got {self.seed}")
        for name in ("train_size", "aux_size", "epochs", "rmle_steps", "mine_steps", "mine_repeats", "mi_pairs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.make_defence()

    @classmethod
    def quick(cls, **overrides) -> "ImageAttackSpec":
        """Smaller data and victims; the attackers and the MI bounds train to convergence as in a full run. Victims:
        3 epochs on 10,000 images, one-cycle schedule, no augmentation (the first release's single constant-rate epoch
        left the VGG at 0.827 and a funnel-shaped edge far from converged)."""
        return cls(**{"samples": 200, "train_size": 10_000, "aux_size": 5_000, "test_size": 1_000, "epochs": 3,
                      "rmle_steps": 150, "schedule": "onecycle", "augment": False, "heldout_accuracy": False,
                      **overrides})

    def make_defence(self):
        from splitveil.protect.image import make_defence

        return make_defence(self.defence, self.strength, dataset=self.dataset, model=self.model, **self.defence_options)


def defended_victim(spec: ImageAttackSpec, splits, undefended, *, quiet: bool = True):
    """The victim with `spec`'s defence built in at `spec.split` and trained with its loss (cached by data set,
    model, cut, defence, strength, options and seed); the undefended victim itself when the defence is the identity.

    Returns:
        (model, defence, was_cached).
    """
    from splitveil.models.vision_zoo import build_vision_model
    from splitveil.protect.image import defended_model
    from splitveil.protect.image.base import train_defended
    from splitveil.train.classifier import cached_classifier

    defence = spec.make_defence()
    if not defence.trains:
        return undefended, defence, True
    shape, classes = splits.train.image_shape, splits.train.num_classes
    model, cached = cached_classifier(
        lambda: defended_model(build_vision_model(spec.model, shape, classes), defence, spec.split,
                               num_classes=classes, image_shape=shape),
        splits.train.images, splits.train.labels, train_config(spec), quiet=quiet, train=train_defended(defence, spec.split),
        key_fields={"dataset": spec.dataset, "model": spec.model, "train": len(splits.train), "split_seed": spec.seed,
                    "cut": spec.split, "defence": defence.name, "strength": defence.strength, **defence.options()})
    return model, defence, cached


def untrained_edge(model: str, image_shape, num_classes: int, defence: str, strength: float, options: dict, cut: int):
    """The defended edge's architecture with fresh weights (public knowledge: what an adaptive shadow attacker
    trains as its substitute edge)."""
    from torch import nn

    from splitveil.models.vision_zoo import build_vision_model
    from splitveil.protect.image import defended_model, make_defence
    from splitveil.protect.image.base import cut_segment

    built = defended_model(build_vision_model(model, image_shape, num_classes), make_defence(defence, strength, **options),
                           cut, num_classes=num_classes, image_shape=image_shape)
    return nn.Sequential(*built.segments[:cut_segment(built, cut)])


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
    prepared = {"splits": splits, "victim": victim, "victim_cached": cached, "evaluator": evaluator,
                "evaluator_model": evaluator_name}
    if getattr(spec, "heldout_accuracy", False):
        prepared["heldout"] = heldout_accuracy(spec, victim)
    return prepared


def heldout_accuracy(spec, model) -> dict:
    """`model`'s accuracy on every image of the data set outside the train and auxiliary splits (the test split
    included): for Fashion-MNIST at the default sizes 25,000 images, more than its official 10,000-image test set."""
    from splitveil.data.images import load_dataset
    from splitveil.train.classifier import accuracy, predict

    data = load_dataset(spec.dataset)
    train, aux, _ = split_sizes(len(data), spec)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(spec.seed))  # split_dataset's order
    rest = data.subset(order[train + aux:])
    return {"accuracy": accuracy(predict(model, rest.images), rest.labels), "images": len(rest)}


def seeded_accuracy(model, test, seed: int) -> float:
    """`model`'s accuracy on the `test` split, stochastic defences drawing the noise of `seed` (as
    `run_image_attack` scores the split and unsplit models)."""
    from splitveil.train.classifier import accuracy, predict

    torch.manual_seed(seed)
    return accuracy(predict(model, test.images), test.labels)


def accuracy_cost(spec: ImageAttackSpec, splits, undefended, clean: float) -> dict:
    """{"strength", "accuracy", "cost", "cached"} of `spec`'s defended victim (trained or loaded), `cost` being the
    undefended victim's accuracy `clean` minus its own on the same test images."""
    model, defence, cached = defended_victim(spec, splits, undefended)
    defended = seeded_accuracy(model, splits.test, spec.seed)
    return {"strength": defence.strength, "accuracy": defended, "cost": clean - defended, "cached": cached}


def edge_costs(model, undefended, cut: int, image_shape) -> dict:
    """The device's burden at `cut`: parameters, MACs and batch-1 latency of the defended edge and of the undefended
    one (`metrics.compute.part_cost`), and the undefended / defended ratios (SiftFunnel claims about 20x)."""
    from torch import nn

    from splitveil.metrics.compute import part_cost
    from splitveil.protect.image.base import cut_segment

    costs = {name: part_cost(nn.Sequential(*m.segments[:cut_segment(m, cut)]), tuple(image_shape))
             for name, m in (("defended", model), ("undefended", undefended))}
    costs["lighter_by"] = {key: costs["undefended"][key] / max(costs["defended"][key], 1e-12)
                           for key in ("parameters", "macs", "latency_ms")}
    return costs


def strength_source(spec: ImageAttackSpec) -> str:
    """Where the defence's strength came from: "given", "calibrated" (the package's table for the data set and
    model, `attack image-defaults`) or "default" (the defence's own)."""
    from splitveil.protect.image.base import calibrated_strength

    if spec.strength is not None:
        return "given"
    return "calibrated" if calibrated_strength(spec.defence, spec.dataset, spec.model) is not None else "default"


def attack_options(spec: ImageAttackSpec) -> dict:
    """The attack's keyword arguments: its optimisation steps (rMLE) or its stop rule (the learned ones)."""
    options = {"steps": spec.rmle_steps} if spec.attack == "rmle" else {"stop": spec.attacker}
    return {**options, **spec.attack_options}


def mi_settings(spec: ImageAttackSpec):
    """The mutual-information estimators a record runs (MINE always: reports and plots read it)."""
    from splitveil.metrics.bound_training import MIBudget
    from splitveil.metrics.mi_compare import MISettings

    estimators = tuple(dict.fromkeys(("mine", *getattr(spec, "mi_estimators", ("mine",)))))
    return MISettings(seeds=spec.mine_repeats, estimators=estimators,
                      budget=MIBudget(max_steps=spec.mine_steps, lr=spec.mine_lr))


def run_image_attack(spec: ImageAttackSpec, *, quiet: bool = True, victim: dict | None = None,
                     mine_cache: dict | None = None) -> dict:
    """Runs one attack on one split of the victim defended by `spec.defence`, and returns its record.

    The attack is adaptive: the edge it queries or holds is the defended one (stochastic layers on, as deployed),
    and a shadow attacker trains a substitute of the defended edge's architecture.

    Args:
        victim: a `prepare_victim(spec)` result to reuse (a sweep prepares it once).
        mine_cache: a dict reused across runs of one sweep: MINE depends on the split and defence, not on the attack.
    """
    from functools import partial

    from splitveil.attack.image import IMAGE_ATTACKS, ImageTarget
    from splitveil.core.records import environment
    from splitveil.metrics.image import distance_correlation, mse, psnr, ssim
    from splitveil.metrics.mi_compare import estimate_mutual_information
    from splitveil.plan.plan import SplitPlan, apply
    from splitveil.train.classifier import accuracy, predict

    stamp = environment()  # the code and machine as the run starts
    attack_class = IMAGE_ATTACKS.get(spec.attack)
    spec.make_defence()  # an unknown defence or a bad strength fails before any training
    began = time.perf_counter()
    victim = victim or prepare_victim(spec, quiet=quiet)
    splits, undefended = victim["splits"], victim["victim"]
    model, defence, defended_cached = defended_victim(spec, splits, undefended, quiet=quiet)
    plan = SplitPlan.two_way(spec.split)
    edge, cloud = apply(model, plan)
    test = splits.test
    torch.manual_seed(spec.seed)  # stochastic defences draw the same noise for the split and the unsplit model
    logits_unsplit = predict(model, test.images)
    torch.manual_seed(spec.seed)
    logits_split = predict(lambda x: cloud(edge(x)), test.images)
    if not torch.equal(logits_split.argmax(-1), logits_unsplit.argmax(-1)):
        raise RuntimeError("the split classifier disagrees with the unsplit one")  # the Splittable contract broke
    logits_undefended = logits_unsplit if model is undefended else predict(undefended, test.images)
    shape, classes = test.image_shape, test.num_classes
    # a defended edge's architecture is public to the adaptive shadow attacker (undefended: its generic substitute,
    # as in the first release's records)
    architecture = partial(untrained_edge, spec.model, shape, classes, defence.name, defence.strength,
                           defence.options(), spec.split) if defence.trains else None
    target = ImageTarget.from_parts(edge, cloud, image_shape=shape, aux=splits.aux, edge_architecture=architecture)
    n = min(spec.samples, len(test))
    if n < 2:
        raise ConfigError(f"{spec.dataset} leaves {len(test)} test image(s): too few to attack")
    originals = test.images[:n]  # [n, C, H, W]
    torch.manual_seed(spec.seed + 7)
    features = target.query(originals)  # [n, *feature_shape]: what the cloud receives
    attack = attack_class(target, seed=spec.seed, quiet=quiet, **attack_options(spec))
    attack_began = time.perf_counter()
    attack.fit(features)
    reconstructions = attack.reconstruct(features).clamp(0, 1)
    attack_seconds = time.perf_counter() - attack_began
    baseline = splits.aux.images.mean(0, keepdim=True).expand_as(originals)  # the attacker's prior: the mean image
    key = (spec.dataset, spec.model, spec.split, spec.seed, len(test), spec.mine_steps, spec.mine_repeats, spec.mine_lr,
           tuple(spec.mi_estimators), spec.mi_pairs,
           defence.name, defence.strength, tuple(sorted(defence.options().items())))
    if mine_cache is not None and key in mine_cache:
        information = mine_cache[key]
    else:
        torch.manual_seed(spec.seed + 11)
        pairs = torch.cat([test.images, splits.aux.images])[:spec.mi_pairs]  # [P, C, H, W]
        information = estimate_mutual_information(pairs, target.query(pairs), mi_settings(spec), seed=spec.seed)
        if mine_cache is not None:
            mine_cache[key] = information
    evaluator = victim["evaluator"]
    threat = attack.describe()
    if defence.trains:
        threat["knows_defence"] = True
        threat["description"] += f"; adaptive: knows the {defence.name} defence and attacks the defended edge"
    record = {
        "kind": "image-privacy",
        "spec": asdict(spec),
        "plan": plan.to_dict(),
        "dataset": spec.dataset, "model": spec.model, "split": spec.split, "attack": spec.attack,
        "defence": defence.name, "strength": defence.strength, "defence_info": defence.describe(),
        "strength_source": strength_source(spec),
        "threat_model": threat,
        "feature_shape": list(target.feature_shape),
        "image_shape": list(test.image_shape),
        "sizes": {"train": len(splits.train), "aux": len(splits.aux), "test": len(test), "attacked": n},
        "accuracy": accuracy(logits_split, test.labels),
        "accuracy_unsplit": accuracy(logits_unsplit, test.labels),
        "accuracy_undefended": accuracy(logits_undefended, test.labels),
        "split_max_abs_logit_diff": float((logits_split - logits_unsplit).abs().max()),
        "edge_cost": edge_costs(model, undefended, spec.split, shape),
        "mse": mse(reconstructions, originals),
        "psnr": psnr(reconstructions, originals),
        "ssim": ssim(reconstructions, originals),
        "baseline_mse": mse(baseline, originals),
        "baseline_psnr": psnr(baseline, originals),
        "baseline_ssim": ssim(baseline, originals),
        "recon_accuracy": accuracy(predict(evaluator, reconstructions), test.labels[:n]),
        "evaluator": {"model": victim["evaluator_model"], "accuracy_on_originals": accuracy(predict(evaluator, originals), test.labels[:n])},
        "mine": information["mine"]["mean"],
        "mine_runs": information["mine"]["runs"],
        "mutual_information": information,  # per estimator: mean, min-max over seeds, steps, plateau reached
        "dcor": distance_correlation(originals, features),
        "dcor_unbiased": distance_correlation(originals, features, bias_corrected=True),
        **attack.training_record(),
        "attack_seconds": attack_seconds,
        "seconds": time.perf_counter() - began,
        "victim_cached": victim["victim_cached"] and defended_cached,
        "examples": {"originals": _rounded(originals[:GRID_EXAMPLES]), "reconstructions": _rounded(reconstructions[:GRID_EXAMPLES])},
        "environment": stamp,
    }
    if "heldout" in victim:
        record["accuracy_undefended_heldout"] = victim["heldout"]
    return record


def sweep_cut(spec: ImageAttackSpec, attacks: list[str], victim: dict | None = None) -> list[dict]:
    """Every attack at `spec.split` against `spec.defence` (MINE estimated once): a sweep's unit of work, also in a
    worker process."""
    victim = victim or prepare_victim(spec)
    mine_cache: dict = {}
    return [run_image_attack(replace(spec, attack=name), victim=victim, mine_cache=mine_cache) for name in attacks]


def _unit_settings(spec: ImageAttackSpec, attacks: list[str]) -> dict:
    return {"unit": asdict(spec), "attacks": list(attacks)}


def run_unit(spec: ImageAttackSpec, attacks: list[str], victim: dict | None = None) -> list:
    """`sweep_cut`, its records kept (`experiments.units`) so that a long sweep that was stopped can go on where it
    was (`run_image_sweep(resume=True)`)."""
    from splitveil.experiments.units import keep_unit

    records = sweep_cut(spec, attacks, victim)
    keep_unit("image-sweep", _unit_settings(spec, attacks), records)
    return records


def resolve_defences(defences, spec: ImageAttackSpec | None = None) -> list[tuple[str, float]]:
    """[(name, strength or None)] -> [(name, strength)] with each default strength filled in (calibrated for
    `spec`'s data set and model where a calibration exists)."""
    from splitveil.protect.image import make_defence

    where = {"dataset": spec.dataset, "model": spec.model} if spec is not None else {}
    return [(name, make_defence(name, strength, **where).strength) for name, strength in defences]


def frontier_point(spec: ImageAttackSpec, splits, undefended, clean: float, *, resume: bool = False) -> dict:
    """{"strength", "accuracy", "cost"} of `spec`'s defended victim (`accuracy_cost`). Kept as a unit, so that a
    `--resume` on another machine, whose training cache is empty, reads the walk back instead of retraining every
    victim of it before the first attack."""
    from splitveil.experiments.units import kept_or_run

    point = kept_or_run("frontier-point", {"unit": asdict(spec)},
                        lambda: accuracy_cost(spec, splits, undefended, clean), resume=resume)
    return {key: point[key] for key in ("strength", "accuracy", "cost")}


def walk_frontier(spec: ImageAttackSpec, target: float, *, resume: bool = False, victim: dict | None = None) -> dict:
    """One baseline's frontier at `spec.split`: `spec.defence` at each of its `frontier_strengths`, weakest first,
    until one step beyond the first that costs `target` accuracy or more. Returns {"points": [...], "reached"}.
    Runs in a worker process (the undefended victim then comes from the training cache)."""
    from splitveil.protect.image import IMAGE_DEFENCES

    if victim is None:
        splits, undefended, _ = splits_and_victim(spec)
    else:
        splits, undefended = victim["splits"], victim["victim"]
    clean = seeded_accuracy(undefended, splits.test, spec.seed)
    points, past = [], 0
    for strength in IMAGE_DEFENCES.get(spec.defence).frontier_strengths:
        points.append(frontier_point(replace(spec, strength=strength), splits, undefended, clean, resume=resume))
        past += points[-1]["cost"] >= target
        if past == 2:  # one step beyond the first setting that costs as much as SiftFunnel
            break
    return {"points": points, "reached": past > 0}


def frontier_units(spec: ImageAttackSpec, cuts: list[int], defences, victim: dict, *, progress=None, jobs: int = 1,
                   resume: bool = False):
    """`image-sweep --frontier`: the (cut, defence, strength) settings to attack, with each baseline named without a
    strength walked up its `frontier_strengths` until its accuracy cost (undefended minus defended test accuracy)
    reaches the largest of the SiftFunnel settings' at that cut, plus one step beyond; without SiftFunnel in the list
    the whole ladder. The baselines' walks run in `jobs` worker processes; each point's defended victim is trained
    (or loaded) there, so the units' workers find it cached; each measured point is kept, and with `resume` read
    back (`frontier_point`).

    Returns:
        (units, frontier): `ImageAttackSpec`s, and per cut {"target_cost", "baselines": {name: {"points": [{strength,
        accuracy, cost}], "reached": bool}}}, which every record of the sweep carries.
    """
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial
    from multiprocessing import get_context

    from splitveil.core.runtime import init_worker
    from splitveil.protect.image import IMAGE_DEFENCES

    splits, undefended = victim["splits"], victim["victim"]
    clean = seeded_accuracy(undefended, splits.test, spec.seed)
    swept = [name for name, strength in defences
             if strength is None and name not in ("none", "siftfunnel") and IMAGE_DEFENCES.get(name).frontier_strengths]
    fixed = resolve_defences([(name, strength) for name, strength in defences if name not in swept], spec)
    units, frontier = [], {}
    pool = ProcessPoolExecutor(min(jobs, len(swept)), mp_context=get_context("spawn"), initializer=init_worker,
                               initargs=(1,)) if jobs > 1 and len(swept) > 1 else None
    try:
        for cut in cuts:
            if progress is not None:
                progress(f"frontier: SiftFunnel's accuracy cost at cut {cut} ...")
            funnels = [frontier_point(replace(spec, split=cut, defence=name, strength=strength), splits, undefended,
                                      clean, resume=resume)["cost"] for name, strength in fixed if name == "siftfunnel"]
            target = max(funnels) if funnels else float("inf")
            if progress is not None:
                progress(f"frontier: walking {', '.join(swept)} at cut {cut} up to an accuracy cost of "
                         f"{target:.3f} ({jobs} job(s)) ...")
            walks = [replace(spec, split=cut, defence=name, strength=None) for name in swept]
            if pool is None:
                walked = [walk_frontier(w, target, resume=resume, victim=victim) for w in walks]
            else:
                walked = list(pool.map(partial(walk_frontier, target=target, resume=resume), walks))
            baselines = dict(zip(swept, walked))
            frontier[cut] = {"target_cost": None if target == float("inf") else target, "accuracy_undefended": clean,
                             "baselines": baselines}
            units += [replace(spec, split=cut, defence=name, strength=strength) for name, strength in fixed]
            units += [replace(spec, split=cut, defence=name, strength=point["strength"])
                      for name in swept for point in baselines[name]["points"]]
    finally:
        if pool is not None:
            pool.shutdown()
    return units, frontier


def run_image_sweep(spec: ImageAttackSpec, cuts: list[int], attacks: list[str], *, jobs: int = 1,
                    on_records=None, defences=None, frontier: bool = False, progress=None,
                    resume: bool = False) -> list[dict]:
    """Every attack at every cut (and against every defence of `defences`, [(name, strength or None)], when given);
    records sorted by (defence as listed, strength, attack, cut).

    The undefended victim is trained (or loaded) once here, so its checkpoint is cached before any worker starts;
    each (cut, defence) unit trains (or loads) its defended victim. With `frontier`, each baseline given without a
    strength is swept (`frontier_units`) and every record carries the sweep's `frontier`. With `jobs` > 1 the units
    run in that many worker processes of one torch thread each, the deepest cut first; `on_records(records_so_far)`
    is called whenever a unit finishes (a long sweep can write what it has). Each finished unit is kept (`run_unit`);
    with `resume`, units an earlier run of the same commit and settings finished are read back instead of run.
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from splitveil.core.runtime import init_worker
    from splitveil.experiments.units import kept_unit

    defences = defences or [(spec.defence, spec.strength)]
    victim = prepare_victim(spec)
    if frontier:
        units, summary = frontier_units(spec, cuts, defences, victim, progress=progress, jobs=jobs, resume=resume)
    else:
        units, summary = [replace(spec, split=cut, defence=name, strength=strength)
                          for cut in cuts for name, strength in resolve_defences(defences, spec)], None
    names = list(dict.fromkeys(name for name, _ in defences))
    records: list[dict] = []

    def position(record: dict) -> tuple:
        return names.index(record["defence"]) if record["defence"] in names else 0, record["strength"]

    def collect(new: list[dict]) -> None:
        for record in new:
            if summary is not None:
                record["frontier"] = summary[record["split"]]
        records.extend(new)
        records.sort(key=lambda r: (position(r), attacks.index(r["attack"]), r["split"]))
        if on_records is not None:
            on_records(records)

    pending = []
    for unit in units:
        kept = kept_unit("image-sweep", _unit_settings(unit, attacks)) if resume else None
        if kept is None:
            pending.append(unit)
        else:
            collect(kept)
    if jobs <= 1 or len(pending) <= 1:
        for unit in pending:
            collect(run_unit(unit, attacks, victim))
        return records
    with ProcessPoolExecutor(min(jobs, len(pending)), mp_context=get_context("spawn"), initializer=init_worker,
                             initargs=(1,)) as pool:
        futures = [pool.submit(run_unit, unit, attacks) for unit in sorted(pending, key=lambda u: -u.split)]
        for future in as_completed(futures):
            collect(future.result())
    return records


def _rounded(images: torch.Tensor) -> list:
    """Pixel values to 3 decimals, as short JSON numbers (in float64 so 0.123 prints as 0.123)."""
    return (images.double() * 1000).round().div(1000).tolist()


def write_image_report(records: list[dict], out_dir, stem: str) -> tuple:
    """Records -> `<stem>.jsonl`, `<stem>_grid.png`, `<stem>_depth.png` and `<stem>.md`; returns the paths."""
    from splitveil.experiments.image_report import (attacker_training, information_lines, mine_intervals, plot_depth,
                                                    plot_grid)
    from splitveil.core.records import write_records

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
             "| attack | split | features | SSIM | PSNR (dB) | MSE | recon accuracy | MINE (nats) [min, max over seeds] | dCor² | dCor² (unbiased) | attacker epochs (stopped by) | attack s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    intervals = mine_intervals(records)
    for r in sorted(records, key=lambda r: (r["attack"], r["split"])):
        mine = intervals[r["split"]]
        interval = f" [{mine['low']:.2f}, {mine['high']:.2f}] ({mine['seeds']})" if mine["seeds"] > 1 else " (1 seed)"
        lines.append(f"| {r['attack']} | {r['split']} | {'x'.join(map(str, r['feature_shape']))} | {r['ssim']:.3f} | "
                     f"{r['psnr']:.2f} | {r['mse']:.4f} | {r['recon_accuracy']:.3f} | {r['mine']:.3f}{interval} | "
                     f"{r['dcor']:.3f} | {r['dcor_unbiased']:.3f} | {attacker_training(r)} | {r['attack_seconds']:.1f} |")
    information = information_lines(records)
    if information:
        lines += ["", "Mutual information I(x; z) per cut, every estimator (number of seeds in brackets); an order "
                  "between cuts is claimed only where two estimators agree beyond their spread:", "", *information]
    lines += ["", f"Recon accuracy: a {first['evaluator']['model']} trained on the auxiliary split classifies the "
              f"reconstructions (it scores {first['evaluator']['accuracy_on_originals']:.3f} on the originals).", "",
              "## Threat models", ""]
    for name, threat in sorted({r["attack"]: r["threat_model"] for r in records}.items()):
        lines.append(f"- **{name}**: {threat['description']}")
    lines += ["", f"![originals and reconstructions]({grid.name})", "", f"![SSIM and MINE against split depth]({depth.name})", ""]
    markdown = out_dir / f"{stem}.md"
    markdown.write_text("\n".join(lines))
    return jsonl, grid, depth, markdown
