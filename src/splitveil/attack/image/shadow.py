"""Query-free shadow-model attack (He et al. 2019): without querying the edge, the attacker trains a substitute edge
against the frozen cloud part on its own labelled data, then inverts the substitute with a decoder and applies that
decoder to the features it observes."""

from __future__ import annotations

import math

import torch
from torch import nn

from splitveil.attack.base import ThreatModel
from splitveil.attack.image.base import IMAGE_ATTACKS, Decoder, ImageAttack, decode, frozen, train_decoder
from splitveil.attack.training import StopRule, holdout_split, mean_over_batches, shuffled_batches, train_until_plateau


def substitute_edge(image_shape: tuple[int, int, int], feature_shape: tuple[int, ...], *, width: int = 32) -> nn.Module:
    """A generic conv edge producing `feature_shape` (non-negative, like the ReLU outputs our cuts send)."""
    channels, height, _ = image_shape
    layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    size, hidden = height, width
    target_size = feature_shape[1] if len(feature_shape) == 3 else 4
    while size > target_size:
        layers += [nn.Conv2d(hidden, 2 * hidden, 3, stride=2, padding=1), nn.BatchNorm2d(2 * hidden), nn.ReLU()]
        size, hidden = math.ceil(size / 2), 2 * hidden
    if len(feature_shape) == 3:
        layers += [nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(feature_shape[1:]),
                   nn.Conv2d(hidden, feature_shape[0], 1), nn.ReLU()]
    else:
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(hidden * 16, feature_shape[0]), nn.ReLU()]
    return nn.Sequential(*layers)


def moment_gap(features: torch.Tensor, reference_mean: torch.Tensor, reference_std: torch.Tensor) -> torch.Tensor:
    """Squared gap between per-channel mean/std of `features` and of the observed features (scale-free)."""
    dims = [0, *range(2, features.dim())]
    mean, std = features.mean(dims), features.std(dims)
    scale = reference_mean.pow(2).mean() + reference_std.pow(2).mean() + 1e-8
    return ((mean - reference_mean).pow(2).mean() + (std - reference_std).pow(2).mean()) / scale


@IMAGE_ATTACKS.register("shadow")
class ShadowModelAttack(ImageAttack):
    """Args: stop: when each phase stops training (the substitute edge: its loss on held-out auxiliary images; the
    decoder: its held-out MSE; each until a plateau or the cap); moments: weight of matching the observed features'
    per-channel mean/std (uses only what the cloud sees, unpaired). When the target publishes the edge's
    architecture (`edge_architecture`, e.g. a defended edge with its funnel or noise layer), the substitute is a
    freshly initialised copy of it, stochastic layers included; otherwise a generic conv edge."""

    name = "shadow"
    threat_model = ThreatModel(observes="uplink", knows_cloud_weights=True, auxiliary_data=True,
                               description="query-free: trains a substitute edge against the frozen cloud part on its "
                                           "own labelled data, inverts the substitute; never queries the edge")

    def __init__(self, target, *, stop: StopRule = StopRule(), moments: float = 1.0, width: int = 32,
                 batch_size: int = 64, seed: int = 0, quiet: bool = True):
        super().__init__(target, seed=seed, quiet=quiet)
        self.stop, self.moments, self.width, self.batch_size = stop, moments, width, batch_size
        self.substitute = self.decoder = None

    def fit(self, observed: torch.Tensor | None = None) -> "ShadowModelAttack":
        aux, cloud = self.target.aux, self.target.cloud
        torch.manual_seed(self.seed)
        architecture = getattr(self.target, "edge_architecture", None)
        # adaptive: a substitute of the deployed edge's own architecture when it is public (a defended edge)
        self.substitute = (architecture() if architecture is not None
                           else substitute_edge(self.target.image_shape, self.target.feature_shape, width=self.width))
        optimiser = torch.optim.Adam(self.substitute.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(self.seed)
        reference = None
        if observed is not None and self.moments > 0:
            dims = [0, *range(2, observed.dim())]
            reference = observed.mean(dims), observed.std(dims)
        train, held = holdout_split(len(aux), self.stop.holdout, seed=self.seed)

        def loss_of(index: torch.Tensor) -> torch.Tensor:
            features = self.substitute(aux.images[index])
            loss = nn.functional.cross_entropy(cloud(features), aux.labels[index])
            return loss if reference is None else loss + self.moments * moment_gap(features, *reference)

        def run_epoch(epoch: int) -> None:
            for batch in shuffled_batches(len(train), self.batch_size, generator):
                loss = loss_of(train[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()

        with frozen(cloud.parameters()):
            edge_phase = train_until_plateau(run_epoch, lambda: mean_over_batches(lambda i: loss_of(held[i]), len(held)),
                                             modules=[self.substitute], optimisers=[optimiser], rule=self.stop,
                                             desc="shadow edge", quiet=self.quiet)
        with torch.no_grad():
            shadow_features = torch.cat([self.substitute(aux.images[i:i + 256]) for i in range(0, len(aux), 256)])
        self.decoder = Decoder(self.target.feature_shape, self.target.image_shape, width=self.width)
        self.phases = {"substitute": edge_phase,
                       "decoder": train_decoder(self.decoder, shadow_features, aux.images, stop=self.stop,
                                                seed=self.seed, quiet=self.quiet, desc="shadow decoder")}
        return self

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            self.fit(features)
        return decode(self.decoder, features)
