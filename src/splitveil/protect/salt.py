"""Salted DNNs (output privacy): a secret per-request salt changes what the cloud's output means.

The client draws a salt `s` for each request and feeds it into a *salt layer* inside its own part of the network;
the model is trained to answer with the class `table[s, y]` instead of `y` (the cyclic shift `(y + s) mod C` of the
paper, or a keyed permutation of the classes). The cloud computes the salted logits and cannot tell which class they
mean without `s`; the client decodes them with `decode_logits` (`(argmax - s) mod C` for the shift).

The salt layer is inserted after any block of a `SequentialSplittable` (position `L` = after `L` blocks, 0 = the
input); the spatial size of the activation there is derived by running a dummy input, never hard-coded:

- ``conv``: the salt as a one-hot [B, S, 1, 1] expanded by a transposed convolution to `salt_channels` maps of the
  activation's size, concatenated to the activation as channels (the paper's "cnn" salt, with a one-hot instead of a
  scalar so that each salt gets its own maps rather than `s * W + b`);
- ``fc``: the paper's noisy vector salt (`mu = roll(1..C, s+1)`, `mu[s] += 4C`, `/ 2C`, std `1 / 2C`), through a
  linear layer, concatenated (broadcast over space for a feature map).

A 1x1 convolution (a linear layer for vectors) then maps the concatenation back to the activation's width, so that
the next block runs unchanged: that equals widening the next layer's input as the paper does (both add a learned
salt-dependent term to what the next layer sees) and works after any block, residual ones included. The salt layer
is folded into the block that follows it, so the model keeps its block count (cut numbers mean the same as for the
standard model) and every cut that keeps the salt on the device is `cut >= L + 1`.

Which salt a request uses comes from the client's key: `SaltKey` derives it with HKDF (as the cut defences derive
their session secrets), so the salt is never sent and never stored on the server.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from splitveil.core.errors import ConfigError
from splitveil.models.sequential import SequentialSplittable


class SaltKind(str, Enum):
    CONV = "conv"  # one-hot salt -> transposed conv -> channels
    FC = "fc"  # the paper's noisy vector salt -> linear -> features
    PERM = "perm"  # keyed class permutations (from a public family of `values` permutations), conv salt path


@dataclass(frozen=True)
class SaltConfig:
    kind: SaltKind = SaltKind.CONV
    position: int = 1  # the salt layer sits after this many blocks (0 = at the input)
    values: int | None = None  # how many salts there are (None: the number of classes; perm: 4 x classes)
    channels: int = 8  # salt channels (conv) or features (fc) concatenated to the activation
    table_seed: int = 0  # seed of the public permutation family (perm)

    def __post_init__(self):
        object.__setattr__(self, "kind", SaltKind(self.kind))

    def num_values(self, num_classes: int) -> int:
        if self.values is not None:
            return self.values
        return 4 * num_classes if self.kind == SaltKind.PERM else num_classes

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "position": self.position, "values": self.values,
                "channels": self.channels, "table_seed": self.table_seed}


def parse_salt_defence(text: str) -> SaltKind:
    """`salt` | `salt:conv` | `salt:fc` | `salt:perm` -> the salt kind; ConfigError otherwise."""
    name, _, kind = text.partition(":")
    if name != "salt":
        raise ConfigError(f"unknown --defence {text!r}; output attacks know salt, salt:conv, salt:fc and salt:perm")
    try:
        return SaltKind(kind or "conv")
    except ValueError:
        raise ConfigError(f"unknown salt kind {kind!r}; use conv, fc or perm") from None


# -- pure label maps ------------------------------------------------------------------------------------------------

def shift_table(values: int, num_classes: int) -> torch.Tensor:
    """[values, C] int64: row s maps class y to (y + s) mod C (the paper's cyclic shift)."""
    return (torch.arange(num_classes)[None, :] + torch.arange(values)[:, None]) % num_classes


def permutation_table(values: int, num_classes: int, *, seed: int = 0) -> torch.Tensor:
    """[values, C] int64: `values` distinct class permutations, a public family fixed by `seed` (the salt, not the
    family, is the secret)."""
    generator = torch.Generator().manual_seed(seed)
    rows, seen = [], set()
    limit = 1
    for k in range(2, num_classes + 1):
        limit *= k
    if values > limit:
        raise ConfigError(f"{num_classes} classes have only {limit} permutations; asked for {values}")
    rows.append(torch.arange(num_classes))
    seen.add(tuple(rows[0].tolist()))
    while len(rows) < values:
        row = torch.randperm(num_classes, generator=generator)
        if tuple(row.tolist()) not in seen:
            seen.add(tuple(row.tolist()))
            rows.append(row)
    return torch.stack(rows)


def salt_labels(labels: torch.Tensor, salts: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Training targets: the class each (label, salt) pair must answer with, `table[s, y]`."""
    return table[salts, labels]


def decode_logits(logits: torch.Tensor, salts: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Salted logits [N, C] -> logits in the true class order: out[n, y] = logits[n, table[s_n, y]]."""
    return torch.gather(logits, 1, table[salts])


def decode_labels(logits: torch.Tensor, salts: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The client's answer: the true class of each salted output (shift: (argmax - s) mod C)."""
    return decode_logits(logits, salts, table).argmax(-1)


def noisy_vector_salt(salts: torch.Tensor, values: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's fc salt: N(mu_s, (1 / 2S)^2) with mu_s = roll(1..S, s+1), mu_s[s] += 4S, divided by 2S. [N, S]."""
    noise = torch.randn(len(salts), values, generator=generator) / (2 * values)
    return _vector_means(salts, values) + noise


# -- the salt layer and the salted model ----------------------------------------------------------------------------

class SaltLayer(nn.Module):
    """(activation, salts) -> the activation with the salt mixed in, same shape.

    Args:
        activation_shape: the activation's shape per example, (C, H, W), (C, T) for a series, or (F,).
        values: how many salts exist.
        kind: conv or fc (perm uses the conv path).
        channels: salt channels (conv) or features (fc) concatenated before the projection.
    """

    def __init__(self, activation_shape: tuple[int, ...], values: int, *, kind: SaltKind, channels: int = 8):
        super().__init__()
        self.activation_shape, self.values, self.kind = tuple(activation_shape), values, SaltKind(kind)
        width, spatial = activation_shape[0], tuple(activation_shape[1:])
        self.spatial = spatial
        if len(spatial) > 2:
            raise ConfigError(f"a salt layer takes vectors, series or images, not activations of shape {activation_shape}")
        if self.kind == SaltKind.FC or not spatial:
            self.embed = nn.Linear(values, channels)  # [B, S] -> [B, channels]
        elif len(spatial) == 1:  # a series: [B, S, 1] -> [B, ch, T]
            self.embed = nn.ConvTranspose1d(values, channels, kernel_size=spatial)
        else:
            self.embed = nn.ConvTranspose2d(values, channels, kernel_size=spatial)  # [B, S, 1, 1] -> [B, ch, H, W]
        # salt maps of unit scale, like the (normalised) activations they join: the default initialisation of a
        # transposed convolution scales by its H x W fan-in and starts the salt near zero, which slows training down
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.zeros_(self.embed.bias)
        if len(spatial) == 1:
            self.project = nn.Conv1d(width + channels, width, 1)
        elif spatial:
            self.project = nn.Conv2d(width + channels, width, 1)
        else:
            self.project = nn.Linear(width + channels, width)

    def salt_input(self, salts: torch.Tensor) -> torch.Tensor:
        """What enters the salt path: a one-hot, or the noisy vector (fc; noise only while training)."""
        if self.kind == SaltKind.FC:
            return noisy_vector_salt(salts, self.values) if self.training else _vector_means(salts, self.values)
        return nn.functional.one_hot(salts, self.values).float()

    def salt_map(self, salts: torch.Tensor) -> torch.Tensor:
        """The salt's representation, shaped to concatenate: [B, ch, H, W], [B, ch, T] or [B, ch]."""
        code = self.salt_input(salts)  # [B, S]
        if isinstance(self.embed, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
            return self.embed(code.reshape(*code.shape, *(1,) * len(self.spatial)))
        out = self.embed(code)  # [B, ch], broadcast over the positions of a series or an image
        return out.reshape(*out.shape, *(1,) * len(self.spatial)).expand(-1, -1, *self.spatial)

    def forward(self, x: torch.Tensor, salts: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([x, self.salt_map(salts)], dim=1))


def _vector_means(salts: torch.Tensor, values: int) -> torch.Tensor:
    """The fc salt's mean vectors (what inference feeds: the noise is a training regulariser)."""
    base = torch.arange(1, values + 1, dtype=torch.float32)
    means = torch.stack([torch.roll(base, s + 1) for s in range(values)])
    means[torch.arange(values), torch.arange(values)] += 4 * values
    return (means / (2 * values))[salts]


class CarrySalt(nn.Module):
    """A block before the salt layer: (x, salts) -> (block(x), salts)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, carried):
        x, salts = carried
        return self.block(x), salts


class SaltedBlock(nn.Module):
    """The salt layer folded into the block after it: (x, salts) -> block(salt_layer(x, salts))."""

    def __init__(self, salt: SaltLayer, block: nn.Module):
        super().__init__()
        self.salt, self.block = salt, block

    def forward(self, carried):
        x, salts = carried
        return self.block(self.salt(x, salts))


class SaltedSplittable(SequentialSplittable):
    """A classifier with a salt layer: `model(x, salts)` gives salted logits; parts split it like the standard model.

    The first part takes the pair `(images, salts)`; every later part takes and returns plain tensors. `table` [S, C]
    maps (salt, class) to the answer the model gives.
    """

    def __init__(self, *, blocks, epilogue, table: torch.Tensor, config: SaltConfig, input_shape: tuple[int, ...],
                 name: str):
        super().__init__(blocks=blocks, epilogue=epilogue, name=name)
        self.register_buffer("table", table.clone())
        self.salt_config = config
        self.input_shape = tuple(input_shape)  # one example's shape, e.g. (1, 28, 28)

    @property
    def values(self) -> int:
        return self.table.shape[0]

    @property
    def num_classes(self) -> int:
        return self.table.shape[1]

    def forward(self, x: torch.Tensor, salts: torch.Tensor | None = None) -> torch.Tensor:
        if salts is None:  # a pair, as the first part receives it
            x, salts = x
        return self.run((x, salts), 0, len(self.segments))

    def check_cut(self, cut: int) -> None:
        """The salt layer must stay on the device: cut >= position + 1."""
        if cut < self.salt_config.position + 1:
            raise ConfigError(f"the salt layer sits after block {self.salt_config.position}, so it runs in block "
                              f"{self.salt_config.position + 1}: the cut must be at least {self.salt_config.position + 1} "
                              f"(got {cut}) for the client to keep the salt")


def salt_model(model: SequentialSplittable, config: SaltConfig, *, input_shape: tuple[int, ...],
               num_classes: int) -> SaltedSplittable:
    """A salted copy of `model`'s architecture (its modules are reused, so pass a freshly built model).

    Args:
        model: a SequentialSplittable without prologue (our vision models).
        config: where and how to salt.
        input_shape: one example's shape, e.g. (1, 28, 28): the salt layer's size is derived from it.
        num_classes: C.
    """
    if model.num_prologue:
        raise ConfigError("salting needs a model without a prologue")
    blocks = list(model.segments[:model.num_blocks])
    epilogue = list(model.segments[model.num_blocks:])
    if not 0 <= config.position < len(blocks):
        raise ConfigError(f"--salt-layer {config.position} is out of range: {model.name} has {len(blocks)} blocks, so the "
                          f"salt layer goes after 0 to {len(blocks) - 1} of them")
    values = config.num_values(num_classes)
    if values < 2:
        raise ConfigError(f"a salt needs at least 2 values, got {values}")
    if config.kind == SaltKind.PERM:
        table = permutation_table(values, num_classes, seed=config.table_seed)
    else:
        table = shift_table(values, num_classes)
    with torch.no_grad():
        x = torch.zeros(2, *input_shape)
        for block in blocks[:config.position]:
            x = block.eval()(x)
        for block in blocks:
            block.train()
    salt = SaltLayer(tuple(x.shape[1:]), values, kind=config.kind, channels=config.channels)
    wrapped = [CarrySalt(b) for b in blocks[:config.position]] + [SaltedBlock(salt, blocks[config.position])] + \
        blocks[config.position + 1:]
    return SaltedSplittable(blocks=wrapped, epilogue=epilogue, table=table, config=config, input_shape=input_shape,
                            name=f"{model.name}+salt:{config.kind.value}@{config.position}")


# -- salts from the client's key ------------------------------------------------------------------------------------

class SaltKey:
    """The client's secret: a 32-byte key from which each request's salt is derived (HKDF, per request number).

    The salt is uniform over the `values` salts up to a bias below 2^-50 (a 63-bit HKDF output reduced mod S).
    """

    def __init__(self, values: int, *, key: bytes | None = None):
        self.values = values
        self.key = key if key is not None else secrets.token_bytes(32)
        self.requests = 0

    def salt_for(self, request: int) -> int:
        from splitveil.protect.cut import hkdf_seed

        return hkdf_seed(self.key, b"salted-output/" + str(request).encode()) % self.values

    def draw(self, count: int = 1) -> torch.Tensor:
        """Salts for the next `count` requests (one per example), [count] int64."""
        salts = torch.tensor([self.salt_for(self.requests + i) for i in range(count)], dtype=torch.int64)
        self.requests += count
        return salts


# -- training -------------------------------------------------------------------------------------------------------

def train_salted(model: SaltedSplittable, images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 1,
                 batch_size: int = 64, lr: float = 2e-3, seed: int = 0, quiet: bool = True,
                 adversary=None, augment=None) -> SaltedSplittable:
    """Cross-entropy on `table[s, y]` with a fresh uniform salt per example and step; returns the model in eval mode.

    Args:
        adversary: a `salt_adversary.SaltAdversary`: its loss on the features at its cut is added (through a
            gradient reversal), so the client's blocks learn to hide the salt and the class from it.
        augment: `augment(batch, generator) -> batch`, applied to each training batch (None: the data as it is).
    """

    def loss_of(batch: torch.Tensor, salts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        targets = salt_labels(labels[batch], salts, model.table)
        inputs = images[batch] if augment is None else augment(images[batch], generator)
        if adversary is None:
            return nn.functional.cross_entropy(model(inputs, salts), targets)
        boundary = model.boundary(adversary.cut)
        features = model.run((inputs, salts), 0, boundary)
        return nn.functional.cross_entropy(model.run(features, boundary, len(model.segments)), targets) + \
            adversary.loss(features, salts, labels[batch])

    modules = [model] + ([adversary] if adversary is not None else [])
    _fine_tune(loss_of, modules, len(images), values=model.values, epochs=epochs, batch_size=batch_size, lr=lr,
               seed=seed, quiet=quiet, desc="train salted")
    return model.eval()


def train_standard_like_salted(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, values: int,
                               epochs: int = 1, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                               quiet: bool = True, augment=None) -> nn.Module:
    """The salted model's training recipe applied to a standard model, for a like-for-like comparison: the same
    optimiser, learning rate, cosine schedule, epochs, batches and augmentation draws as `train_salted` with the same
    arguments (the salts are drawn, so every random draw matches, and ignored: plain cross-entropy on `y`).

    Args:
        values: how many salts the salted model it is compared with has (only to draw the same random numbers).
    """

    def loss_of(batch: torch.Tensor, salts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        inputs = images[batch] if augment is None else augment(images[batch], generator)
        return nn.functional.cross_entropy(model(inputs), labels[batch])

    _fine_tune(loss_of, [model], len(images), values=values, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
               quiet=quiet, desc="train standard")
    return model.eval()


def _fine_tune(loss_of, modules: list[nn.Module], count: int, *, values: int, epochs: int, batch_size: int, lr: float,
               seed: int, quiet: bool, desc: str) -> None:
    """The salted recipe: Adam over `modules`, cosine decay to zero over the whole run, `epochs` shuffled passes over
    `count` examples, a uniform salt in [0, values) drawn per example and step; `loss_of(batch, salts, generator)`."""
    from splitveil.train.classifier import progress

    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam([p for module in modules for p in module.parameters()], lr=lr)
    for module in modules:
        module.train()
    steps = (count + batch_size - 1) // batch_size
    # cosine decay to zero over the whole run: a short run ends much closer to its optimum than at a constant rate
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, epochs * steps) / (epochs * steps))))
    for epoch in range(epochs):
        order = torch.randperm(count, generator=generator)
        for step in progress(range(steps), total=steps, desc=f"{desc} {epoch + 1}/{epochs}", quiet=quiet):
            batch = order[step * batch_size:(step + 1) * batch_size]
            salts = torch.randint(values, (len(batch),), generator=generator)
            loss = loss_of(batch, salts, generator)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()


@torch.no_grad()
def predict_salted(model, images: torch.Tensor, salts: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Salted logits [N, C] of `model` (or of a chain of parts taking the pair) in batches."""
    return torch.cat([model((images[i:i + batch_size], salts[i:i + batch_size]))
                      for i in range(0, len(images), batch_size)])


def _register_deployment() -> None:
    from splitveil.plan.plan import Placement
    from splitveil.protect.deployment import DEPLOYMENTS, Deployment, device, honest_cloud

    @DEPLOYMENTS.register
    class SaltDeployment(Deployment):
        """Salted DNNs (`splitveil serve --defence salt`, `protect/salt_client.py`): described here."""

        name = "salt"
        modality = "output"
        summary = ("Salted DNNs: a secret per-request salt enters a salt layer on the device, and the model answers "
                   "with the class table[s, y], which only the device can decode")
        protects = "the classifier's output (which class the answer means)"
        placement = (Placement.EDGE, Placement.CLOUD)
        parties = (device("the input, the salt key (HKDF per request), the salt layer and the edge blocks, the decoding "
                          "table"),
                   honest_cloud("the cloud part of the salted model and the salted logits it computes; knows the "
                                "public model and the salt mechanism, never a salt"))
        assumptions = ("the salt key never leaves the device", "the cloud may hold the edge's weights and labelled "
                       "data (the recovery attack) or nothing but the features (the clustering attack)")
        attacker = {"command": "splitveil attack output --defence salt",
                    "attacks": ["unsalted", "recovery", "cluster"],
                    "adaptation": "a reader trained on the edge's features to recover each request's salt; a "
                                  "minimal-knowledge cloud clustering the features into S groups"}


_register_deployment()
