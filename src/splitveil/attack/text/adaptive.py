"""Adaptive attackers: each knows a defence's mechanism and public parameters, never its secret.

- noise: the attacker knows the scale, so it widens the exact attack's tolerance to the noise it expects and trains
  the learned readout on states it noises itself;
- permute: it matches the permuted trunk the cloud must hold against the public weights (`recover_permutation`);
- randcut: the cloud is told the depth (it must run the right layers); an eavesdropper who is not told tries every
  depth and keeps the one at which a token's state matches (`identify_cut_depth`);
- slip: the cloud receives layer A's linear inputs (the normed states) in fixed point under fresh uniform one-time
  masks; the attacker compares its candidates in that space (`first_linear_input`), trains its readout on views it
  masks itself (`slip_mask_augmenter`), and stops the exact search after its first round where the norm layer's
  public weights prove that no token can match (`norm_output_bound`).
"""

from __future__ import annotations

import torch

from splitveil.attack.text.attacks import ExactInversion, wire_tolerance
from splitveil.attack.text.target import TextTarget
from splitveil.core.errors import ConfigError


def noise_tolerance(strength: float, wire: str = "fp32") -> float:
    """Relative distance the exact attack accepts under Gaussian noise of `strength` x the state's RMS.

    In H dimensions the noise norm concentrates at strength x ||clean state|| = strength / sqrt(1 + strength^2) x
    ||observed||; accept up to 10% above that, plus the wire's own rounding.
    """
    return wire_tolerance(wire) + 1.1 * strength / (1 + strength**2) ** 0.5


def noise_augmenter(strength: float, *, seed: int = 0):
    """The attacker's own copy of the noise defence (same mechanism and scale, its own key): states -> noisy."""
    from splitveil.protect.cut import GaussianNoise

    return GaussianNoise(strength, key=seed.to_bytes(32, "little")).apply


def identify_cut_depth(splittable, observed: torch.Tensor, depths, *, positions: int = 2, candidates: int = 256,
                       max_verified: int | None = 8192) -> tuple[int, dict[int, float]]:
    """Which head depth produced `observed` [T, H]: invert the first `positions` at every candidate depth.

    At the true depth the recovered tokens reproduce the observed states (relative residual ~0); at a wrong depth
    no token does. Returns the depth with the smallest residual and every depth's residual.
    """
    target = observed[:positions].float()
    residuals: dict[int, float] = {}
    for depth in depths:
        attack = ExactInversion(TextTarget(splittable, splittable.boundary(depth)), candidates=candidates,
                                max_verified=max_verified)
        tokens = attack.reconstruct(target)
        head = attack.head  # the attacker's own copy of the public head at this depth
        head.reset()
        with torch.inference_mode():
            states = head(torch.tensor([tokens]))[0].float()
        residuals[depth] = float((states - target).norm() / target.norm())
    return min(residuals, key=residuals.get), residuals


class Adaptation:
    """What an attacker who knows a defence's mechanism and scale (never its secret) does differently.

    The base class is the attacker against an undefended split (or a defence at strength 0): it changes nothing.
    """

    def __init__(self, strength: float = 0.0, wire: str = "fp32"):
        self.strength, self.wire = strength, wire

    def attack_options(self, attack: str, target: TextTarget | None = None) -> dict:
        """Extra keyword arguments for the attack named `attack` (`exact`, or `learned` also when it is a ranker)
        against `target` (the public model and cuts; adaptations that model a defence with public weights read
        them there)."""
        return {}

    def bind(self, deployment) -> None:
        """Reads what the attacker knows of the deployment's mechanism (a public choice, never a secret) once it is
        built: e.g. whether SLIP's dealt device sends fused groups."""

    def session(self, lm, defence, depth: int):
        """One session as the cloud holds it -> (undo: states -> public basis, secret recovered: bool | None)."""
        return (lambda states: states), None

    def probe(self, lm, uplink: torch.Tensor, head_depth: int) -> dict | None:
        """An extra measurement on one session's uplink (e.g. a blind search for a secret); None when there is none."""
        return None

    def secret_recovered(self, probe: dict | None, depth: int) -> bool | None:
        """Whether `probe` (this session's) found the session's secret, given the true head `depth`; None when the
        probe measures no secret."""
        return None


class NoiseAdaptation(Adaptation):
    def attack_options(self, attack: str, target: TextTarget | None = None) -> dict:
        if self.strength <= 0:
            return {}
        if attack == "exact":
            return {"tolerance": noise_tolerance(self.strength, self.wire)}
        return {"augment": noise_augmenter(self.strength)} if attack == "learned" else {}


class PermutationAdaptation(Adaptation):
    def session(self, lm, defence, depth: int):
        if self.strength <= 0:
            return super().session(lm, defence, depth)
        from splitveil.protect.cut import recover_permutation

        cloud = next(iter(lm.service.parts.values()))  # the permuted trunk the cloud must hold
        guess = recover_permutation(lm.splittable.layers[depth], cloud.owner.layers[depth])
        inverse = torch.argsort(guess)
        return (lambda states: states[..., inverse]), bool(torch.equal(guess, defence.permutation))


class RandomisedCutAdaptation(Adaptation):
    """The cloud is told the depth (it must run the right layers); whether the secret is recovered is measured by
    an attacker who is not told it: the blind depth search of each session, compared with that session's depth."""

    def probe(self, lm, uplink: torch.Tensor, head_depth: int) -> dict | None:
        """An eavesdropper who is not told the depth tries every one it could be."""
        if self.strength <= 0:
            return None
        candidates = range(head_depth, head_depth + int(self.strength) + 1)
        found, residuals = identify_cut_depth(lm.splittable, uplink, candidates)
        return {"identified_depth": found, "residuals": residuals}

    def secret_recovered(self, probe: dict | None, depth: int) -> bool | None:
        return None if probe is None else probe["identified_depth"] == depth


def first_linear_input(target: TextTarget):
    """The public map from the head's output (the residual stream after the cut) to what the first linear layer
    after the cut reads: that layer's input norm (the first norm registered in the decoder layer: `input_layernorm`
    in Llama-style families, `ln_1` in GPT-2). A private copy; the weights are public."""
    import copy

    splittable = target.splittable
    layer = splittable.layers[target.head_end - splittable.boundary(0)]
    norm = next((module for name, module in layer.named_children() if "norm" in name.lower() or name.startswith("ln")), None)
    if norm is None:
        raise ConfigError(f"no input norm found in {type(layer).__name__}: cannot model what its linear layers read")
    return copy.deepcopy(norm).requires_grad_(False)


def slip_mask_augmenter(normalise, *, frac_bits: int = 16, seed: int = 0):
    """The attacker's own copy of SLIP's masking of the first offloaded layer's input: states [N, H] -> normed,
    encoded in fixed point at 2^frac_bits, plus uniform masks over Z_2^64 (its own generator), read back as the
    view is read (x 2^-frac_bits): what the cloud receives for those states."""
    generator = torch.Generator().manual_seed(seed)
    low, high = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max

    def augment(states: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            encoded = torch.round(normalise(states).double() * 2.0**frac_bits).to(torch.int64)
            masks = torch.randint(low, high, encoded.shape, generator=generator, dtype=torch.int64)
            return ((encoded + masks).double() * 2.0**-frac_bits).float()  # the ring sum wraps, as on the wire

    return augment


def norm_output_bound(norm) -> float | None:
    """An upper bound on ||norm(h)|| over every h, from the norm layer's public weights: RMSNorm gives w * h / rms(h)
    with ||h / rms(h)|| <= sqrt(H), so ||.|| <= max|w| sqrt(H) (Gemma's (1 + w) likewise); LayerNorm adds its bias.
    None for a norm layer this does not know (the exact attack then searches without the bound)."""
    weight = getattr(norm, "weight", None)
    if weight is None or weight.dim() != 1:
        return None
    kind = type(norm).__name__
    scale = weight.detach().double()
    if "Gemma" in kind:
        scale = 1.0 + scale
    elif not (kind.endswith("RMSNorm") or isinstance(norm, torch.nn.LayerNorm)):
        return None
    bound = float(scale.abs().max()) * weight.numel() ** 0.5
    bias = getattr(norm, "bias", None)
    return bound + (float(bias.detach().double().norm()) if bias is not None else 0.0)


def residual_stream_bound(target: TextTarget) -> float:
    """An upper bound on ||h|| for the residual stream h at the head's cut of a Llama-family model, over every input,
    from public weights only: the longest embedding row, plus per layer before the cut what its attention and MLP
    can add. A normed input g * x / rms(x) has norm <= c = max|g| sqrt(H); key-value head j's value rows then <=
    ||W_v^j||_2 c, each query head's output (a convex combination of its key-value head's rows) as much, so the
    heads' concatenation <= c sqrt(group sum_j ||W_v^j||^2), and W_o's output <= ||W_o||_2 times that; the MLP's
    silu(W_g x) * (W_u x) <= ||W_g x|| ||W_u x|| (|silu(z)| <= |z|). Loose, but a masked row read as activations is
    some 1e15 long, far beyond it."""
    splittable = target.splittable
    model = splittable.model
    config = model.config
    hidden = config.hidden_size
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    group = config.num_attention_heads // kv_heads
    spectral = lambda weight: float(torch.linalg.matrix_norm(weight.detach().double(), ord=2))  # noqa: E731
    bound = float(model.get_input_embeddings().weight.detach().double().norm(dim=1).max())
    for index in range(target.head_end - splittable.boundary(0)):
        layer = splittable.layers[index]
        attention, mlp = layer.self_attn, layer.mlp
        normed = float(layer.input_layernorm.weight.detach().abs().max()) * hidden**0.5
        values = sum(spectral(block) ** 2 for block in attention.v_proj.weight.chunk(kv_heads))  # per key-value head
        bound += spectral(attention.o_proj.weight) * normed * (group * values) ** 0.5
        normed = float(layer.post_attention_layernorm.weight.detach().abs().max()) * hidden**0.5
        bound += spectral(mlp.down_proj.weight) * spectral(mlp.gate_proj.weight) * normed * spectral(mlp.up_proj.weight) * normed
    return bound


class SlipAdaptation(Adaptation):
    """SLIP's prompt deployment (strength = the secure rank k): nothing to undo and no secret the cloud can recover
    (the masks never leave the device); the attacker models what crosses (fixed point, masked): the first linear
    layer's normed input, or with fused groups (`protect/slip/fused.py`) the residual stream itself, before the norm,
    whose length it bounds from the public weights (`residual_stream_bound`) so that its exact search stops where
    no token can match."""

    fused = False

    def bind(self, deployment) -> None:
        self.fused = bool(getattr(deployment, "fused", False))

    def attack_options(self, attack: str, target: TextTarget | None = None) -> dict:
        if target is None:
            raise ConfigError("the adaptive attacker against slip needs the target (the public model and cuts)")
        if self.fused:
            if attack == "exact":
                return {"output_bound": residual_stream_bound(target)}
            return {"augment": slip_mask_augmenter(lambda states: states)} if attack == "learned" else {}
        normalise = first_linear_input(target)
        if attack == "exact":
            return {"transform": normalise, "output_bound": norm_output_bound(normalise)}
        return {"augment": slip_mask_augmenter(normalise)} if attack == "learned" else {}


class EnclaveAdaptation(Adaptation):
    """The enclave deployment: the operator relays ciphertext. The attacker reads it as float32 rows (the deployment's
    view) and searches each row within a budget of 4,096 verified candidates per position (the demo's budget): the
    same attack on the head's clear output (the record's control) recovers every prompt token within it (1.000 on
    SmolLM2 at --split 2,28, 3 prompts), so the budget does not limit the attack where there is something to find;
    AES-GCM output gives nothing to rank."""

    BUDGET = 4096

    def attack_options(self, attack: str, target: TextTarget | None = None) -> dict:
        return {"max_verified": self.BUDGET} if attack == "exact" else {}


#: the adaptive attacker of each text deployment class (a subclass inherits its base's unless it has its own)
ADAPTATIONS: dict[type, type[Adaptation]] = {}


def adapts(deployment: str):
    """Registers an `Adaptation` class as the attacker of the text deployment named `deployment`."""
    from splitveil.protect.text import deployment_for

    def register(cls: type[Adaptation]) -> type[Adaptation]:
        key = deployment_for(deployment)
        if key in ADAPTATIONS:
            raise ValueError(f"the text deployment {deployment!r} has an adaptive attacker already")
        ADAPTATIONS[key] = cls
        return cls

    return register


for _name, _adaptation in (("none", Adaptation), ("noise", NoiseAdaptation), ("permute", PermutationAdaptation),
                           ("randcut", RandomisedCutAdaptation), ("slip", SlipAdaptation),
                           ("slip-dealer", SlipAdaptation), ("enclave", EnclaveAdaptation)):
    adapts(_name)(_adaptation)


def adaptation_for(defence: str | None, strength: float = 0.0, wire: str = "fp32") -> Adaptation:
    """The adaptive attacker against the text deployment `defence` (a registered name, or None for no protection)
    on `wire`: the one registered for its class, or for the nearest base class that has one."""
    from splitveil.protect.text import deployment_for

    for cls in deployment_for(defence).__mro__:
        if cls in ADAPTATIONS:
            return ADAPTATIONS[cls](strength, wire)
    raise ConfigError(f"no adaptive attacker is registered for the text protection {defence!r}")
