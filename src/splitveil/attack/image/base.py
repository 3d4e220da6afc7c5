"""What an image attack may use of a split classifier, the ImageAttack base class, and the shared networks.

An `ImageTarget` lists everything a scenario offers an attacker (the edge part's weights, queries through the
edge, the cloud part, auxiliary data). An attack declares its `ThreatModel`; its constructor has the target grant
exactly that (`Target.grant`) and keeps only the resulting capabilities: a fresh part built from copies of the
granted segments alone (`edge`, `cloud`), a `SealedQuery` that runs a private copy of the edge in another process
(`query`), the auxiliary data. Nothing an attack holds leads to the victim's parts or to the withheld side's weights.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from splitveil.attack.base import Attack, SealedQuery, Target
from splitveil.attack.training import (Convergence, StopRule, holdout_split, mean_over_batches, shuffled_batches,
                                       train_until_plateau)
from splitveil.core.errors import ConfigError
from splitveil.core.registry import Registry
from splitveil.data.images import ImageData

IMAGE_ATTACKS: Registry = Registry("image attack")


class PartQuery:
    """The victim's side of query access: images -> features through the edge part, in batches, no gradients.

    An attacker never holds this object; it is granted a `SealedQuery` over a private copy of `part` instead.
    """

    def __init__(self, part, *, batch_size: int = 256):
        self.part, self.batch_size = part, batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.part(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)])


def isolated_part(part):
    """A part running the same segments as `part` (a `SequentialPart`) on copies of those segments' weights only:
    its owner is a fresh stack holding nothing but them."""
    import copy

    from splitveil.models.sequential import SequentialSplittable

    segments = [copy.deepcopy(module) for module in part.modules()]
    owner = SequentialSplittable(blocks=segments, name=f"{getattr(part.owner, 'name', 'model')} segments "
                                                        f"[{part.start}, {part.end})")
    return owner.make_part(0, len(segments))


@dataclass(frozen=True)
class ImageTarget(Target):
    """What the attacked split offers. `None` means the attacker cannot have it."""

    image_shape: tuple[int, int, int]  # (C, H, W) of the private inputs
    feature_shape: tuple[int, ...]  # what crosses the cut, per image
    edge: object | None = None  # the edge Part itself (its weights: white box)
    query: PartQuery | None = None  # images -> features through the edge, no gradients (black box)
    cloud: object | None = None  # the cloud Part (its weights)
    aux: ImageData | None = None  # attacker's own labelled data, disjoint from the victim's
    edge_architecture: object | None = None  # public: () -> an untrained edge of the deployed (defended) architecture

    offers = {"knows_head_weights": ("edge", "the edge part's weights"),
              "queries_edge": ("query", "query access to the edge"),
              "knows_cloud_weights": ("cloud", "the cloud part's weights"),
              "auxiliary_data": ("aux", "auxiliary data")}

    @classmethod
    def from_parts(cls, edge, cloud, *, image_shape, aux: ImageData | None = None,
                   edge_architecture=None) -> "ImageTarget":
        """Everything a two-way split can offer: edge weights and queries, the cloud part, auxiliary data, and (when
        the edge is not a plain prefix of a public model, e.g. a defended one) a builder of its architecture."""
        with torch.no_grad():
            feature_shape = tuple(edge(torch.zeros(1, *image_shape)).shape[1:])
        return cls(tuple(image_shape), feature_shape, edge=edge, query=PartQuery(edge), cloud=cloud, aux=aux,
                   edge_architecture=edge_architecture)

    def offered(self, field: str) -> bool:
        return getattr(self, field) is not None

    def copy_of(self, field: str):
        if field in ("edge", "cloud"):
            return isolated_part(getattr(self, field))
        if field == "query":
            if not isinstance(self.query, PartQuery):
                raise ConfigError("query access must be offered as a PartQuery over the edge part, so that it can "
                                  "run sealed in its own process")
            return SealedQuery(nn.Sequential(*isolated_part(self.query.part).modules()), batch_size=self.query.batch_size)
        return self.aux  # the attacker's own data

    def public(self) -> dict:
        return {"image_shape": self.image_shape, "feature_shape": self.feature_shape,
                "edge_architecture": self.edge_architecture}


class ImageAttack(Attack):
    """Reconstructs private images from the features that cross the cut.

    Subclasses set `name` and `threat_model`, implement `reconstruct`, and `fit` when they train something. They
    reach the split only through `self.target`, the capabilities granted by their threat model.
    """

    def __init__(self, target: ImageTarget, *, seed: int = 0, quiet: bool = True):
        self.target = target.grant(self.threat_model, self.name)
        self.seed, self.quiet = seed, quiet

    def fit(self, observed: torch.Tensor | None = None) -> "ImageAttack":
        """Prepares the attack (trains its networks); `observed` are features the attacker saw, unpaired."""
        return self

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:  # [N, *feature_shape] -> [N, C, H, W]
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, **self.threat_model.to_dict()}


@contextmanager
def frozen(parameters):
    """Temporarily stops gradients into `parameters` (the victim's weights while an attacker optimises)."""
    parameters = [p for p in parameters if p.requires_grad]
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in parameters:
            p.requires_grad_(True)


class Decoder(nn.Module):
    """Features -> image: a 3x3 conv (or a linear layer for vector features), stride-2 transposed convs until the
    image size is reached (channels halve as the resolution doubles), a 3x3 conv and a sigmoid."""

    def __init__(self, feature_shape: tuple[int, ...], image_shape: tuple[int, int, int], *, width: int = 32):
        super().__init__()
        channels, height, width_px = image_shape
        if len(feature_shape) == 3:
            size = feature_shape[1]
            ups = max(0, math.ceil(math.log2(height / size - 1e-9))) if size < height else 0
            hidden = min(256, width * 2**ups)
            self.stem = nn.Sequential(nn.Conv2d(feature_shape[0], hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU())
        else:
            ups = 2 if height >= 16 else 1
            size = math.ceil(height / 2**ups)
            hidden = min(256, width * 2**ups)
            self.stem = nn.Sequential(nn.Linear(feature_shape[0], hidden * size * size), nn.ReLU(),
                                      nn.Unflatten(1, (hidden, size, size)))
        layers: list[nn.Module] = []
        for _ in range(ups):
            layers += [nn.ConvTranspose2d(hidden, max(width, hidden // 2), 4, stride=2, padding=1),
                       nn.BatchNorm2d(max(width, hidden // 2)), nn.ReLU()]
            hidden = max(width, hidden // 2)
        layers += [nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, channels, 3, padding=1),
                   nn.Upsample(size=(height, width_px), mode="bilinear"), nn.Sigmoid()]
        self.body = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(features))


def train_decoder(decoder: nn.Module, features: torch.Tensor, images: torch.Tensor, *, stop: StopRule, seed: int,
                  batch_size: int = 64, lr: float = 1e-3, quiet: bool = True, desc: str = "decoder") -> Convergence:
    """Fits `decoder(features) ~ images` with MSE and Adam until the MSE on a held-out part of these (the
    attacker's own) pairs plateaus (`train_until_plateau`); leaves the best epoch's weights, in eval mode."""
    train, held = holdout_split(len(images), stop.holdout, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(decoder.parameters(), lr=lr)

    def run_epoch(epoch: int) -> None:
        for batch in shuffled_batches(len(train), batch_size, generator):
            index = train[batch]
            loss = nn.functional.mse_loss(decoder(features[index]), images[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()

    def held_out_mse() -> float:
        return mean_over_batches(lambda i: nn.functional.mse_loss(decoder(features[held[i]]), images[held[i]]), len(held))

    return train_until_plateau(run_epoch, held_out_mse, modules=[decoder], optimisers=[optimiser], rule=stop,
                               desc=desc, quiet=quiet)


@torch.no_grad()
def decode(decoder: nn.Module, features: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([decoder(features[i:i + batch_size]) for i in range(0, len(features), batch_size)])
