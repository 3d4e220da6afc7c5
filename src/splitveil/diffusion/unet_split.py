"""A diffusers `UNet2DConditionModel` under the Splittable contract: the UNet unrolled into segments.

Segments, in the order one denoising step runs them:

    conv_in | down.0 ... down.{n-1} | mid | up.0 ... up.{n-1} | conv_out

`conv_in` is the prologue and `conv_out` (with the output norm) the epilogue; the 2n+1 blocks between are what cuts
go between. The skip connections of a UNet tie down block k to up block n-1-k, so a Λ-split must be symmetric:
cut `a` puts `conv_in` + the first `a` down blocks in the head and the last `a` up blocks + `conv_out` in the tail,
i.e. the plan `lambda_split(a, 2n+1-a)`. Then every skip tensor the tail needs was made by the head and stays on
the device; the trunk's own skips (down blocks a.. to up blocks ..n-1-a) stay in the cloud. What crosses is the
head's last output (uplink) and the trunk's last up block's output (downlink), plus the prompt embeddings the
trunk's cross-attention reads (sent once per picture) and the timestep (public: the scheduler's schedule).

Parts pass a `UNetCarry` along; running every part in order gives the UNet's own forward bit for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from splitveil.core.errors import PlanError
from splitveil.models.splittable import Part, Splittable


@dataclass
class UNetCarry:
    """What flows between the segments of one UNet step."""

    sample: torch.Tensor  # the running activation [B, C, H, W]
    timestep: torch.Tensor  # scalar or [B]
    context: torch.Tensor | None  # prompt embeddings [B, L, D] for cross-attention
    skips: tuple[torch.Tensor, ...] = ()  # residuals of the down path not consumed yet
    emb: torch.Tensor | None = field(default=None, repr=False)  # time embedding [B, E], made by the first segment that needs it


def time_embedding(unet, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The UNet's time embedding [B, E] for `timestep`, as its forward computes it (no class or added embeddings)."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb


def check_supported(unet) -> None:
    """Refuses UNet features the segment runner does not reproduce (added/class embeddings, odd sizes)."""
    config = unet.config
    problems = []
    if config.class_embed_type is not None or config.addition_embed_type is not None:
        problems.append("class or added embeddings (SDXL-style add_embeds)")
    if config.center_input_sample:
        problems.append("center_input_sample")
    if unet.mid_block is None:
        problems.append("a UNet without a mid block")
    if problems:
        raise PlanError(f"this UNet uses {', '.join(problems)}, which the unet-split placement does not support")


class UNetSplittable(Splittable):
    """Wraps a `UNet2DConditionModel` (not copied: parts share its weights)."""

    def __init__(self, unet):
        check_supported(unet)
        self.unet = unet
        self.n = len(unet.down_blocks)

    @property
    def segment_names(self) -> list[str]:
        return ["conv_in", *(f"down.{i}" for i in range(self.n)), "mid", *(f"up.{i}" for i in range(self.n)), "conv_out"]

    @property
    def num_prologue(self) -> int:
        return 1

    @property
    def num_blocks(self) -> int:
        return 2 * self.n + 1

    def cuts_for(self, head_blocks: int) -> tuple[int, int]:
        """The symmetric Λ-split cuts with `head_blocks` down blocks in the head (and as many up blocks in the tail)."""
        if not 1 <= head_blocks <= self.n:
            raise PlanError(f"--split {head_blocks} is out of range: this UNet has {self.n} down blocks, so the head "
                            f"keeps 1 to {self.n} of them")
        return head_blocks, self.num_blocks - head_blocks

    def check_cuts(self, cuts: tuple[int, ...]) -> int:
        """The head's number of down blocks for Λ-split `cuts`; PlanError unless they are symmetric."""
        if len(cuts) != 2 or cuts[0] + cuts[1] != self.num_blocks or not 1 <= cuts[0] <= self.n:
            raise PlanError(f"a UNet Λ-split must be symmetric (skip connections): cuts a,{self.num_blocks}-a with "
                            f"1 <= a <= {self.n}, got {','.join(map(str, cuts))}")
        return cuts[0]

    def make_part(self, start: int, end: int) -> "UNetPart":
        return UNetPart(self, start, end)

    # -- running segments ------------------------------------------------------------------------------------

    def run_segment(self, index: int, carry: UNetCarry) -> UNetCarry:
        unet, name = self.unet, self.segment_names[index]
        if carry.emb is None:
            carry = replace(carry, emb=time_embedding(unet, carry.sample, carry.timestep))
        if name == "conv_in":
            sample = unet.conv_in(carry.sample)
            return replace(carry, sample=sample, skips=(sample,))
        if name.startswith("down."):
            block = unet.down_blocks[int(name[5:])]
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=carry.sample, temb=carry.emb, encoder_hidden_states=carry.context)
            else:
                sample, res = block(hidden_states=carry.sample, temb=carry.emb)
            return replace(carry, sample=sample, skips=carry.skips + tuple(res))
        if name == "mid":
            block = unet.mid_block
            if getattr(block, "has_cross_attention", False):
                sample = block(carry.sample, carry.emb, encoder_hidden_states=carry.context)
            else:
                sample = block(carry.sample, carry.emb)
            return replace(carry, sample=sample)
        if name.startswith("up."):
            block = unet.up_blocks[int(name[3:])]
            width = len(block.resnets)
            if len(carry.skips) < width:
                raise PlanError(f"{name} needs {width} skip tensors, the carry holds {len(carry.skips)}")
            res, skips = carry.skips[-width:], carry.skips[:-width]
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=carry.sample, temb=carry.emb, res_hidden_states_tuple=res,
                               encoder_hidden_states=carry.context, upsample_size=None)
            else:
                sample = block(hidden_states=carry.sample, temb=carry.emb, res_hidden_states_tuple=res, upsample_size=None)
            return replace(carry, sample=sample, skips=skips)
        # conv_out
        sample = carry.sample
        if unet.conv_norm_out is not None:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return replace(carry, sample=unet.conv_out(sample))

    def check_sample_size(self, shape: tuple[int, ...]) -> None:
        factor = 2 ** self.unet.num_upsamplers
        if any(dim % factor for dim in shape[-2:]):
            raise PlanError(f"latents of {shape[-2]}x{shape[-1]} are not a multiple of {factor}: the unet-split "
                            "placement needs sizes the UNet's up path restores exactly")


class UNetPart(Part):
    """Runs segments [start, end) of a `UNetSplittable` on a `UNetCarry`. Stateless."""

    def __init__(self, model: UNetSplittable, start: int, end: int):
        self.model, self.start, self.end = model, start, end
        self.name = f"{model.segment_names[start]}..{model.segment_names[end - 1]}"

    @torch.no_grad()
    def forward(self, carry: UNetCarry) -> UNetCarry:
        for index in range(self.start, self.end):
            carry = self.model.run_segment(index, carry)
        return carry

    def clone(self) -> "UNetPart":
        return UNetPart(self.model, self.start, self.end)
