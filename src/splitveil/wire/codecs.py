"""Tensor codecs: how a tensor's elements travel. Pure functions of (tensor) -> bytes and (bytes, shape) -> tensor.

Every codec has a one-byte wire id (in the frame header), an element size and the dtype it restores to.
Float codecs decode to float32 (a part casts what it receives to its own dtype and device, `models/precision.py`);
a bf16 or fp16 tensor encodes exactly on a float32 wire; `int64` carries token ids; `uint8` carries raw bytes
(error messages).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from splitveil.core.errors import WireError
from splitveil.core.registry import Registry


@dataclass(frozen=True)
class Codec:
    """A tensor encoding. `wire_dtype` is the little-endian element type on the wire."""

    name: str
    wire_id: int
    wire_dtype: str  # numpy dtype string, little-endian
    decoded_dtype: torch.dtype

    @property
    def bytes_per_element(self) -> int:
        return np.dtype(self.wire_dtype).itemsize

    def encode(self, tensor: torch.Tensor) -> bytes:
        """Tensor -> raw little-endian bytes of its elements (C order)."""
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.dtype in (torch.bfloat16, torch.float16) and self.name != "bf16":
            tensor = tensor.float()  # numpy has no bfloat16; a float32 or float16 wire holds these values as they are
        if self.name == "bf16":  # numpy has no bfloat16: ship the 16 raw bits
            return tensor.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
        return tensor.numpy().astype(self.wire_dtype, copy=False).tobytes()

    def decode(self, payload: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        """Raw bytes -> tensor of `shape` in `decoded_dtype`. The caller has checked the byte count."""
        array = np.frombuffer(payload, dtype=self.wire_dtype).reshape(shape)
        if self.name == "bf16":
            return torch.from_numpy(array.copy()).view(torch.bfloat16).to(self.decoded_dtype)
        return torch.from_numpy(array.astype(np.dtype(self.wire_dtype).newbyteorder("="), copy=True)).to(self.decoded_dtype)


CODECS: Registry[Codec] = Registry("codec")
for _codec in (
    Codec("fp32", 1, "<f4", torch.float32),
    Codec("fp16", 2, "<f2", torch.float32),
    Codec("bf16", 3, "<i2", torch.float32),
    Codec("int64", 4, "<i8", torch.int64),
    Codec("uint8", 5, "u1", torch.uint8),
):
    CODECS.register(_codec.name, _codec)

_BY_WIRE_ID = {CODECS.get(name).wire_id: CODECS.get(name) for name in CODECS}

#: codecs a user may choose for hidden states (`--wire`)
FLOAT_CODECS = ("fp32", "fp16", "bf16")


def get_codec(name: str) -> Codec:
    return CODECS.get(name)


def codec_for_wire_id(wire_id: int) -> Codec:
    try:
        return _BY_WIRE_ID[wire_id]
    except KeyError:
        raise WireError(f"unknown codec id {wire_id}") from None
