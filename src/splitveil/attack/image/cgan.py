"""Conditional GAN inversion (pix2pix-style, as the TEE-partitioning paper and Origami use to pick the cut): a U-Net
generator (pix2pix's skip connections) maps features to an image; a discriminator judges (image, features) pairs;
the generator minimises the adversarial loss plus lambda times the L1 distance to the true image. Pairs come from
querying the edge."""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from splitveil.attack.base import ThreatModel
from splitveil.attack.image.base import IMAGE_ATTACKS, Decoder, ImageAttack, decode
from splitveil.attack.training import (StopRule, holdout_split, mean_over_batches, shuffled_batches,
                                       train_until_plateau)


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


class UNetGenerator(nn.Module):
    """G(features) -> image with pix2pix's skip connections (Isola et al. 2017, "U-Net"): an encoder halves the
    feature map's resolution `depth` times (stride-2 convs, LeakyReLU), a decoder doubles it back (4x4 transposed
    convs, ReLU) and concatenates the encoder's map of the same resolution at every level, so fine detail skips the
    bottleneck; then `Decoder`'s up-sampling path takes the result to the image size. Vector features have no
    resolution to skip across: `Decoder` alone.
    """

    def __init__(self, feature_shape: tuple[int, ...], image_shape: tuple[int, int, int], *, width: int = 32,
                 depth: int = 2):
        super().__init__()
        self.spatial = len(feature_shape) == 3
        if not self.spatial:
            self.to_image = Decoder(feature_shape, image_shape, width=width)
            self.down, self.up = nn.ModuleList(), nn.ModuleList()
            return
        size = feature_shape[1]
        base = min(256, width * 2 ** max(0, math.ceil(math.log2(image_shape[1] / size - 1e-9))))
        self.stem = nn.Sequential(nn.Conv2d(feature_shape[0], base, 3, padding=1), nn.BatchNorm2d(base), nn.LeakyReLU(0.2))
        channels, sizes = [base], [size]
        self.down = nn.ModuleList()
        while len(self.down) < depth and sizes[-1] >= 4:  # each level halves the resolution (ceil)
            out = min(256, 2 * channels[-1])
            self.down.append(nn.Sequential(nn.Conv2d(channels[-1], out, 3, stride=2, padding=1), nn.BatchNorm2d(out),
                                           nn.LeakyReLU(0.2)))
            channels.append(out)
            sizes.append(math.ceil(sizes[-1] / 2))
        self.up = nn.ModuleList()
        for level in range(len(self.down), 0, -1):  # from the bottleneck back to the feature resolution
            inner = channels[level] if level == len(self.down) else 2 * channels[level]  # deeper levels carry a skip
            self.up.append(nn.Sequential(nn.ConvTranspose2d(inner, channels[level - 1], 4, stride=2, padding=1),
                                         nn.BatchNorm2d(channels[level - 1]), nn.ReLU()))
        merged = 2 * base if self.down else base
        self.to_image = Decoder((merged, size, size), image_shape, width=width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.spatial:
            return self.to_image(features)
        skips = [self.stem(features)]
        for down in self.down:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.up:
            skip = skips.pop()
            x = up(x)
            if x.shape[-2:] != skip.shape[-2:]:  # an odd size halved with ceil comes back one larger
                x = x[..., :skip.shape[-2], :skip.shape[-1]]
            x = torch.cat([x, skip], 1)
        return self.to_image(x)


@IMAGE_ATTACKS.register("cgan")
class ConditionalGANAttack(ImageAttack):
    """Args: stop: when training stops (the generator's L1 distance on held-out auxiliary pairs plateaus, or the
    cap); l1: weight of the L1 term (pix2pix uses 100); width: the networks' channels at full resolution."""

    name = "cgan"
    threat_model = ThreatModel(observes="uplink", queries_edge=True, auxiliary_data=True,
                               description="black box: (image, features) pairs from querying the edge with auxiliary "
                                           "images; U-Net generator G(features) trained adversarially plus L1")

    def __init__(self, target, *, stop: StopRule = StopRule(), l1: float = 100.0, width: int = 32,
                 batch_size: int = 64, seed: int = 0, quiet: bool = True):
        super().__init__(target, seed=seed, quiet=quiet)
        self.stop, self.l1, self.width, self.batch_size = stop, l1, width, batch_size
        self.generator = None

    def fit(self, observed: torch.Tensor | None = None) -> "ConditionalGANAttack":
        images = self.target.aux.images
        features = self.target.query(images)
        torch.manual_seed(self.seed)
        gen = UNetGenerator(self.target.feature_shape, self.target.image_shape, width=self.width)
        disc = PairDiscriminator(self.target.image_shape, self.target.feature_shape, width=self.width)
        opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
        bce = nn.BCEWithLogitsLoss()
        rng = torch.Generator().manual_seed(self.seed)
        train, held = holdout_split(len(images), self.stop.holdout, seed=self.seed)

        def run_epoch(epoch: int) -> None:
            for batch in shuffled_batches(len(train), self.batch_size, rng):
                real, cond = images[train[batch]], features[train[batch]]
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

        def held_out_l1() -> float:  # the adversarial term has no plateau to judge; the distance to the truth has
            return mean_over_batches(lambda i: F.l1_loss(gen(features[held[i]]), images[held[i]]), len(held))

        self.phases = {"generator": train_until_plateau(run_epoch, held_out_l1, modules=[gen, disc],
                                                        optimisers=[opt_g, opt_d], rule=self.stop, desc="c-GAN",
                                                        quiet=self.quiet)}
        self.generator = gen.eval()
        return self

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        if self.generator is None:
            self.fit()
        return decode(self.generator, features)
