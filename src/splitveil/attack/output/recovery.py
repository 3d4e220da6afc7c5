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
        epochs: passes over the auxiliary set, each with freshly drawn salts.
        lr: Adam learning rate.
    """

    name = "recovery"
    threat_model = ThreatModel(observes="uplink", knows_head_weights=True, knows_cloud_weights=True,
                               auxiliary_data=True, knows_defence=True,
                               description="knows the public salted model, salts auxiliary data itself with salts it "
                                           "draws, trains a reader of the salt and of the class on the cut features, "
                                           "and decodes its own output with the salt that agrees best")

    def __init__(self, target, *, epochs: int = 4, lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
                 quiet: bool = True):
        super().__init__(target, seed=seed, quiet=quiet)
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size
        caps = self.target
        self.reader = FeatureReader(caps.feature_shape, caps.salt_values, caps.num_classes)

    @torch.no_grad()
    def _features(self, images: torch.Tensor, salts: torch.Tensor) -> torch.Tensor:
        edge = self.target.edge
        return torch.cat([edge((images[i:i + 256], salts[i:i + 256])) for i in range(0, len(images), 256)])

    def fit(self) -> "SaltRecovery":
        from splitveil.train.classifier import progress

        caps = self.target
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        held_out = max(1, len(caps.aux) // 10)  # to choose how to guess (below), never trained on
        images, labels = caps.aux.images[:-held_out], caps.aux.labels[:-held_out]
        optimiser = torch.optim.Adam(self.reader.parameters(), lr=self.lr)
        steps = math.ceil(len(images) / self.batch_size)
        for epoch in range(self.epochs):
            salts = torch.randint(caps.salt_values, (len(images),), generator=generator)
            features = self._features(images, salts)  # the cloud's view of its own salted data
            order = torch.randperm(len(images), generator=generator)
            self.reader.train()
            for step in progress(range(steps), total=steps, desc=f"salt reader {epoch + 1}/{self.epochs}", quiet=self.quiet):
                batch = order[step * self.batch_size:(step + 1) * self.batch_size]
                salt_logits, class_logits = self.reader(features[batch])
                loss = nn.functional.cross_entropy(salt_logits, salts[batch]) + \
                    nn.functional.cross_entropy(class_logits, labels[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        self.reader.eval()
        # the combined guess trusts the cloud's own answer; where the salted model is often wrong that hurts, so
        # keep whichever rule recovers more salts of the attacker's held-out images (salted by itself)
        salts = torch.randint(caps.salt_values, (held_out,), generator=generator)
        features = self._features(caps.aux.images[-held_out:], salts)
        combined = float((self._combined(features) == salts).float().mean())
        head = float((self.salt_head_guess(features) == salts).float().mean())
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
