"""What the cloud reads of a salted split classifier's output: train (cached), split, salt, attack, score.

`run_output_attack(spec)` gives one record (a dict, JSON-ready) with the standard and salted models' accuracies, the
cloud's accuracy when it reads the salted output as if unsalted, and the salt-recovery attack's figures;
`run_output_sweep` runs it over salt-layer positions and `write_output_report` turns records into JSONL, a plot and
a Markdown report.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from splitveil.attack.training import StopRule
from splitveil.core.errors import ConfigError

#: bump when a change to the salt layer or its training makes cached salted weights stale
SALT_CODE_VERSION = 1
#: names the time-series augmentation (models/timeseries.augment_series) in cache keys; change it with that function
SERIES_AUGMENTATION = "shift20%-gain0.1-jitter0.05"


@dataclass(frozen=True)
class OutputAttackSpec:
    dataset: str = "fashion-mnist"
    model: str = "vgg"
    split: int = 2  # cut after this many blocks: the client runs blocks [0, split) with the salt layer
    salt: str = "conv"  # conv, fc or perm (protect.salt.SaltKind)
    salt_layer: int | None = None  # the salt layer sits after this many blocks (None: split - 1, just before the cut)
    salt_values: int | None = None  # how many salts (None: C for conv/fc, 4 C for perm)
    seed: int = 0
    train_size: int = 30_000  # both models' training images (capped at 45% of the data set)
    aux_size: int = 15_000  # the attacker's auxiliary images (capped at 40%)
    test_size: int = 2_000  # held-out images scored
    epochs: int = 1  # base model epochs (the image-privacy victim's, so its cache is shared)
    salted_epochs: int = 6  # epochs fine-tuned from the base model's weights: the salted model and, with the same
    # recipe (cosine schedule, batches, augmentation), the standard model it is compared with
    attacker: StopRule = field(default_factory=StopRule)  # the salt reader trains (fresh salts each epoch) until
    # its held-out loss plateaus, the same rule in quick and full runs (a cap reached is recorded as not converged)
    adversary_weight: float = 0.0  # countermeasure: adversarial training against a salt/class reader at the cut (0 = off)
    test_repeats: int = 1  # each test example is sent this many times, each a request with its own keyed salt
    batch_size: int = 64  # training batch of the standard and the salted model

    def __post_init__(self):
        """Refuses, with one line, what no run could do: unknown names, a cut out of range, a salt layer the cloud
        would run, fewer than 2 salts, sizes that are not positive."""
        from splitveil.plan.plan import check_block_cut
        from splitveil.protect.salt import SaltKind

        if self.salt not in {kind.value for kind in SaltKind}:
            raise ConfigError(f"unknown salt kind {self.salt!r}; use conv, fc or perm")
        check_block_cut(self.split, model_blocks(self.dataset, self.model), model=self.model)
        if self.salt_layer is not None and not 0 <= self.salt_layer < self.split:
            raise ConfigError(f"--salt-layer {self.salt_layer} must be below --split {self.split} (0 = at the input): "
                              "the salt layer and the block after it run on the client, which keeps the salt")
        if self.salt_values is not None and self.salt_values < 2:
            raise ConfigError(f"--salt-values must be at least 2, got {self.salt_values}")
        for name in ("train_size", "aux_size", "test_size", "epochs", "salted_epochs", "test_repeats", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.adversary_weight < 0 or self.seed < 0:
            raise ConfigError(f"--adversary-weight and --seed must be non-negative, got {self.adversary_weight:g} and "
                              f"{self.seed}")

    @classmethod
    def quick(cls, **overrides) -> "OutputAttackSpec":
        """Sizes for a run of a few minutes on one thread (a minute once both models are cached)."""
        return cls(**{"train_size": 10_000, "aux_size": 5_000, "test_size": 1_000, "epochs": 1, "salted_epochs": 6,
                      **overrides})

    @classmethod
    def for_data(cls, dataset: str, *, quick: bool = False, **overrides) -> "OutputAttackSpec":
        """The spec's defaults for `dataset`: image sets as `quick`/the full sizes say; a small time-series set
        (BasicMotions: 80 series) all of it, split 40 / 24 / 16, many epochs of small batches, and every test series
        sent 10 times with fresh salts (quick: fewer epochs)."""
        from splitveil.data.timeseries import is_time_series

        if not is_time_series(dataset):
            return cls.quick(dataset=dataset, **overrides) if quick else cls(dataset=dataset, **overrides)
        epochs = 100 if quick else 300
        return cls(**{"dataset": dataset, "model": "sensor-cnn", "train_size": 40, "aux_size": 24, "test_size": 16,
                      "epochs": epochs, "salted_epochs": epochs, "test_repeats": 10,
                      # 22 training series of 8 per batch: an epoch is 3 steps, so the plateau is judged over more
                      "attacker": StopRule(patience=50, lr_patience=15, max_epochs=2000),
                      "batch_size": 8, **overrides})

    @property
    def position(self) -> int:
        return self.split - 1 if self.salt_layer is None else self.salt_layer


def prepare_models(spec: OutputAttackSpec, *, quiet: bool = True, compared: bool = False) -> dict:
    """Data splits, the base model (cached, the same checkpoint as the image-privacy victim) and the salted one
    (cached; fine-tuned from the base model's weights with a fresh uniform salt per example).

    Args:
        compared: also the standard model to compare the salted one with (`standard`, cached): the base model
            fine-tuned for the same epochs with the same recipe, unsalted. Without it `standard` is the base model.
    """
    from splitveil.protect.salt import SaltConfig

    splits, base, base_cached = standard_model(spec, quiet=quiet)
    config = SaltConfig(kind=spec.salt, position=spec.position, values=spec.salt_values)
    salted, salted_cached = cached_salted(base, config, splits.train, spec, quiet=quiet)
    models = {"splits": splits, "base": base, "base_cached": base_cached, "standard": base,
              "standard_cached": base_cached, "salted": salted, "salted_cached": salted_cached}
    if compared:
        models["standard"], models["standard_cached"] = cached_standard_like_salted(
            base, splits.train, spec, values=salted.values, quiet=quiet)
    return models


def standard_model(spec: OutputAttackSpec, *, quiet: bool = True):
    """(splits, the standard model trained on the train split (cached), was_cached): the image-privacy victim for an
    image set, the sensor CNN for a time series."""
    from splitveil.data.images import split_dataset
    from splitveil.data.timeseries import is_time_series, load_time_series
    from splitveil.train.victims import splits_and_victim
    from splitveil.models.timeseries import augment_series, build_time_series_model
    from splitveil.train.classifier import TrainConfig, cached_classifier, train_classifier

    if not is_time_series(spec.dataset):
        return splits_and_victim(spec, quiet=quiet)
    data = load_time_series(spec.dataset)
    splits = split_dataset(data, train=spec.train_size, aux=spec.aux_size, test=spec.test_size, seed=spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)

    def train(model, images, labels, config, **options):  # the salted model's recipe: augmented batches
        return train_classifier(model, images, labels, config, **options, loss=lambda m, x, y: nn.functional.cross_entropy(
            m(augment_series(x, generator)), y))

    model, cached = cached_classifier(
        lambda: build_time_series_model(spec.model, data.image_shape, data.num_classes), splits.train.images,
        splits.train.labels, TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, seed=spec.seed), quiet=quiet,
        train=train, key_fields={"dataset": spec.dataset, "model": spec.model, "train": spec.train_size,
                                 "split_seed": spec.seed, "augment": SERIES_AUGMENTATION})
    return splits, model, cached


def model_blocks(dataset: str, model: str) -> int:
    """How many blocks (cut points) `model` has for `dataset`; a ConfigError names the models that fit."""
    from splitveil.data.images import DATASETS
    from splitveil.data.timeseries import TIME_SERIES, is_time_series
    from splitveil.models.timeseries import TIME_SERIES_MODELS, build_time_series_model
    from splitveil.models.vision_zoo import VISION_MODELS, build_vision_model

    if is_time_series(dataset):
        if model not in TIME_SERIES_MODELS:
            raise ConfigError(f"--model {model} is an image model; the time series {dataset} takes "
                              f"{', '.join(TIME_SERIES_MODELS.names())}")
        return build_time_series_model(model, (6, 100), 4).num_blocks
    if dataset not in DATASETS:
        raise ConfigError(f"unknown --dataset {dataset!r}; known: {', '.join(DATASETS.names() + TIME_SERIES.names())}")
    if model not in VISION_MODELS:
        raise ConfigError(f"--model {model} does not take images; {dataset} takes {', '.join(VISION_MODELS.names())}")
    return build_vision_model(model, (1, 28, 28), 10).num_blocks


def cached_salted(standard, config, train_data, spec: OutputAttackSpec, *, quiet: bool = True):
    """The salted model: a salted copy of `standard` fine-tuned on `train_data`, or its cached weights."""
    from splitveil.data.timeseries import is_time_series
    from splitveil.models.timeseries import augment_series
    from splitveil.protect.salt import salt_model, train_salted
    from splitveil.train.classifier import cache_dir, cache_key, load_cached_weights, save_cached_weights

    torch.manual_seed(spec.seed)
    model = salt_model(copy.deepcopy(standard), config, input_shape=train_data.image_shape,
                       num_classes=train_data.num_classes)
    countermeasure = {"adversary_weight": spec.adversary_weight, "adversary_cut": spec.split} if spec.adversary_weight else {}
    if spec.batch_size != 64:  # (64, the default, stays out of the key so that earlier cached models still load)
        countermeasure["batch_size"] = spec.batch_size
    augment = None
    if is_time_series(spec.dataset):
        augment, countermeasure["augment"] = augment_series, SERIES_AUGMENTATION
    key = cache_key(dataset=spec.dataset, model=spec.model, train=len(train_data), split_seed=spec.seed,
                    epochs=spec.epochs, salted_epochs=spec.salted_epochs, salt=config.to_dict(),
                    salt_code_version=SALT_CODE_VERSION, **countermeasure)
    path = cache_dir() / f"{spec.model}-salted-{key}.pt"
    if load_cached_weights(model, path):
        return model.eval(), True
    adversary = None
    if spec.adversary_weight:
        from splitveil.protect.salt_adversary import SaltAdversary

        model.check_cut(spec.split)
        with torch.no_grad():
            shape = model.run((torch.zeros(2, *train_data.image_shape), torch.zeros(2, dtype=torch.int64)), 0,
                              model.boundary(spec.split)).shape[1:]
        adversary = SaltAdversary(tuple(shape), model.values, model.num_classes, cut=spec.split,
                                  weight=spec.adversary_weight)
    train_salted(model, train_data.images, train_data.labels, epochs=spec.salted_epochs, lr=2e-3, seed=spec.seed,
                 batch_size=spec.batch_size, quiet=quiet, adversary=adversary, augment=augment)
    save_cached_weights(model, path)
    return model, False


def cached_standard_like_salted(base, train_data, spec: OutputAttackSpec, *, values: int, quiet: bool = True):
    """(the standard model the salted one is compared with, was_cached): a copy of the base model fine-tuned on
    `train_data` exactly as `cached_salted` fine-tunes the salted copy (same epochs, learning rate, cosine schedule,
    batches and augmentation draws), without a salt; cached."""
    from splitveil.data.timeseries import is_time_series
    from splitveil.models.timeseries import augment_series
    from splitveil.protect.salt import train_standard_like_salted
    from splitveil.train.classifier import cache_dir, cache_key, load_cached_weights, save_cached_weights

    model = copy.deepcopy(base)
    recipe = {"batch_size": spec.batch_size} if spec.batch_size != 64 else {}
    augment = None
    if is_time_series(spec.dataset):
        augment, recipe["augment"] = augment_series, SERIES_AUGMENTATION
    key = cache_key(dataset=spec.dataset, model=spec.model, train=len(train_data), split_seed=spec.seed,
                    epochs=spec.epochs, fine_tune_epochs=spec.salted_epochs, values=values,
                    salt_code_version=SALT_CODE_VERSION, **recipe)
    path = cache_dir() / f"{spec.model}-standard-like-salted-{key}.pt"
    if load_cached_weights(model, path):
        return model.eval(), True
    train_standard_like_salted(model, train_data.images, train_data.labels, values=values, epochs=spec.salted_epochs,
                               lr=2e-3, seed=spec.seed, batch_size=spec.batch_size, quiet=quiet, augment=augment)
    save_cached_weights(model, path)
    return model, False


def training_record(spec: OutputAttackSpec) -> dict:
    """How both compared models were trained (the record's `training`): the same base, then the same fine-tuning."""
    from splitveil.data.timeseries import is_time_series
    from splitveil.train.victims import train_config

    series = is_time_series(spec.dataset)
    base = ({"epochs": spec.epochs, "lr": 2e-3, "schedule": "constant", "batch_size": spec.batch_size,
             "augment": SERIES_AUGMENTATION} if series else
            {**train_config(spec).key(), "schedule": train_config(spec).schedule, "augment": train_config(spec).augment})
    fine_tune = {"epochs": spec.salted_epochs, "lr": 2e-3, "optimiser": "adam", "schedule": "cosine to 0",
                 "batch_size": spec.batch_size, "augment": SERIES_AUGMENTATION if series else False,
                 "seed": spec.seed}
    return {"standard": {"base": base, "fine_tune": {**fine_tune, "salt": None}},
            "salted": {"base": base, "fine_tune": {**fine_tune, "salt": "uniform per example and step"},
                       "adversary_weight": spec.adversary_weight},
            "total_epochs": spec.epochs + spec.salted_epochs}


def evaluation_key(seed: int) -> bytes:
    """The client key of the scored requests: fixed by the seed so that a record can be reproduced (a real client
    draws its key with `secrets`, `SaltKey`'s default)."""
    return hashlib.sha256(f"splitveil-salt-evaluation-{seed}".encode()).digest()


def run_output_attack(spec: OutputAttackSpec, *, quiet: bool = True, models: dict | None = None) -> dict:
    """Runs every output attack on one salted split and returns its record."""
    from splitveil.attack.output import OUTPUT_ATTACKS, OutputTarget
    from splitveil.core.records import environment
    from splitveil.plan.plan import SplitPlan, apply
    from splitveil.protect.salt import SaltKey, decode_labels, predict_salted
    from splitveil.train.classifier import accuracy, predict

    stamp = environment()
    began = time.perf_counter()
    if models is None:
        models = prepare_models(spec, quiet=quiet, compared=True)
    elif models["standard"] is models.get("base"):  # given without the compared standard model: add it
        models = {**models, **dict(zip(("standard", "standard_cached"), cached_standard_like_salted(
            models["base"], models["splits"].train, spec, values=models["salted"].values, quiet=quiet)))}
    splits, standard, salted = models["splits"], models["standard"], models["salted"]
    salted.check_cut(spec.split)
    test, table = splits.test, salted.table
    if spec.test_repeats > 1:  # the same inputs sent again, each request with its own salt
        test = test.subset(torch.arange(len(test)).repeat(spec.test_repeats))
    salts = SaltKey(salted.values, key=evaluation_key(spec.seed)).draw(len(test))  # one request per test image
    edge, cloud = apply(salted, SplitPlan.two_way(spec.split))
    features = torch.cat([edge((test.images[i:i + 256], salts[i:i + 256])) for i in range(0, len(test), 256)])
    cloud_logits = predict(cloud, features)  # what the cloud computes (and sees)
    unsplit_logits = predict_salted(salted, test.images, salts)
    if not torch.equal(cloud_logits.argmax(-1), unsplit_logits.argmax(-1)):
        raise RuntimeError("the salted split disagrees with the salted unsplit model")  # the Splittable contract broke
    client_labels = decode_labels(cloud_logits, salts, table)
    target = OutputTarget.from_parts(edge, cloud, image_shape=test.image_shape, table=table, aux=splits.aux)
    unsalted = OUTPUT_ATTACKS.get("unsalted")(target, seed=spec.seed)
    read_as_unsalted = decode_labels(cloud_logits, unsalted.reconstruct(features), table)
    attack_began = time.perf_counter()
    recovery = OUTPUT_ATTACKS.get("recovery")(target, seed=spec.seed, quiet=quiet, stop=spec.attacker,
                                              batch_size=spec.batch_size).fit()
    recovered = recovery.reconstruct(features)
    head_only = recovery.salt_head_guess(features)
    class_read = recovery.read_labels(features)
    attack_seconds = time.perf_counter() - attack_began
    clusters = run_cluster_attacks(target, features, salts, seed=spec.seed)
    labels = test.labels
    values, classes = int(table.shape[0]), int(table.shape[1])
    return {
        "kind": "output-privacy",
        "spec": asdict(spec),
        "plan": SplitPlan.two_way(spec.split).to_dict(),
        "salt": salted.salt_config.to_dict(),
        "dataset": spec.dataset, "model": spec.model, "split": spec.split, "salt_layer": spec.position,
        "defence": f"salt:{salted.salt_config.kind.value}",
        "salt_values": values, "num_classes": classes, "adversary_weight": spec.adversary_weight,
        "feature_shape": list(features.shape[1:]),
        "sizes": {"train": len(splits.train), "aux": len(splits.aux), "test": len(splits.test),
                  "requests": len(test)},
        "accuracy_standard": accuracy(predict(standard, test.images), labels),  # trained like the salted model
        "accuracy_standard_base": accuracy(predict(models["base"], test.images), labels),  # before fine-tuning
        "training": training_record(spec),
        "accuracy_salted": float((client_labels == labels).float().mean()),
        "cloud_accuracy_unsalted_read": float((read_as_unsalted == labels).float().mean()),
        "salt_recovery": float((recovered == salts).float().mean()),
        "cloud_accuracy_with_recovered_salt": float((decode_labels(cloud_logits, recovered, table) == labels).float().mean()),
        "salt_recovery_salt_head_only": float((head_only == salts).float().mean()),
        "salt_recovery_rule": recovery.rule,
        "cloud_accuracy_class_head": float((class_read == labels).float().mean()),
        **{key: value for key, value in clusters.items() if key != "threat_model"},
        "chance_salt": 1.0 / values, "chance_class": 1.0 / classes,
        "split_equals_unsplit": True,
        "threat_models": {"unsalted": unsalted.describe(), "recovery": recovery.describe(),
                          "cluster": clusters["threat_model"]},
        **recovery.training_record(),
        "attack_seconds": attack_seconds,
        "seconds": time.perf_counter() - began,
        "models_cached": {"base": models["base_cached"], "standard": models["standard_cached"],
                          "salted": models["salted_cached"]},
        "environment": stamp,
    }


def run_cluster_attacks(target, features: torch.Tensor, salts: torch.Tensor, *, seed: int) -> dict:
    """The minimal-knowledge cloud (`cluster`: the features alone, no model, no labels) on the scored requests: the
    fraction of requests whose group, named by the best one-to-one matching of groups to salts, is their salt, for
    k-means (the figure) and a Gaussian mixture, beside a random partition matched the same way (its chance)."""
    from splitveil.attack.output import OUTPUT_ATTACKS
    from splitveil.metrics.clustering import matched_accuracy

    began = time.perf_counter()
    values = int(target.table.shape[0])
    score = lambda groups: matched_accuracy(groups, salts, clusters=values, classes=values)  # noqa: E731
    kmeans = OUTPUT_ATTACKS.get("cluster")(target, seed=seed, method="kmeans")
    gmm = OUTPUT_ATTACKS.get("cluster")(target, seed=seed, method="gmm")
    random_groups = torch.randint(values, (len(salts),), generator=torch.Generator().manual_seed(seed))
    return {"salt_cluster_accuracy": score(kmeans.reconstruct(features)),
            "salt_cluster_accuracy_gmm": score(gmm.reconstruct(features)),
            "salt_cluster_accuracy_random_partition": score(random_groups),
            "cluster_components": kmeans.components, "cluster_seconds": time.perf_counter() - began,
            "threat_model": kmeans.describe()}


def run_output_sweep(spec: OutputAttackSpec, positions: list[int], *, on_record=None, quiet: bool = True) -> list[dict]:
    """One record per salt-layer position, each with the cut just after its salted block (split = position + 1)
    unless `spec.split` is deeper."""
    records = []
    for position in positions:
        run = replace(spec, salt_layer=position, split=max(spec.split, position + 1))
        records.append(run_output_attack(run, quiet=quiet))
        if on_record is not None:
            on_record(records)
    return records


def label(record: dict) -> str:
    """The defence as reports name it: salt:conv, or salt:conv+adversary1 with the countermeasure."""
    weight = record.get("adversary_weight") or 0
    return record["defence"] + (f"+adversary{weight:g}" if weight else "")


def _requests(record: dict) -> str:
    requests, test = record["sizes"].get("requests", record["sizes"]["test"]), record["sizes"]["test"]
    if requests == test:
        return "one request with its own keyed salt per example"
    return f"each sent {requests // test} times, {requests} requests with their own keyed salts"


def _training_sentence(record: dict) -> str:
    training = record.get("training")
    if training is None:  # a record made before the standard model was trained like the salted one
        return (f"Standard model accuracy {record['accuracy_standard']:.3f} (the base model alone: the salted model "
                "trained more epochs)")
    fine_tune = training["salted"]["fine_tune"]
    return (f"Standard and salted models trained alike: the same base ({training['salted']['base']['epochs']} epoch(s)), "
            f"then {fine_tune['epochs']} epochs fine-tuned with the same recipe (Adam, cosine schedule, the same "
            f"batches), one unsalted, one salted; standard model accuracy {record['accuracy_standard']:.3f} (the base "
            f"alone {record['accuracy_standard_base']:.3f})")


def write_output_report(records: list[dict], out_dir, stem: str) -> tuple:
    """Records -> `<stem>.jsonl`, `<stem>.png` (accuracies and salt recovery against the salt layer) and `<stem>.md`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splitveil.core.records import save_figure, write_records

    out_dir, jsonl = write_records(records, out_dir, stem)
    ordered = sorted(records, key=lambda r: (label(r), r["salt_layer"], r["split"], r["spec"].get("seed", 0)))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))

    def series(r: dict) -> str:  # one line per defence; runs cut deeper than just after the salted block apart
        return label(r) + ("" if r["split"] == r["salt_layer"] + 1 else f", cut {r['split']}")

    # the cloud's decoding with the recovered salt equals the client's wherever the salt is recovered (table), so
    # the left panel shows the client (solid), the class read from the features (dashed) and the naive read (grey)
    for index, defence in enumerate(sorted({series(r) for r in ordered})):
        rows = [r for r in ordered if series(r) == defence]
        x, colour = sorted({r["salt_layer"] for r in rows}), f"C{index % 10}"

        def mean(key: str) -> list[float]:  # over the seeds of each salt layer
            return [sum(r[key] for r in rows if r["salt_layer"] == p) / sum(r["salt_layer"] == p for r in rows) for p in x]

        seeds = len(rows) // len(x)
        suffix = f" (mean of {seeds} seeds)" if seeds > 1 else ""
        axes[0].plot(x, mean("accuracy_salted"), "o-", color=colour, label=f"client: {defence}{suffix}")
        axes[0].plot(x, mean("cloud_accuracy_class_head"), "x--", color=colour,
                     label=f"cloud, class from features: {defence}")
        axes[0].plot(x, mean("cloud_accuracy_unsalted_read"), "s", color="grey", ms=3)
        axes[1].plot(x, mean("salt_recovery"), "o-", color=colour, label=defence + suffix)
        if all("salt_cluster_accuracy" in r for r in rows):  # records made before the minimal-knowledge cloud lack it
            axes[1].plot(x, mean("salt_cluster_accuracy"), "x--", color=colour,
                         label=f"no model, no labels: clusters, best naming: {defence}")
    axes[0].plot([], [], "s", color="grey", ms=3, label="cloud, read as unsalted (every run)")
    axes[0].axhline(ordered[0]["accuracy_standard"], color="black", lw=1, label="standard model")
    axes[0].axhline(ordered[0]["chance_class"], color="black", lw=1, ls=":", label="chance")
    axes[1].axhline(ordered[0]["chance_salt"], color="black", lw=1, ls=":", label=f"chance ({ordered[0]['salt_values']} salts)")
    axes[0].set(xlabel="salt layer (after this many blocks)", ylabel="accuracy", ylim=(0, 1), title="label accuracy")
    axes[1].set(xlabel="salt layer (after this many blocks)", ylabel="fraction of salts recovered", ylim=(0, 1.02),
                title="salt recovery by the cloud")
    for ax in axes:
        ax.legend(fontsize=6, loc="lower right" if ax is axes[1] else "center right")
        ax.set_xticks(sorted({r["salt_layer"] for r in ordered}))
    plot = save_figure(fig, out_dir / f"{stem}.png")
    first = ordered[0]
    lines = [f"# Output privacy (Salted DNNs): {first['model']} on {first['dataset']}", "",
             f"Generated from the records in `{jsonl.name}` by `write_output_report`. Both models trained on "
             f"{first['sizes']['train']} examples; the attacker's auxiliary set holds {first['sizes']['aux']} (disjoint); "
             f"{first['sizes']['test']} test examples scored, {_requests(first)}. {_training_sentence(first)}; "
             f"chance {first['chance_class']:.3f} (class), {first['chance_salt']:.3f} (salt).", "",
             "| defence | salt layer | cut | seed | features | salted accuracy | standard accuracy | cloud, read as unsalted "
             "| salt recovery (as guessed / salt head alone) | cloud, with recovered salt | cloud, class head | salt groups "
             "without the model (k-means / mixture / random partition) | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ordered:
        groups = (f"{r['salt_cluster_accuracy']:.3f} / {r['salt_cluster_accuracy_gmm']:.3f} / "
                  f"{r['salt_cluster_accuracy_random_partition']:.3f}" if "salt_cluster_accuracy" in r else "not run")
        lines.append(f"| {label(r)} | {r['salt_layer']} | {r['split']} | {r['spec'].get('seed', 0)} | "
                     f"{'x'.join(map(str, r['feature_shape']))} | "
                     f"{r['accuracy_salted']:.3f} | {r['accuracy_standard']:.3f} | {r['cloud_accuracy_unsalted_read']:.3f} | "
                     f"{r['salt_recovery']:.3f} / {r['salt_recovery_salt_head_only']:.3f} | "
                     f"{r['cloud_accuracy_with_recovered_salt']:.3f} | {r['cloud_accuracy_class_head']:.3f} | {groups} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "## Threat models", ""]
    for name, threat in sorted(first["threat_models"].items()):
        lines.append(f"- **{name}**: {threat['description']}")
    lines += ["", f"![accuracies and salt recovery against the salt layer]({plot.name})", ""]
    markdown = out_dir / f"{stem}.md"
    markdown.write_text("\n".join(lines))
    return jsonl, plot, markdown
