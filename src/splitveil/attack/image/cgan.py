"""Conditional GAN inversion (pix2pix-style, as the TEE-partitioning paper and Origami use to pick the cut): a
generator maps features to an image; a discriminator judges (image, features) pairs; the generator minimises the
adversarial loss plus lambda times the L1 distance to the true image. Pairs come from querying the edge."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from splitveil.attack.base import ThreatModel
from splitveil.attack.image.base import IMAGE_ATTACKS, Decoder, ImageAttack, decode


class PairDiscriminator(nn.Module):
    """D(image, features) -> patch logits [B, P]: the features are mixed to 8 channels (1x1 conv; a linear layer for
    vectors), resized to the image size and concatenated with the image, then strided convs (a PatchGAN)."""

    def __init__(self, image_shape: tuple[int, int, int], feature_shape: tuple[int, ...], *, width: int = 32):
        super().__init__()
        self.spatial = len(feature_shape) == 3
        self.embed = nn.Conv2d(feature_shape[0], 8, 1) if self.spatial else nn.Linear(feature_shape[0], 8)
        self.net = nn.Sequential(
            nn.Conv2d(image_shape[0] + 8, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, padding=1))

    def forward(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        if self.spatial:
            f = F.interpolate(self.embed(features), size=size, mode="nearest")
        else:
            f = self.embed(features)[:, :, None, None].expand(-1, -1, *size)
        return self.net(torch.cat([images, f], 1)).flatten(1)


@IMAGE_ATTACKS.register("cgan")
class ConditionalGANAttack(ImageAttack):
    """Args: epochs: passes over the auxiliary pairs; l1: weight of the L1 term (pix2pix uses 100)."""

    name = "cgan"
    threat_model = ThreatModel(observes="uplink", queries_edge=True, auxiliary_data=True,
                               description="black box: (image, features) pairs from querying the edge with auxiliary "
                                           "images; generator G(features) trained adversarially plus L1")

    def __init__(self, target, *, epochs: int = 2, l1: float = 100.0, width: int = 32, batch_size: int = 64,
                 seed: int = 0, quiet: bool = True):
        super().__init__(target, seed=seed, quiet=quiet)
        self.epochs, self.l1, self.width, self.batch_size = epochs, l1, width, batch_size
        self.generator = None

    def fit(self, observed: torch.Tensor | None = None) -> "ConditionalGANAttack":
        from splitveil.train.classifier import progress

        images = self.target.aux.images
        features = self.target.query(images)
        torch.manual_seed(self.seed)
        gen = Decoder(self.target.feature_shape, self.target.image_shape, width=self.width)
        disc = PairDiscriminator(self.target.image_shape, self.target.feature_shape, width=self.width)
        opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
        bce = nn.BCEWithLogitsLoss()
        rng = torch.Generator().manual_seed(self.seed)
        steps = (len(images) + self.batch_size - 1) // self.batch_size
        gen.train(), disc.train()
        for epoch in range(self.epochs):
            order = torch.randperm(len(images), generator=rng)
            for step in progress(range(steps), total=steps, desc=f"c-GAN {epoch + 1}/{self.epochs}", quiet=self.quiet):
                batch = order[step * self.batch_size:(step + 1) * self.batch_size]
                real, cond = images[batch], features[batch]
                fake = gen(cond)
                # discriminator: real pairs -> 1, generated pairs -> 0
                real_logits, fake_logits = disc(real, cond), disc(fake.detach(), cond)
                loss_d = 0.5 * (bce(real_logits, torch.ones_like(real_logits)) + bce(fake_logits, torch.zeros_like(fake_logits)))
                opt_d.zero_grad()
                loss_d.backward()
                opt_d.step()
                # generator: fool the discriminator and stay close (L1) to the true image
                fooled = disc(fake, cond)
                loss_g = bce(fooled, torch.ones_like(fooled)) + self.l1 * F.l1_loss(fake, real)
                opt_g.zero_grad()
                loss_g.backward()
                opt_g.step()
        self.generator = gen.eval()
        return self

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        if self.generator is None:
            self.fit()
        return decode(self.generator, features)
