"""The image-defence base class, its registry, and how a defence rewrites a split CNN around its cut.

A defence acts at one cut `c` of a `SequentialSplittable`. It may add layers that end the edge (`edge_layers`: run on
the device, their output is what the cloud receives) and layers that begin the cloud (`cloud_layers`), and it may add
terms to the training loss (`loss`). The defended model keeps the same segments and cut points: the edge layers are
appended to the segment before the cut (or, for a defence with `replaces_edge_block`, take its place: SiftFunnel's
funnel is the edge's last block, so the edge gets lighter) and the cloud layers are prepended to the one after it,
so `apply(model, plan)` splits a defended model exactly like an undefended one and split == unsplit still holds.

Stochastic edge layers (noise, dropout, a VIB's sample) stay active in eval mode: they are what the device deploys,
and what an attacker querying the edge sees.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from splitveil.core.errors import ConfigError
from splitveil.core.registry import Registry

IMAGE_DEFENCES: Registry = Registry("image defence")


@dataclass(frozen=True)
class CutShape:
    """What the defence sees of the undefended cut: the images and the features that would cross it."""

    image_shape: tuple[int, int, int]  # (C, H, W)
    feature_shape: tuple[int, ...]  # per image, e.g. (32, 14, 14)
    num_classes: int
    block_input_shape: tuple[int, ...] = ()  # per image, what enters the block before the cut, e.g. (32, 28, 28)


class ImageDefence:
    """One defence at one strength. Subclasses set `name`, `stage`, `default_strength` and override what they change.

    Args:
        strength: the one knob; 0 is the identity (no layers, plain cross-entropy).
    """

    name = "none"
    stage = "none"  # "cut" (a transform at the cut), "loss" (a training-loss term), "rewrite" (edge/cloud rebuilt)
    default_strength = 0.0
    max_strength: float | None = None  # exclusive upper bound, when there is one
    description = "no defence"
    replaces_edge_block = False  # edge_layers take the place of the block before the cut (given its input)
    frontier_strengths: tuple[float, ...] = ()  # `image-sweep --frontier` walks these, weakest first

    def __init__(self, strength: float | None = None):
        strength = self.default_strength if strength is None else float(strength)
        if not strength >= 0 or strength != strength:
            raise ConfigError(f"{self.name} strength must be >= 0, got {strength:g}")
        if self.name == "none" and strength != 0:
            raise ConfigError(f"the none defence has no strength to set (got {strength:g})")
        if self.max_strength is not None and strength >= self.max_strength:
            raise ConfigError(f"{self.name} strength must be below {self.max_strength:g}, got {strength:g}")
        self.strength = strength

    @property
    def identity(self) -> bool:
        return self.strength == 0

    @property
    def trains(self) -> bool:
        """Whether the defended model differs from the undefended one (and needs its own training)."""
        return not self.identity

    def edge_layers(self, shape: CutShape) -> list[nn.Module]:
        """Layers appended to the edge (their output is what crosses the cut); with `replaces_edge_block`, layers
        that replace the block before the cut (they receive `shape.block_input_shape`)."""
        return []

    def cloud_layers(self, shape: CutShape, sent_shape: tuple[int, ...]) -> list[nn.Module]:
        """Layers prepended to the cloud (they receive `sent_shape` and must give `shape.feature_shape`)."""
        return []

    def loss(self, images: torch.Tensor, sent: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of the defended model on a batch; `sent` is what crosses the cut."""
        return F.cross_entropy(logits, labels)

    def finetune_epochs(self) -> int:
        """Epochs of a second phase that freezes the edge and trains the cloud on cross-entropy (0: none)."""
        return 0

    def options(self) -> dict:
        """Everything besides the strength that decides the defended model (part of its cache key)."""
        return {}

    def describe(self) -> dict:
        return {"name": self.name, "strength": self.strength, "stage": self.stage, "description": self.description,
                **({"options": self.options()} if self.options() else {})}


IMAGE_DEFENCES.register("none", ImageDefence)


#: strengths chosen per data set and model by `splitveil attack image-defaults --write-defaults` (its record says
#: how: the strongest setting whose accuracy cost stays within the paper's 3 points), {defence: {"dataset/model": s}}
CALIBRATED_DEFAULTS = Path(__file__).with_name("defaults.json")


@functools.cache
def _calibrated() -> dict:
    if not CALIBRATED_DEFAULTS.is_file():
        return {}
    return json.loads(CALIBRATED_DEFAULTS.read_text()).get("strengths", {})


def calibrated_strength(name: str, dataset: str | None, model: str | None) -> float | None:
    """The strength calibrated for defence `name` on (`dataset`, `model`), or None where none was."""
    return _calibrated().get(name, {}).get(f"{dataset}/{model}")


def make_defence(name: str, strength: float | None = None, *, dataset: str | None = None, model: str | None = None,
                 **options) -> ImageDefence:
    """The registered defence `name` at `strength`; when None, the strength calibrated for (`dataset`, `model`) if
    there is one, else the defence's default. ConfigError for unknown names."""
    defence = IMAGE_DEFENCES.get(name)
    if strength is None:
        strength = calibrated_strength(name, dataset, model)
    return defence(strength, **options)


def cut_segment(model, cut: int) -> int:
    """Index of the first segment after cut `cut` (the edge runs segments [0, this))."""
    from splitveil.plan.plan import check_block_cut

    check_block_cut(cut, model.num_blocks, flag="cut")
    return model.num_prologue + cut


def defended_model(model, defence: ImageDefence, cut: int, *, num_classes: int, image_shape) -> object:
    """`model` (a `SequentialSplittable`, untrained or not) with `defence` built in at `cut`; the same object when
    the defence is the identity. The returned model has the same segments and cut points as `model`."""
    from splitveil.models.sequential import SequentialSplittable

    if not defence.trains:
        return model
    k = cut_segment(model, cut)
    segments = list(model.segments)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        block_input = model.run(torch.zeros(2, *image_shape), 0, k - 1)
        feature_shape = tuple(model.run(block_input, k - 1, k).shape[1:])
        model.train(was_training)
    shape = CutShape(tuple(image_shape), feature_shape, num_classes, tuple(block_input.shape[1:]))
    edge = defence.edge_layers(shape)
    if edge:
        with torch.no_grad():
            probe_input = block_input if defence.replaces_edge_block else torch.zeros(2, *feature_shape)
            probe = nn.Sequential(*edge).eval()(probe_input)
        sent_shape = tuple(probe.shape[1:])
        segments[k - 1] = nn.Sequential(*edge) if defence.replaces_edge_block else nn.Sequential(segments[k - 1], *edge)
    else:
        sent_shape = feature_shape
    cloud = defence.cloud_layers(shape, sent_shape)
    if cloud:
        if k == len(segments):
            raise ConfigError(f"the {defence.name} defence needs a cloud part after cut {cut}, and there is none")
        segments[k] = nn.Sequential(*cloud, segments[k])
    prologue, blocks = segments[:model.num_prologue], segments[model.num_prologue:model.num_prologue + model.num_blocks]
    epilogue = segments[model.num_prologue + model.num_blocks:]
    return SequentialSplittable(prologue=prologue, blocks=blocks, epilogue=epilogue,
                                name=f"{model.name}+{defence.name}")


def defended_loss(defence: ImageDefence, cut: int):
    """The training loss of a model defended at `cut`: `loss(model, images, labels)` for `train_classifier`."""

    def loss(model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        k = cut_segment(model, cut)
        sent = model.run(images, 0, k)
        logits = model.run(sent, k, len(model.segments))
        return defence.loss(images, sent, logits, labels)

    return loss


class Noise(nn.Module):
    """Adds N(0, (strength x RMS of the sample)²) to every value, in training and in deployment."""

    def __init__(self, strength: float):
        super().__init__()
        self.strength = float(strength)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.strength == 0:
            return z
        rms = z.detach().flatten(1).pow(2).mean(1).sqrt().view(-1, *[1] * (z.dim() - 1))
        return z + self.strength * rms * torch.randn_like(z)


class AlwaysDropout(nn.Module):
    """Bernoulli dropout with rate `p` (kept values scaled by 1 / (1 - p)), in training and in deployment."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.dropout(z, self.p, training=True) if self.p > 0 else z


def train_defended(defence: ImageDefence, cut: int):
    """A `train(model, images, labels, config, quiet=, desc=)` for `cached_classifier`: the defence's loss, then its
    freeze-edge fine-tune phase if it has one (`finetune_cloud`)."""
    from splitveil.train.classifier import train_classifier

    def train(model, images, labels, config, *, quiet: bool = True, desc: str = "train"):
        train_classifier(model, images, labels, config, quiet=quiet, desc=f"{desc}+{defence.name}",
                         loss=defended_loss(defence, cut))
        if defence.finetune_epochs() > 0:
            finetune_cloud(model, cut, images, labels, config, epochs=defence.finetune_epochs(), quiet=quiet)
        return model.eval()

    return train


def finetune_cloud(model, cut: int, images: torch.Tensor, labels: torch.Tensor, config, *, epochs: int,
                   quiet: bool = True):
    """SiftFunnel's second phase: the edge frozen (weights and batch-norm statistics), the cloud trained on
    cross-entropy alone at a thousandth of `config.lr` (the code: 1e-5 after training at 1e-2)."""
    from dataclasses import replace

    from splitveil.train.classifier import train_classifier

    k = cut_segment(model, cut)
    cloud = [p for segment in model.segments[k:] for p in segment.parameters()]
    edge = [p for segment in model.segments[:k] for p in segment.parameters() if p.requires_grad]

    def cloud_loss(m, x, y):
        for segment in m.segments[:k]:
            segment.eval()  # the frozen edge's batch-norm statistics stay as trained
        return F.cross_entropy(m(x), y)

    for p in edge:
        p.requires_grad_(False)
    try:
        phase = replace(config, epochs=epochs, lr=config.lr / 1000, schedule="constant", seed=config.seed + 1)
        train_classifier(model, images, labels, phase, quiet=quiet, desc="cloud fine-tune", parameters=cloud,
                         loss=cloud_loss)
    finally:
        for p in edge:
            p.requires_grad_(True)
    return model.eval()
