"""The cloud's side of a diffusion split: the served parts and the service that runs them per session.

A session speaks a fixed sequence of FORWARD frames to part 1:

    1. the schedule, fp32 [1, 1 + N]: the guidance scale, then the N timesteps (public: the scheduler's);
    2. the prompt embeddings [R, L, D] (R = 2 pictures' rows with guidance), in the session's wire codec;
    3. `reference`: the initial latents [B, C, h, w] -> the final latents (the cloud runs every step);
       `unet-split`: N frames, one per step, the head's output [R, c, H, W] -> the trunk's output.

Frames 1 and 2 are answered with a one-element acknowledgement. A part checks each frame against the state it is
in (`check_input`) before it is computed, so a malformed or out-of-order frame gets an ERROR frame and changes
nothing. `log`, when set (attacks), is a list shared by every session's copy that receives what the cloud holds.
"""

from __future__ import annotations

import math

import torch

from splitveil.core.errors import WireError
from splitveil.diffusion.sampling import denoise_step, fresh_scheduler, unet_noise, uses_guidance
from splitveil.diffusion.unet_split import UNetCarry, UNetSplittable
from splitveil.diffusion.wire import DIFFUSION_WIRES, from_wire, to_wire, wire_of_frame
from splitveil.models.splittable import Part
from splitveil.serve.service import PartService
from splitveil.wire.frame import MAX_FRAME_BYTES

MAX_STEPS = 1000


def ack(codec: str) -> torch.Tensor:
    return torch.zeros(1, 1, dtype=torch.uint8 if codec == "uint8" else torch.float32)


class DiffusionCloudPart(Part):
    """The schedule -> context -> work protocol every diffusion cloud part shares; subclasses give `_work`."""

    start = end = 0

    def __init__(self, model, *, log: list | None = None):
        self.model = model
        self.log = log
        self.reset()

    def reset(self) -> None:
        self.guidance = 1.0
        self.timesteps: torch.Tensor | None = None
        self.context: torch.Tensor | None = None
        self.steps_done = 0

    def state_bytes(self) -> int:
        return 0 if self.context is None else self.context.numel() * 4

    @property
    def context_dim(self) -> int:
        return int(self.model.unet.config.cross_attention_dim)

    def check_input(self, tensor: torch.Tensor, codec: str) -> None:
        """Raises WireError unless `tensor` (as the frame carries it) is what this part expects next."""
        if codec not in ("fp32", "fp16", "bf16", "uint8"):
            raise WireError(f"diffusion frames carry {', '.join(DIFFUSION_WIRES)} tensors, not {codec}")
        if self.timesteps is None:
            if codec != "fp32" or tensor.dim() != 2 or tensor.shape[0] != 1 or not 2 <= tensor.shape[1] <= MAX_STEPS + 1:
                raise WireError("the first frame of a session must be the schedule: fp32 [1, 1 + steps]")
            return
        if self.context is None:
            rows, width = tensor.shape[0], self._width(tensor, codec, 3)
            if width % self.context_dim or not 1 <= width // self.context_dim <= 1024:
                raise WireError(f"the second frame must be prompt embeddings [rows, tokens, {self.context_dim}]")
            if uses_guidance(self.guidance) and rows % 2:
                raise WireError("with guidance the prompt embeddings come in pairs of rows (unconditional, conditional)")
            return
        self._check_work(tensor, codec)

    @staticmethod
    def _width(tensor: torch.Tensor, codec: str, ndim: int) -> int:
        """Elements per row of a frame's tensor that stands for a [rows, ...] tensor of `ndim` dimensions."""
        if codec == "uint8":
            if tensor.dim() != 2 or tensor.shape[1] <= 8:
                raise WireError("an int8 frame must be [rows, 8 + elements]")
            return tensor.shape[1] - 8
        if tensor.dim() != ndim:
            raise WireError(f"expected a tensor of {ndim} dimensions, got {list(tensor.shape)}")
        return math.prod(tensor.shape[1:])

    def _check_work(self, tensor: torch.Tensor, codec: str) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        codec = "uint8" if tensor.dtype == torch.uint8 else "fp32"
        if self.timesteps is None:
            self.guidance = float(tensor[0, 0])
            self.timesteps = tensor[0, 1:].round().long()
            scheduler = fresh_scheduler(self.model, len(self.timesteps))
            if not torch.equal(scheduler.timesteps.long(), self.timesteps):
                self.timesteps = None
                raise WireError("the schedule's timesteps are not this model's scheduler's for that many steps")
            return ack("fp32")
        wire = wire_of_frame(codec) if codec == "uint8" else "fp32"
        if self.context is None:
            rows = tensor.shape[0]
            width = self._width(tensor, codec, 3)
            self.context = from_wire(tensor, wire, (rows, width // self.context_dim, self.context_dim))
            if self.log is not None:
                self.log.append({"kind": "context", "tensor": self.context.clone()})
            return ack(codec)
        return self._work(tensor, wire)

    def _work(self, tensor: torch.Tensor, wire: str) -> torch.Tensor:
        raise NotImplementedError


class ReferenceCloud(DiffusionCloudPart):
    """Λ-Split's reference placement: the cloud runs the UNet and the scheduler for every step, holding the latents."""

    name = "UNet + scheduler"

    def _check_work(self, tensor: torch.Tensor, codec: str) -> None:
        if self.steps_done:
            raise WireError("this session's picture is done; open a new session")
        rows = self.context.shape[0] // (2 if uses_guidance(self.guidance) else 1)
        if tensor.shape[0] != rows or self._width(tensor, codec, 4) != math.prod(self.model.latent_shape):
            raise WireError(f"expected initial latents [{rows}, {', '.join(map(str, self.model.latent_shape))}]")

    def _work(self, tensor: torch.Tensor, wire: str) -> torch.Tensor:
        latents = from_wire(tensor, wire, (tensor.shape[0], *self.model.latent_shape))
        scheduler = fresh_scheduler(self.model, len(self.timesteps))
        predict = unet_noise(self.model, self.context)
        for index, t in enumerate(scheduler.timesteps):
            if self.log is not None:
                self.log.append({"kind": "latents", "step": index, "t": int(t), "tensor": latents.clone()})
            latents, _ = denoise_step(predict, scheduler, latents, t, self.guidance)
        if self.log is not None:  # the final latents: computed here, then sent back to be decoded
            self.log.append({"kind": "latents", "step": len(self.timesteps), "t": None, "tensor": latents.clone()})
        self.steps_done = len(self.timesteps)
        return to_wire(latents, wire)

    def clone(self) -> "ReferenceCloud":
        return ReferenceCloud(self.model, log=self.log)


class TrunkCloud(DiffusionCloudPart):
    """The unet-split trunk: the rest of the down path, the mid block and the matching up blocks, one step a frame."""

    def __init__(self, model, head_blocks: int, *, log: list | None = None):
        self.splittable = UNetSplittable(model.unet)
        self.head_blocks = head_blocks
        cuts = self.splittable.cuts_for(head_blocks)
        bounds = [self.splittable.boundary(c) for c in cuts]
        self.trunk = self.splittable.make_part(*bounds)
        self.name = f"UNet trunk {self.trunk.name}"
        self.input_shape = trunk_input_shape(model, head_blocks)  # (c, H, W) of one row
        super().__init__(model, log=log)

    def _check_work(self, tensor: torch.Tensor, codec: str) -> None:
        if self.steps_done >= len(self.timesteps):
            raise WireError(f"all {len(self.timesteps)} steps of this schedule are done; open a new session")
        if tensor.shape[0] != self.context.shape[0] or self._width(tensor, codec, 4) != math.prod(self.input_shape) \
                or (codec != "uint8" and tuple(tensor.shape[1:]) != self.input_shape):
            raise WireError(f"expected the head's output [{self.context.shape[0]}, {', '.join(map(str, self.input_shape))}]")

    def _work(self, tensor: torch.Tensor, wire: str) -> torch.Tensor:
        sample = from_wire(tensor, wire, (tensor.shape[0], *self.input_shape))
        t = self.timesteps[self.steps_done]
        if self.log is not None:
            self.log.append({"kind": "uplink", "step": self.steps_done, "t": int(t), "tensor": sample.clone()})
        carry = self.trunk(UNetCarry(sample, t, self.context, skips=(sample,)))
        self.steps_done += 1
        return to_wire(carry.sample, wire)

    def clone(self) -> "TrunkCloud":
        return TrunkCloud(self.model, self.head_blocks, log=self.log)


def trunk_input_shape(model, head_blocks: int) -> tuple[int, int, int]:
    """(channels, height, width) of the head's output for one row."""
    return tuple(_shapes(model, head_blocks)[0])


def trunk_output_shape(model, head_blocks: int) -> tuple[int, int, int]:
    return tuple(_shapes(model, head_blocks)[1])


def _shapes(model, head_blocks: int):
    """Shapes at the two cuts from a dry run of head and trunk on the meta device (no compute, no weights read)."""
    cache = model.info.setdefault("_cut_shapes", {})
    if head_blocks not in cache:
        import copy

        splittable = UNetSplittable(copy.deepcopy(model.unet).to("meta"))
        cuts = splittable.cuts_for(head_blocks)
        splittable.check_sample_size(model.latent_shape)
        bounds = [0, *(splittable.boundary(c) for c in cuts)]
        carry = UNetCarry(torch.zeros(1, *model.latent_shape, device="meta"), torch.tensor(1, device="meta"),
                          torch.zeros(1, 1, splittable.unet.config.cross_attention_dim, device="meta"))
        head = splittable.make_part(bounds[0], bounds[1])(carry)
        trunk = splittable.make_part(bounds[1], bounds[2])(UNetCarry(head.sample, carry.timestep, carry.context,
                                                                     skips=(head.sample,)))
        cache[head_blocks] = (tuple(head.sample.shape[1:]), tuple(trunk.sample.shape[1:]))
    return cache[head_blocks]


class DiffusionService(PartService):
    """A `PartService` for diffusion cloud parts: frames are checked by the part's protocol state, each computed on
    its own (no step batching across sessions), and a session may send the frames of one picture."""

    def __init__(self, part: DiffusionCloudPart, *, info: dict | None = None, max_frame_bytes: int = MAX_FRAME_BYTES,
                 max_sessions: int = 64, max_batch: int = 16, max_kv_mb: float = 1024.0):
        super().__init__({1: part}, hidden_size=part.context_dim, info=info, max_frame_bytes=max_frame_bytes,
                         max_sessions=max_sessions, max_tokens=max_batch * (MAX_STEPS + 2), max_batch=max_batch,
                         batch_steps=False, max_kv_bytes=int(max_kv_mb * 2**20))

    def _check_forward(self, session, frame) -> None:
        if frame.seq != session.next_seq:
            raise WireError(f"frame out of order: expected sequence number {session.next_seq}, got {frame.seq}")
        if frame.part not in session.parts:
            raise WireError(f"this server does not run part {frame.part}")
        if frame.tensor is None or frame.tensor.shape[0] == 0:
            raise WireError("a forward frame must carry a tensor")
        if frame.tensor.shape[0] > self.max_batch:
            raise WireError(f"batch of {frame.tensor.shape[0]} exceeds the limit of {self.max_batch}")
        session.parts[frame.part].check_input(frame.tensor, frame.codec)
        if session.tokens + self._positions(frame) > self.max_tokens:
            raise WireError(f"the session would exceed its limit of {self.max_tokens} rows")

    def _positions(self, frame) -> int:
        return frame.tensor.shape[0]

    def _run(self, works):
        return [self._run_one(work) for work in works]


def cloud_part(model, placement: str, head_blocks: int = 1, *, log: list | None = None) -> DiffusionCloudPart:
    if placement == "reference":
        return ReferenceCloud(model, log=log)
    return TrunkCloud(model, head_blocks, log=log)


def build_diffusion_service(model, placement: str, head_blocks: int = 1, *, log: list | None = None,
                            **limits) -> DiffusionService:
    """The service a cloud runs for `placement` ("reference" or "unet-split") of `model`."""
    part = cloud_part(model, placement, head_blocks, log=log)
    info = {"model": model.name, "placement": placement, "latent_shape": list(model.latent_shape)}
    if placement == "unet-split":
        info.update(head_blocks=head_blocks, cuts=list(part.splittable.cuts_for(head_blocks)))
    return DiffusionService(part, info=info, **limits)
