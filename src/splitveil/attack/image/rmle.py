"""White-box optimisation attack (rMLE, as in SiftFunnel's white_box_attack): find an input whose edge features
match the observed ones, with a total-variation prior, by gradient descent through the edge part's own weights."""

from __future__ import annotations

import torch

from splitveil.attack.base import ThreatModel
from splitveil.attack.image.base import IMAGE_ATTACKS, ImageAttack, frozen


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between neighbouring pixels, per image [N]."""
    dh = (images[..., 1:, :] - images[..., :-1, :]).pow(2).flatten(1).mean(1)
    dw = (images[..., :, 1:] - images[..., :, :-1]).pow(2).flatten(1).mean(1)
    return dh + dw


@IMAGE_ATTACKS.register("rmle")
class RegularisedMLEAttack(ImageAttack):
    """Args: steps: optimisation steps; lr: Adam step size on the pixels; tv: weight of the TV prior (relative to the
    feature loss, which is normalised by the features' mean square); batch_size: images optimised together."""

    name = "rmle"
    threat_model = ThreatModel(observes="uplink", knows_head_weights=True,
                               description="white box: holds the edge part's weights, optimises an input whose "
                                           "features match the observed ones (TV prior)")

    def __init__(self, target, *, steps: int = 300, lr: float = 0.05, tv: float = 0.05, batch_size: int = 100,
                 seed: int = 0, quiet: bool = True):
        super().__init__(target, seed=seed, quiet=quiet)
        self.steps, self.lr, self.tv, self.batch_size = steps, lr, tv, batch_size

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        edge = self.target.edge
        generator = torch.Generator().manual_seed(self.seed)
        out = []
        with frozen(edge.parameters()):
            for start in range(0, len(features), self.batch_size):
                out.append(self._invert(edge, features[start:start + self.batch_size], generator))
        return torch.cat(out)

    def _invert(self, edge, target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # target: [B, *feature_shape]; the pixels start as uniform noise around mid-grey
        guess = (0.5 + 0.1 * torch.randn(len(target), *self.target.image_shape, generator=generator)).clamp(0, 1)
        guess.requires_grad_(True)
        optimiser = torch.optim.Adam([guess], lr=self.lr)
        scale = target.pow(2).flatten(1).mean(1).clamp_min(1e-8)  # [B]
        for _ in range(self.steps):
            feature_loss = (edge(guess) - target).pow(2).flatten(1).mean(1) / scale  # [B]
            loss = (feature_loss + self.tv * total_variation(guess)).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                guess.clamp_(0.0, 1.0)
        return guess.detach()
