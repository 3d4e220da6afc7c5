"""`recovery`: the cloud learns to read the salt (and the true class) from the features it receives.

The salted model is public, so the cloud runs its own copy of the edge on auxiliary data of its own, salting each
image itself with a salt it draws, and trains a network on the resulting features with two heads: the salt and the
true class. For a request it then combines both heads with its own salted answer `y'` (argmax of its cloud part):
the salt guess maximises log p(s | z) + log p(y = table_s^-1(y') | z), i.e. the salt that makes the answer it
computed agree with the class the features look like; or, where that scores lower on held-out auxiliary images, the
salt head alone. The class head is a second, direct way to read the answer; `read_labels` gives it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from splitveil.attack.base import ThreatModel
from splitveil.attack.output.base import OUTPUT_ATTACKS, OutputAttack
from splitveil.attack.training import StopRule, holdout_split, mean_over_batches, shuffled_batches, train_until_plateau
from splitveil.protect.salt_adversary import reader_trunk


class FeatureReader(nn.Module):
    """Cut features -> (salt logits [N, S], class logits [N, C]): two convs and an MLP (an MLP for vectors)."""

    def __init__(self, feature_shape: tuple[int, ...], values: int, classes: int, *, width: int = 64):
        super().__init__()
        self.trunk = reader_trunk(feature_shape, width=width, convs=2, hidden_layers=2)
        self.salt_head, self.class_head = nn.Linear(256, values), nn.Linear(256, classes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.trunk(features)
        return self.salt_head(hidden), self.class_head(hidden)


@OUTPUT_ATTACKS.register("recovery")
class SaltRecovery(OutputAttack):
    """Args:
        stop: when the reader stops training: its loss (salt plus class cross-entropy) on held-out auxiliary
            images, each under every salt, plateaus, or the cap. Every epoch draws fresh salts for the training part.
        lr: Adam learning rate.
    """

    name = "recovery"
    threat_model = ThreatModel(observes="uplink", knows_head_weights=True, knows_cloud_weights=True,
                               auxiliary_data=True, knows_defence=True,
                               description="knows the public salted model, salts auxiliary data itself with salts it "
                                           "draws, trains a reader of the salt and of the class on the cut features, "
                                           "and decodes its own output with the salt that agrees best")

    def __init__(self, target, *, stop: StopRule = StopRule(), lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
                 quiet: bool = True):
        super().__init__(target, seed=seed, quiet=quiet)
        self.stop, self.lr, self.batch_size = stop, lr, batch_size
        caps = self.target
        self.reader = FeatureReader(caps.feature_shape, caps.salt_values, caps.num_classes)

    @torch.no_grad()
    def _features(self, images: torch.Tensor, salts: torch.Tensor) -> torch.Tensor:
        edge = self.target.edge
        return torch.cat([edge((images[i:i + 256], salts[i:i + 256])) for i in range(0, len(images), 256)])

    def fit(self) -> "SaltRecovery":
        caps = self.target
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        train, held = holdout_split(len(caps.aux), self.stop.holdout, seed=self.seed)
        images, labels = caps.aux.images[train], caps.aux.labels[train]
        # held out (never trained on): to judge the plateau and to choose how to guess (below); every image under
        # each salt in turn, repeated up to ~2,000 requests so that a small auxiliary set still gives a steady loss
        repeats = max(1, min(caps.salt_values, math.ceil(2000 / len(held))))
        held_images = caps.aux.images[held].repeat(repeats, *[1] * (caps.aux.images.dim() - 1))
        held_labels = caps.aux.labels[held].repeat(repeats)
        held_salts = torch.arange(len(held_images)) % caps.salt_values
        held_features = self._features(held_images, held_salts)
        optimiser = torch.optim.Adam(self.reader.parameters(), lr=self.lr)

        def loss_of(features, salts, labels) -> torch.Tensor:
            salt_logits, class_logits = self.reader(features)
            return nn.functional.cross_entropy(salt_logits, salts) + nn.functional.cross_entropy(class_logits, labels)

        def run_epoch(epoch: int) -> None:
            salts = torch.randint(caps.salt_values, (len(images),), generator=generator)
            features = self._features(images, salts)  # the cloud's view of its own salted data
            for batch in shuffled_batches(len(images), self.batch_size, generator):
                loss = loss_of(features[batch], salts[batch], labels[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()

        def held_out_loss() -> float:
            return mean_over_batches(lambda i: loss_of(held_features[i], held_salts[i], held_labels[i]), len(held_salts))

        self.phases = {"reader": train_until_plateau(run_epoch, held_out_loss, modules=[self.reader],
                                                     optimisers=[optimiser], rule=self.stop, desc="salt reader",
                                                     quiet=self.quiet)}
        # the combined guess trusts the cloud's own answer; where the salted model is often wrong that hurts, so
        # keep whichever rule recovers more salts of the attacker's held-out images (salted by itself)
        combined = float((self._combined(held_features) == held_salts).float().mean())
        head = float((self.salt_head_guess(held_features) == held_salts).float().mean())
        self.rule = "combined" if combined >= head else "salt head"
        return self

    @torch.no_grad()
    def _read(self, features: torch.Tensor):
        outs = [self.reader(features[i:i + 256]) for i in range(0, len(features), 256)]
        salt_logits = torch.cat([o[0] for o in outs])
        class_logits = torch.cat([o[1] for o in outs])
        answers = torch.cat([self.target.cloud(features[i:i + 256]) for i in range(0, len(features), 256)]).argmax(-1)
        return salt_logits.log_softmax(-1), class_logits.log_softmax(-1), answers

    def salt_head_guess(self, features: torch.Tensor) -> torch.Tensor:
        """The salt head alone: argmax p(s | z)."""
        return self._read(features)[0].argmax(-1)

    def read_labels(self, features: torch.Tensor) -> torch.Tensor:
        """The class head alone: the true class read straight from the features, no salt needed."""
        return self._read(features)[1].argmax(-1)

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        """The salt of each request, by the rule `fit` found best on held-out auxiliary data."""
        if getattr(self, "rule", "combined") == "salt head":
            return self.salt_head_guess(features)
        return self._combined(features)

    def _combined(self, features: torch.Tensor) -> torch.Tensor:
        salt_scores, class_scores, answers = self._read(features)  # [N, S], [N, C], [N]
        table = self.target.table  # [S, C]
        # for each salt s, the class whose salted answer is the one computed: inverse[s, y'] = y with table[s, y] = y'
        inverse = torch.argsort(table, dim=1)  # [S, C]
        implied = inverse[:, answers].T  # [N, S]: the class each salt would mean
        return (salt_scores + class_scores.gather(1, implied)).argmax(-1)
