"""Frames (versioned header + raw little-endian tensor bytes, never pickle) and tensor codecs."""

from splitveil.wire.codecs import CODECS, Codec, get_codec
from splitveil.wire.frame import HEADER_FIXED_BYTES, MAX_FRAME_BYTES, Frame, FrameKind, decode_frame, encode_frame

__all__ = [
    "CODECS",
    "Codec",
    "get_codec",
    "Frame",
    "FrameKind",
    "encode_frame",
    "decode_frame",
    "HEADER_FIXED_BYTES",
    "MAX_FRAME_BYTES",
]
