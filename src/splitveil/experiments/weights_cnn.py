"""SLIP's weights deployment on a CNN under the weights attacks: what the residual bundle plus N stolen labelled
images are worth to a thief, against training the same architecture on the same N images from scratch.

`run_cnn_weights_attack(spec)`:
1. the victim: a CNN trained on Fashion-MNIST (the training cache of `slip eval`'s CNN), its test accuracy;
2. every decomposable matrix (convolutions as [out, in * kh * kw], linear layers) split at rank k, plain or hardened;
3. the residual bundle (every protected matrix its residual; biases and batch-norm statistics given to the attacker)
   and its test accuracy;
4. the attack granted that bundle (the null-space attack is scored on the subspaces it recovers) fits its correction
   on the attacker's stolen images (a fifth held out to choose the learning rate and stop), learning rate swept,
   stopped on the held-out plateau; the result's test accuracy.

`run_cnn_weights_curves` runs every attack at every budget of stolen images: the CNN extraction curves.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from splitveil.attack.training import StopRule
from splitveil.attack.weights.finetune import FineTuneSpec
from splitveil.core.errors import ConfigError

VICTIM_TRAIN, VICTIM_EPOCHS, AUX, TEST = 20_000, 2, 10_000, 5_000  # as `slip eval`'s CNN (one cached victim)


@dataclass(frozen=True)
class CnnWeightsSpec:
    """One weights-attack run on a CNN (saved with its record)."""

    model: str = "lenet"
    attack: str = "nullspace"
    rank: int = 4  # secure rank k per matrix
    hardened: bool = False
    mask_rank: int = 2  # the hardened split's extra secret directions (LeNet's first convolution has 6 rows)
    stolen: int = 1_000  # labelled images the thief holds (from the attacker's part of the data set)
    held_out_fraction: float = 0.2  # of the stolen images, held out to choose the learning rate and stop
    finetune: FineTuneSpec = field(default_factory=lambda: FineTuneSpec(
        batch=32, learning_rates=(3e-3, 1e-2, 3e-2, 1e-1), sweep_steps=30, steps_per_round=50,
        stop=StopRule(max_epochs=60, patience=5, lr_patience=2, min_delta=1e-3)))
    seed: int = 0

    def __post_init__(self):
        from splitveil.attack.weights import WEIGHTS_ATTACKS

        WEIGHTS_ATTACKS.get(self.attack)
        if self.seed < 0:
            raise ConfigError(f"--seed must be non-negative, got {self.seed}")
        if self.rank < 1:
            raise ConfigError(f"the secure rank must be >= 1 to attack the weights deployment, got {self.rank}")
        if not 0 < self.held_out_fraction < 1:
            raise ConfigError(f"held_out_fraction must be in (0, 1), got {self.held_out_fraction}")
        if not 10 <= self.stolen <= AUX:
            raise ConfigError(f"the thief's stolen images must number 10 to {AUX:,} (the attacker's part of the "
                              f"data set), got {self.stolen}")
        if self.hardened and self.mask_rank < 1:
            raise ConfigError(f"the hardened split needs a mask rank >= 1, got {self.mask_rank}")

    def to_dict(self) -> dict:
        return {**asdict(self), "finetune": self.finetune.to_dict()}


def cnn_victim(model_name: str, seed: int):
    from splitveil.data.images import load_dataset, split_dataset
    from splitveil.models.vision_zoo import build_vision_model
    from splitveil.train.classifier import TrainConfig, cached_classifier

    data = load_dataset("fashion-mnist")
    splits = split_dataset(data, train=VICTIM_TRAIN, aux=AUX, test=TEST, seed=seed)
    build = lambda: build_vision_model(model_name, data.image_shape, data.num_classes)  # noqa: E731
    victim, _ = cached_classifier(build, splits.train.images, splits.train.labels,
                                  TrainConfig(epochs=VICTIM_EPOCHS, seed=seed),
                                  key_fields={"model": model_name, "dataset": "fashion-mnist", "train": VICTIM_TRAIN,
                                              "slip": 1}, quiet=True)
    for parameter in victim.parameters():
        parameter.requires_grad_(False)
    return victim.eval(), splits


def run_cnn_weights_attack(spec: CnnWeightsSpec, *, progress=None, quiet: bool = True, victim=None) -> dict:
    """Runs the attack of `spec`; returns its record (see the module docstring). `victim` = (model, splits) from an
    earlier call skips loading it again."""
    from splitveil.attack.weights import WEIGHTS_ATTACKS, WeightsTarget
    from splitveil.attack.weights.finetune import classifier_loss
    from splitveil.attack.weights.subspace import orthonormal
    from splitveil.core.records import environment
    from splitveil.experiments.weights_attack import alignment_record, protected_matrices
    from splitveil.protect.slip.decompose import decompose, set_weight_matrix, weight_matrix
    from splitveil.train.classifier import accuracy, predict

    say = progress or (lambda message: None)
    attack_class = WEIGHTS_ATTACKS.get(spec.attack)
    began = time.perf_counter()
    model, splits = victim if victim is not None else cnn_victim(spec.model, spec.seed)
    test_x, test_y = splits.test.images, splits.test.labels
    with torch.inference_mode():
        accuracy_original = accuracy(predict(model, test_x), test_y)
    residual = copy.deepcopy(model)
    matrices = protected_matrices(residual)
    generator = torch.Generator().manual_seed(spec.seed)
    truths, secure_ranks = {}, {}
    for name, module in matrices:
        part = decompose(weight_matrix(module), rank=spec.rank, mask_rank=spec.mask_rank if spec.hardened else 0,
                         generator=generator)
        truths[name] = (orthonormal(part.left), orthonormal(part.right.T))
        secure_ranks[name] = part.rank
        set_weight_matrix(module, part.residual)
    with torch.inference_mode():
        accuracy_residual = accuracy(predict(residual, test_x), test_y)

    held = max(5, round(spec.stolen * spec.held_out_fraction))
    images, labels = splits.aux.images[:spec.stolen], splits.aux.labels[:spec.stolen]
    train, held_out = (images[held:], labels[held:]), (images[:held], labels[:held])
    attack = attack_class(WeightsTarget(residual, secure_ranks), seed=spec.seed)
    attack.prepare()
    structure = alignment_record(attack, truths)
    say(f"{spec.attack}: fitting {attack.unknowns():,} unknowns on {len(train[0]):,} stolen images "
        f"({held} held out) ...")
    finetune = replace(spec.finetune, batch=min(spec.finetune.batch, len(train[0])))
    training = attack.fit(train, held_out, finetune, quiet=quiet, report=progress, loss=classifier_loss)
    with torch.inference_mode():
        accuracy_after = accuracy(predict(attack.reconstruct(), test_x), test_y)
    return {
        "spec": spec.to_dict(), "model": spec.model, "dataset": "fashion-mnist", "attack": spec.attack,
        "hardened": spec.hardened, "rank": spec.rank, "mask_rank": spec.mask_rank if spec.hardened else 0,
        "matrices": len(matrices), **structure,
        "accuracy_original": accuracy_original, "accuracy_residual": accuracy_residual,
        "accuracy_after": accuracy_after, "stolen": spec.stolen, "train_images": len(train[0]), "held_out_images": held,
        "test_images": len(test_y), "unknowns": attack.unknowns(),
        "weights_total": sum(p.numel() for p in attack.reconstruct().parameters()),
        **training, "threat_model": attack.threat_model.to_dict(), "seconds": time.perf_counter() - began,
        "environment": environment(),
    }


def run_cnn_weights_curves(spec: CnnWeightsSpec, attacks: list[str], budgets: list[int], *, progress=None,
                           on_record=None, resume: bool = False) -> dict:
    """Every attack of `attacks` at every budget of stolen images; returns the curves' record (as
    `run_weights_curves`, with test accuracy in place of perplexity, and `resume` alike)."""
    from splitveil.core.records import environment
    from splitveil.experiments.units import kept_or_run

    stamp, began, runs = environment(), time.perf_counter(), []
    victim = cnn_victim(spec.model, spec.seed)
    for attack in attacks:
        for budget in budgets:
            say = (lambda message, a=attack, b=budget: progress(f"[{a}, {b:,} images] {message}")) if progress else None
            unit = replace(spec, attack=attack, stolen=budget)
            record = kept_or_run("weights-attack-cnn", unit.to_dict(),
                                 lambda: run_cnn_weights_attack(unit, progress=say, victim=victim), resume=resume)
            runs.append(record)
            if on_record is not None:
                on_record(record)
    curves = {attack: [{"stolen": r["stolen"], "accuracy_after": r["accuracy_after"], "unknowns": r["unknowns"],
                        "learning_rate": r["learning_rate"], "attacker_converged": r["attacker_converged"]}
                       for r in runs if r["attack"] == attack] for attack in attacks}
    first = runs[0]
    return {"kind": "weights-curves-cnn", "spec": spec.to_dict(), "model": spec.model, "dataset": "fashion-mnist",
            "hardened": spec.hardened, "attacks": attacks, "budgets": budgets, "curves": curves,
            "accuracy_original": first["accuracy_original"], "accuracy_residual": first["accuracy_residual"],
            "runs": runs, "seconds": time.perf_counter() - began, "environment": stamp}

