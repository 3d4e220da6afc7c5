"""Frames: a small versioned header and a tensor's raw bytes.

Layout (little-endian), 28 + 4 x ndim bytes of header (40 bytes for a [1, 1, H] hidden state):

    magic   2s  b"SV"
    version B   WIRE_VERSION
    kind    B   FrameKind
    codec   B   codec wire id (element encoding of the payload)
    ndim    B   0..MAX_NDIM
    part    B   index of the part the frame is for (or from)
    flags   B   reserved, 0
    session 16s session id (zeros before a session exists)
    seq     I   sequence number within the session
    shape   ndim x I
    payload product(shape) x bytes per element

Decoding validates everything before allocating: magic, version, kind, codec, ndim, sizes, and that the shape's
product times the element size equals the payload length; float payloads must be finite.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from enum import IntEnum

import torch

from splitveil.core.errors import WireError
from splitveil.wire.codecs import Codec, codec_for_wire_id, get_codec

MAGIC = b"SV"
WIRE_VERSION = 1
MAX_NDIM = 4
MAX_FRAME_BYTES = 4 * 1024 * 1024  # default limit on one frame (4 MiB)
_FIXED = struct.Struct("<2sBBBBBB16sI")
HEADER_FIXED_BYTES = _FIXED.size  # 28
SESSION_BYTES = 16
NO_SESSION = bytes(SESSION_BYTES)


class FrameKind(IntEnum):
    OPEN = 1  # client -> server: open a session; reply carries the session id
    FORWARD = 2  # run a part on the tensor; reply: the part's output
    RESULT = 3  # server -> client: a part's output
    CLOSE = 4  # client -> server: end the session
    ERROR = 5  # server -> client: payload is a UTF-8 message (uint8 codec)
    OK = 6  # server -> client: acknowledgement without a tensor
    TRUNCATE = 7  # client -> server: keep the first N positions of a part's state (payload: int64 [1] = N); reply OK


@dataclass(frozen=True)
class Frame:
    kind: FrameKind
    tensor: torch.Tensor | None = None
    codec: str = "fp32"
    session: bytes = NO_SESSION
    seq: int = 0
    part: int = 0
    shape: tuple[int, ...] = field(default=())

    @property
    def message(self) -> str:
        """The text of a text frame (ERROR message, OPEN reply info)."""
        if self.tensor is None:
            return ""
        return bytes(self.tensor.numpy().tobytes()).decode("utf-8", errors="replace")


def text_frame(kind: FrameKind, text: str, *, session: bytes = NO_SESSION, seq: int = 0, limit: int = 65536) -> Frame:
    """A frame whose payload is UTF-8 text (uint8 codec): error messages, the server's JSON info."""
    data = torch.frombuffer(bytearray(text.encode("utf-8")[:limit]), dtype=torch.uint8)
    return Frame(kind, data if data.numel() else None, codec="uint8", session=session, seq=seq)


def error_frame(message: str, *, session: bytes = NO_SESSION, seq: int = 0) -> Frame:
    return text_frame(FrameKind.ERROR, message or "error", session=session, seq=seq, limit=4096)


def encode_frame(frame: Frame) -> bytes:
    """Frame -> bytes. The tensor is encoded with the frame's codec."""
    if len(frame.session) != SESSION_BYTES:
        raise WireError(f"session id must be {SESSION_BYTES} bytes")
    if not 0 <= frame.part <= 255:
        raise WireError(f"part index {frame.part} does not fit a frame (0..255)")
    if not 0 <= frame.seq < 2**32:
        raise WireError(f"sequence number {frame.seq} does not fit a frame (0..2**32-1)")
    codec = get_codec(frame.codec)
    if frame.tensor is None:
        shape: tuple[int, ...] = ()
        payload = b""
        ndim = 0
    else:
        shape = tuple(frame.tensor.shape)
        ndim = len(shape)
        if ndim > MAX_NDIM or ndim == 0:
            raise WireError(f"tensor of {ndim} dimensions cannot be framed (1..{MAX_NDIM})")
        payload = codec.encode(frame.tensor)
    header = _FIXED.pack(MAGIC, WIRE_VERSION, int(frame.kind), codec.wire_id, ndim, frame.part, 0, frame.session, frame.seq)
    return header + struct.pack(f"<{ndim}I", *shape) + payload


def decode_frame(data: bytes | bytearray | memoryview, *, max_bytes: int = MAX_FRAME_BYTES, finite: bool = True) -> Frame:
    """Bytes -> Frame, validating before allocating. Raises WireError with a short reason, and nothing else, for any
    input: every bound is checked arithmetically before a buffer of that size could be made."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"a frame must be bytes, not {type(data).__name__}")
    if isinstance(data, memoryview) and (data.ndim != 1 or data.itemsize != 1):
        raise WireError("a frame must be a flat buffer of bytes")
    size = len(data)
    if size > max_bytes:
        raise WireError(f"frame of {size} bytes exceeds the limit of {max_bytes}")
    if size < HEADER_FIXED_BYTES:
        raise WireError(f"frame of {size} bytes is shorter than a header")
    magic, version, kind, codec_id, ndim, part, _flags, session, seq = _FIXED.unpack_from(data, 0)
    if magic != MAGIC:
        raise WireError("not a splitveil frame (bad magic)")
    if version != WIRE_VERSION:
        raise WireError(f"wire version {version} is not supported (this side speaks {WIRE_VERSION})")
    try:
        kind = FrameKind(kind)
    except ValueError:
        raise WireError(f"unknown frame kind {kind}") from None
    codec: Codec = codec_for_wire_id(codec_id)
    if ndim > MAX_NDIM:
        raise WireError(f"{ndim} dimensions exceed the limit of {MAX_NDIM}")
    header_size = HEADER_FIXED_BYTES + 4 * ndim
    if size < header_size:
        raise WireError("frame truncated inside its shape")
    shape = struct.unpack_from(f"<{ndim}I", data, HEADER_FIXED_BYTES)
    payload_size = size - header_size
    if ndim == 0:
        if payload_size:
            raise WireError("frame without a shape carries a payload")
        return Frame(kind, None, codec.name, bytes(session), seq, part, ())
    expected = math.prod(shape) * codec.bytes_per_element
    if expected != payload_size:
        raise WireError(f"shape {list(shape)} of {codec.name} needs {expected} bytes, frame carries {payload_size}")
    if expected == 0 and math.prod(d for d in shape if d) > max_bytes:
        # an empty tensor whose other dimensions are absurd: no frame could ever carry that many elements
        raise WireError(f"shape {list(shape)} is larger than any frame of at most {max_bytes} bytes")
    try:
        tensor = codec.decode(memoryview(data)[header_size:], tuple(shape))
    except (ValueError, TypeError, RuntimeError, MemoryError) as error:  # defence in depth: checked above already
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise WireError(f"cannot decode a {codec.name} payload of shape {list(shape)}: {reason}") from None
    if finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise WireError("tensor holds NaN or Inf")
    return Frame(kind, tensor, codec.name, bytes(session), seq, part, tuple(shape))


# -- fast paths for int64 payloads (SLIP's masked products: one frame per linear group and decode step) ----------

INT64_WIRE_ID = get_codec("int64").wire_id


def int64_frame(kind: FrameKind, payload: bytes, elements: int, *, session: bytes, seq: int, part: int = 0) -> bytes:
    """The bytes of a frame carrying a 1-D int64 tensor of `elements` values whose little-endian bytes are
    `payload` (what `encode_frame` makes of it, without building a tensor)."""
    if len(payload) != 8 * elements or len(session) != SESSION_BYTES or not 0 <= seq < 2**32:
        raise WireError("int64 frame: payload, session or sequence number out of range")
    return _FIXED.pack(MAGIC, WIRE_VERSION, int(kind), INT64_WIRE_ID, 1, part, 0, session, seq) \
        + struct.pack("<I", elements) + payload


def int64_result(data: bytes | bytearray, shape: tuple[int, ...], *, session: bytes, seq: int):
    """The int64 array of `shape` a RESULT frame carries, when `data` is exactly such a frame for this session and
    sequence number; None for anything else (the caller then decodes it the general way, for its error)."""
    import numpy as np

    ndim = len(shape)
    header = HEADER_FIXED_BYTES + 4 * ndim
    if len(data) != header + 8 * math.prod(shape):
        return None
    magic, version, kind, codec_id, got_ndim, _part, _flags, got_session, got_seq = _FIXED.unpack_from(data, 0)
    if (magic, version, kind, codec_id, got_ndim, got_seq) != (MAGIC, WIRE_VERSION, FrameKind.RESULT, INT64_WIRE_ID,
                                                               ndim, seq) or got_session != session:
        return None
    if struct.unpack_from(f"<{ndim}I", data, HEADER_FIXED_BYTES) != tuple(shape):
        return None
    return np.frombuffer(data, dtype="<i8", offset=header).reshape(shape)
