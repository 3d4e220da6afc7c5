"""How diffusion tensors travel: the float codecs of `splitveil.wire.codecs` plus int8 affine quantisation.

`int8` is packed into a `uint8` frame so that the frame format stays as it is: each row (one picture of the
batch) becomes 8 header bytes (its minimum and its step, two little-endian float32) followed by one byte per
element, `round((x - min) / step)` in 0..255. A frame of shape [rows, 8 + elements] thus carries a tensor of
shape [rows, ...]; the receiver knows the trailing shape from the protocol. Pure functions.
"""

from __future__ import annotations

import math

import torch

from splitveil.core.errors import ConfigError, WireError
from splitveil.wire.codecs import FLOAT_CODECS

#: what `--wire` may name for diffusion traffic
DIFFUSION_WIRES = (*FLOAT_CODECS, "int8")
INT8_HEADER_BYTES = 8


def check_wire(wire: str) -> str:
    if wire not in DIFFUSION_WIRES:
        raise ConfigError(f"unknown --wire {wire!r}; use one of {', '.join(DIFFUSION_WIRES)}")
    return wire


def quantise_int8(x: torch.Tensor) -> torch.Tensor:
    """[rows, ...] float -> [rows, 8 + elements] uint8 (per-row affine quantisation)."""
    rows = x.detach().float().reshape(x.shape[0], -1)  # [R, E]
    low = rows.min(dim=1).values
    step = (rows.max(dim=1).values - low) / 255
    step = torch.where(step > 0, step, torch.ones_like(step))
    codes = ((rows - low[:, None]) / step[:, None]).round().clamp(0, 255).to(torch.uint8)
    header = torch.stack([low, step], dim=1).contiguous().view(torch.uint8)  # [R, 8]
    return torch.cat([header, codes], dim=1)


def dequantise_int8(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `quantise_int8`: [rows, 8 + elements] uint8 -> float32 of `shape` ([rows, ...])."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[0] != shape[0] \
            or packed.shape[1] != INT8_HEADER_BYTES + math.prod(shape[1:]):
        raise WireError(f"an int8 frame of shape {list(packed.shape)} does not hold a tensor of shape {list(shape)}")
    raw = bytearray(packed[:, :INT8_HEADER_BYTES].contiguous().numpy().tobytes())  # a fresh, aligned buffer
    header = torch.frombuffer(raw, dtype=torch.float32).reshape(-1, 2)  # [R, 2]: min, step (little-endian hosts)
    if not bool(torch.isfinite(header).all()) or bool((header[:, 1] <= 0).any()):
        raise WireError("an int8 frame carries a bad scale")
    low, step = header[:, 0:1], header[:, 1:2]
    return (packed[:, INT8_HEADER_BYTES:].float() * step + low).reshape(shape)


def frame_codec(wire: str) -> str:
    """The frame codec a tensor of `wire` travels in."""
    return "uint8" if wire == "int8" else wire


def wire_of_frame(codec: str) -> str:
    return "int8" if codec == "uint8" else codec


def to_wire(x: torch.Tensor, wire: str) -> torch.Tensor:
    """The tensor a frame of `frame_codec(wire)` carries for `x`."""
    return quantise_int8(x) if wire == "int8" else x.float()


def from_wire(payload: torch.Tensor, wire: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor of `shape` a received payload stands for."""
    if wire == "int8":
        return dequantise_int8(payload, shape)
    if tuple(payload.shape) != tuple(shape):
        raise WireError(f"expected a tensor of shape {list(shape)}, got {list(payload.shape)}")
    return payload.float()


def wire_shape(shape: tuple[int, ...], wire: str) -> tuple[int, ...]:
    """The frame shape that carries a tensor of `shape` in `wire`."""
    return (shape[0], INT8_HEADER_BYTES + math.prod(shape[1:])) if wire == "int8" else tuple(shape)


def round_trip(x: torch.Tensor, wire: str) -> torch.Tensor:
    """What the receiver decodes for `x` sent in `wire` (the codec's effect without a transport)."""
    from splitveil.wire.codecs import get_codec

    if wire == "int8":
        return dequantise_int8(quantise_int8(x), tuple(x.shape))
    codec = get_codec(wire)
    return codec.decode(codec.encode(x), tuple(x.shape))
