"""Black-box inverse network (He et al. 2019; SiftFunnel's generative MIA): a decoder trained on auxiliary images
and the features the attacker gets for them by querying the edge."""

from __future__ import annotations

import torch

from splitveil.attack.base import ThreatModel
from splitveil.attack.image.base import IMAGE_ATTACKS, Decoder, ImageAttack, decode, train_decoder
from splitveil.attack.training import StopRule


@IMAGE_ATTACKS.register("inverse")
class InverseNetworkAttack(ImageAttack):
    """Args: stop: when the decoder stops training (its MSE on held-out auxiliary pairs plateaus, or the cap);
    width: decoder channels at full resolution."""

    name = "inverse"
    threat_model = ThreatModel(observes="uplink", queries_edge=True, auxiliary_data=True,
                               description="black box: queries the edge with its own auxiliary images, trains a "
                                           "decoder from features back to images")

    def __init__(self, target, *, stop: StopRule = StopRule(), width: int = 32, seed: int = 0, quiet: bool = True):
        super().__init__(target, seed=seed, quiet=quiet)
        self.stop, self.width = stop, width
        self.decoder = None

    def fit(self, observed: torch.Tensor | None = None) -> "InverseNetworkAttack":
        images = self.target.aux.images  # [N, C, H, W]
        features = self.target.query(images)  # [N, *feature_shape]
        torch.manual_seed(self.seed)
        self.decoder = Decoder(self.target.feature_shape, self.target.image_shape, width=self.width)
        self.phases = {"decoder": train_decoder(self.decoder, features, images, stop=self.stop, seed=self.seed,
                                                quiet=self.quiet, desc="inverse network")}
        return self

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            self.fit()
        return decode(self.decoder, features)
