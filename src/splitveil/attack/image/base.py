"""What an image attack may use of a split classifier, the ImageAttack base class, and the shared networks.

An `ImageTarget` lists everything a scenario offers an attacker (the edge part's weights, queries through the
edge, the cloud part, auxiliary data). An attack declares its `ThreatModel`; its constructor checks that the target
offers all of it and keeps only that (`ImageTarget.restrict`), so an attack cannot use what it did not declare.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from splitveil.attack.base import Attack, ThreatModel
from splitveil.core.errors import ConfigError
from splitveil.core.registry import Registry
from splitveil.data.images import ImageData

IMAGE_ATTACKS: Registry = Registry("image attack")


@dataclass(frozen=True)
class ImageTarget:
    """What the attacked split offers. `None` means the attacker cannot have it."""

    image_shape: tuple[int, int, int]  # (C, H, W) of the private inputs
    feature_shape: tuple[int, ...]  # what crosses the cut, per image
    edge: object | None = None  # the edge Part itself (its weights: white box)
    query: Callable[[torch.Tensor], torch.Tensor] | None = None  # images -> features, no gradients (black box)
    cloud: object | None = None  # the cloud Part (its weights)
    aux: ImageData | None = None  # attacker's own labelled data, disjoint from the victim's

    @classmethod
    def from_parts(cls, edge, cloud, *, image_shape, aux: ImageData | None = None) -> "ImageTarget":
        """Everything a two-way split can offer: edge weights and queries, the cloud part, auxiliary data."""
        with torch.no_grad():
            feature_shape = tuple(edge(torch.zeros(1, *image_shape)).shape[1:])

        @torch.no_grad()
        def query(images: torch.Tensor) -> torch.Tensor:
            return torch.cat([edge(images[i:i + 256]) for i in range(0, len(images), 256)])

        return cls(tuple(image_shape), feature_shape, edge=edge, query=query, cloud=cloud, aux=aux)

    def restrict(self, threat: ThreatModel, attack: str) -> "ImageTarget":
        """A copy holding only what `threat` declares; ConfigError naming what is missing."""
        needs = {"edge": threat.knows_head_weights, "query": threat.queries_edge,
                 "cloud": threat.knows_cloud_weights, "aux": threat.auxiliary_data}
        what = {"edge": "the edge part's weights", "query": "query access to the edge",
                "cloud": "the cloud part's weights", "aux": "auxiliary data"}
        missing = [what[k] for k, needed in needs.items() if needed and getattr(self, k) is None]
        if missing:
            raise ConfigError(f"the {attack} attack needs {' and '.join(missing)}, which this target does not give")
        return replace(self, **{k: None for k, needed in needs.items() if not needed})


class ImageAttack(Attack):
    """Reconstructs private images from the features that cross the cut.

    Subclasses set `name` and `threat_model`, implement `reconstruct`, and `fit` when they train something.
    """

    def __init__(self, target: ImageTarget, *, seed: int = 0, quiet: bool = True):
        self.target = target.restrict(self.threat_model, self.name)
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


def train_decoder(decoder: nn.Module, features: torch.Tensor, images: torch.Tensor, *, epochs: int, seed: int,
                  batch_size: int = 64, lr: float = 1e-3, quiet: bool = True, desc: str = "decoder") -> nn.Module:
    """Fits `decoder(features) ~ images` with MSE and Adam; returns it in eval mode."""
    from splitveil.train.classifier import progress

    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(decoder.parameters(), lr=lr)
    steps = (len(images) + batch_size - 1) // batch_size
    decoder.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for step in progress(range(steps), total=steps, desc=f"{desc} {epoch + 1}/{epochs}", quiet=quiet):
            batch = order[step * batch_size:(step + 1) * batch_size]
            loss = nn.functional.mse_loss(decoder(features[batch]), images[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return decoder.eval()


@torch.no_grad()
def decode(decoder: nn.Module, features: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([decoder(features[i:i + batch_size]) for i in range(0, len(features), batch_size)])
