"""The victims the image and output privacy experiments attack: a registered CNN trained on the train split of a
seeded data split, cached by everything that decides its weights.

`VictimSpec` names one (the image experiments' sizes, full and `quick`); the experiment specs that carry the same
fields (`experiments.image_privacy.ImageAttackSpec`, `experiments.output_privacy.OutputAttackSpec`) are accepted
wherever a `VictimSpec` is, so every experiment and the TEE executor share one cache.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VictimSpec:
    """A victim classifier: the image experiments' defaults (`quick()`: their `--quick` sizes)."""

    dataset: str = "fashion-mnist"
    model: str = "vgg"
    seed: int = 0
    train_size: int = 30_000  # capped at 45% of the data set
    aux_size: int = 15_000  # the attacker's images, disjoint (capped at 40%)
    test_size: int = 2_000
    epochs: int = 15
    lr: float = 2e-3
    schedule: str = "onecycle"
    augment: bool = True

    @classmethod
    def quick(cls, **overrides) -> "VictimSpec":
        """The `--quick` victims: 3 epochs on 10,000 images, no augmentation."""
        return cls(**{"train_size": 10_000, "aux_size": 5_000, "test_size": 1_000, "epochs": 3, "augment": False,
                      **overrides})


def split_sizes(n: int, spec) -> tuple[int, int, int]:
    """(train, aux, test) image counts of `spec` for a data set of `n` images (at most 45% / 40% / the rest)."""
    train = min(spec.train_size, int(0.45 * n))
    aux = min(spec.aux_size, int(0.4 * n))
    test = min(spec.test_size, n - train - aux)
    return train, aux, test


def train_config(spec):
    """The victims' `TrainConfig` for `spec` (a spec without the newer fields gets the first release's)."""
    from splitveil.train.classifier import TrainConfig

    return TrainConfig(epochs=spec.epochs, seed=spec.seed, lr=getattr(spec, "lr", 2e-3),
                       schedule=getattr(spec, "schedule", "constant"), augment=getattr(spec, "augment", False))


def splits_and_victim(spec, *, quiet: bool = True):
    """The data splits of `spec` and its model trained on the train split (cached): what the image and the output
    privacy experiments share. `spec` has dataset, model, seed, epochs and train/aux/test sizes.

    Returns:
        (splits, victim, was_cached).
    """
    from splitveil.data.images import load_dataset, split_dataset
    from splitveil.models.vision_zoo import VISION_MODELS, build_vision_model
    from splitveil.train.classifier import cached_classifier

    VISION_MODELS.get(spec.model)
    data = load_dataset(spec.dataset)
    train, aux, test = split_sizes(len(data), spec)
    splits = split_dataset(data, train=train, aux=aux, test=test, seed=spec.seed)
    shape, classes = data.image_shape, data.num_classes
    victim, cached = cached_classifier(
        lambda: build_vision_model(spec.model, shape, classes), splits.train.images, splits.train.labels,
        train_config(spec), quiet=quiet,
        key_fields={"dataset": spec.dataset, "model": spec.model, "train": train, "split_seed": spec.seed})
    return splits, victim, cached
