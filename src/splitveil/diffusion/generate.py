"""Text-to-image generation with the cloud's share behind a transport: placements `none`, `reference`, `unet-split`.

- `none`: everything here (diffusers' UNet forward), the equivalence baseline.
- `reference` (Λ-Split's published placement): the device encodes the prompt, draws the initial latents and
  decodes the final ones; the cloud runs the UNet and the scheduler for every step, so it holds every latent.
  Crossing: the schedule, the prompt embeddings and the initial latents up, the final latents down.
- `unet-split`: the UNet itself is Λ-split every step. The head (`conv_in` + the first `a` down blocks) and the tail
  (the last `a` up blocks + `conv_out`) run here, the trunk in the cloud; the skip connections from head to tail,
  the latents and the scheduler stay here. Crossing: the schedule and the prompt embeddings once (the trunk's
  cross-attention reads them), then per step the head's output up and the trunk's output down.

Classifier-free guidance batches the unconditional and conditional rows through the cut together. Every tensor
that crosses is framed, encoded in the wire codec and counted by the transport (in-process loopback by default).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from splitveil.core.errors import ConfigError
from splitveil.diffusion.sampling import (DEFAULT_GUIDANCE, denoise_step, fresh_scheduler, initial_latents,
                                          prompt_context, to_uint8, unet_noise)
from splitveil.diffusion.unet_split import UNetCarry, UNetSplittable
from splitveil.diffusion.wire import check_wire, frame_codec, from_wire, to_wire, wire_shape
from splitveil.edge.remote import RemoteStage
from splitveil.wire.frame import Frame, FrameKind


class DiffusionPlacement(str, Enum):
    NONE = "none"
    REFERENCE = "reference"
    UNET_SPLIT = "unet-split"


def check_placement(name: str) -> DiffusionPlacement:
    try:
        return DiffusionPlacement(name)
    except ValueError:
        raise ConfigError(f"unknown --placement {name!r}; use one of {', '.join(p.value for p in DiffusionPlacement)}") from None


@dataclass(frozen=True)
class GenerationSpec:
    prompt: str
    placement: DiffusionPlacement = DiffusionPlacement.UNET_SPLIT
    steps: int = 10
    seed: int = 0
    guidance: float = DEFAULT_GUIDANCE  # classifier-free guidance scale; 1 = none
    wire: str = "fp32"  # fp32, fp16, bf16 or int8
    head_blocks: int = 1  # unet-split: down blocks in the head (--split A)


@dataclass
class GenerationResult:
    picture: torch.Tensor  # [c, H, W] in [0, 1]
    pixels: torch.Tensor  # uint8 [H, W, c]
    seconds: float
    bytes_up: int = 0
    bytes_down: int = 0
    round_trips: int = 0
    latents_by_step: list[torch.Tensor] = field(default_factory=list)  # the device's latents before each step

    @property
    def image_sha256(self) -> str:
        return hashlib.sha256(self.pixels.contiguous().numpy().tobytes()).hexdigest()


class DiffusionStage(RemoteStage):
    """The device's handle on the cloud part of a diffusion placement: opens a session, sends the schedule and
    the prompt embeddings, then the placement's frames; each reply is checked (session, sequence, part, codec,
    shape) by `RemoteStage`. No replay: a lost session fails the picture."""

    def __init__(self, transport, *, expect: dict):
        super().__init__(transport, 1, "fp32", expect=expect, recover_seconds=0)

    def send(self, tensor: torch.Tensor, wire: str, reply_shape: tuple[int, ...]) -> torch.Tensor:
        """Sends `tensor` in `wire`; returns the reply decoded to float32 of `reply_shape`."""
        self.codec = frame_codec(wire)
        frame = Frame(FrameKind.FORWARD, to_wire(tensor, wire), codec=self.codec, session=self.session, seq=self.seq,
                      part=self.part_index)
        reply = self._call(frame, expected_shape=wire_shape(reply_shape, wire))
        self.seq += 1
        return from_wire(reply.tensor, wire, reply_shape)

    def start(self, timesteps: torch.Tensor, guidance: float, context: torch.Tensor, wire: str) -> None:
        """Opens the session and sends the schedule (fp32) and the prompt embeddings (in `wire`)."""
        self.open()
        schedule = torch.cat([torch.tensor([float(guidance)]), timesteps.float()])[None]  # [1, 1 + N]
        self._post(schedule, "fp32")
        self._post(context, wire)

    def _post(self, tensor: torch.Tensor, wire: str) -> None:
        """Sends a set-up tensor; the reply is a one-element acknowledgement."""
        self.codec = frame_codec(wire)
        frame = Frame(FrameKind.FORWARD, to_wire(tensor, wire), codec=self.codec, session=self.session, seq=self.seq,
                      part=self.part_index)
        self._call(frame, expected_shape=(1, 1))
        self.seq += 1


def generate_image(model, spec: GenerationSpec, *, transport=None) -> GenerationResult:
    """One picture for `spec.prompt`. `transport` reaches the cloud part (required unless the placement is none)."""
    check_wire(spec.wire)
    if spec.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {spec.steps}")
    placement = DiffusionPlacement(spec.placement)
    if placement != DiffusionPlacement.NONE and transport is None:
        raise ConfigError("a split placement needs a transport to its cloud part")
    start = time.perf_counter()
    before = transport.stats.snapshot() if transport is not None else None
    scheduler = fresh_scheduler(model, spec.steps)
    context = prompt_context(model, [spec.prompt], spec.guidance)  # on the device: the text encoder is here
    latents = initial_latents(model, 1, spec.seed, scheduler)
    history: list[torch.Tensor] = []
    if placement == DiffusionPlacement.NONE:
        predict = unet_noise(model, context)
        for t in scheduler.timesteps:
            history.append(latents)
            latents, _ = denoise_step(predict, scheduler, latents, t, spec.guidance)
    else:
        stage = DiffusionStage(transport, expect={"placement": placement.value, "model": model.name,
                                                  **({"head_blocks": spec.head_blocks} if placement == DiffusionPlacement.UNET_SPLIT else {})})
        try:
            stage.start(scheduler.timesteps, spec.guidance, context, spec.wire)
            if placement == DiffusionPlacement.REFERENCE:
                history.append(latents)
                latents = stage.send(latents, spec.wire, tuple(latents.shape))
            else:
                predict = split_noise(model, stage, context, spec.head_blocks, spec.wire)
                for t in scheduler.timesteps:
                    history.append(latents)
                    latents, _ = denoise_step(predict, scheduler, latents, t, spec.guidance)
        finally:
            stage.close()
    picture = model.decode(latents)[0]
    stats = transport.stats.since(before) if transport is not None else None
    return GenerationResult(picture=picture, pixels=to_uint8(picture[None])[0], seconds=time.perf_counter() - start,
                            bytes_up=stats.bytes_up if stats else 0, bytes_down=stats.bytes_down if stats else 0,
                            round_trips=stats.round_trips if stats else 0, latents_by_step=history)


def split_noise(model, stage: DiffusionStage, context: torch.Tensor, head_blocks: int, wire: str):
    """`predict_noise` with the UNet's head and tail here and its trunk behind `stage`."""
    from splitveil.diffusion.cloud import trunk_output_shape

    splittable = UNetSplittable(model.unet)
    cuts = splittable.cuts_for(head_blocks)
    splittable.check_sample_size(model.latent_shape)
    bounds = [0, *(splittable.boundary(c) for c in cuts), len(splittable.segment_names)]
    head = splittable.make_part(bounds[0], bounds[1])
    tail = splittable.make_part(bounds[2], bounds[3])
    out_shape = trunk_output_shape(model, head_blocks)

    @torch.no_grad()
    def predict(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        carry = head(UNetCarry(sample, t, context))
        trunk_out = stage.send(carry.sample, wire, (sample.shape[0], *out_shape))
        # the trunk consumed the head's last skip (its own input); the others wait here for the tail
        skips = carry.skips[:-1] if head_blocks < splittable.n else carry.skips
        return tail(UNetCarry(trunk_out, t, context, skips=skips, emb=carry.emb)).sample

    return predict


def loopback_transport(model, placement: str, head_blocks: int = 1, *, log: list | None = None):
    """An in-process transport to a fresh `DiffusionService` for `placement` (frames really encoded and decoded)."""
    from splitveil.diffusion.cloud import build_diffusion_service
    from splitveil.transport.loopback import LoopbackTransport

    service = build_diffusion_service(model, placement, head_blocks, log=log)
    return LoopbackTransport(service.handle)


def run_generation(model, spec: GenerationSpec, *, server: str | None = None, token: str | None = None,
                   ca_file=None, pin_sha256: str | None = None, insecure: bool = False) -> GenerationResult:
    """`generate_image` over loopback (default) or a `splitveil serve` at `server`."""
    if spec.placement == DiffusionPlacement.NONE:
        if server:
            raise ConfigError("--placement none runs everything here; drop --server")
        return generate_image(model, spec)
    if server:
        from splitveil.transport.network import WebSocketTransport

        transport = WebSocketTransport(server, token=token, ca_file=ca_file, pin_sha256=pin_sha256, insecure=insecure)
    else:
        transport = loopback_transport(model, spec.placement, spec.head_blocks)
    try:
        return generate_image(model, spec, transport=transport)
    finally:
        transport.close()
