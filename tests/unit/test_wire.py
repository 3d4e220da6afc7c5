"""Wire format: codecs round-trip, frames round-trip, and decode_frame refuses every malformed frame with a reason."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitveil.core.errors import ConfigError, WireError
from splitveil.wire.codecs import CODECS, FLOAT_CODECS, codec_for_wire_id, get_codec
from splitveil.wire.frame import (
    HEADER_FIXED_BYTES,
    MAGIC,
    MAX_FRAME_BYTES,
    MAX_NDIM,
    NO_SESSION,
    WIRE_VERSION,
    Frame,
    FrameKind,
    decode_frame,
    encode_frame,
    error_frame,
)

torch.set_num_threads(1)

_FIXED = struct.Struct("<2sBBBBBB16sI")
SESSION = bytes(range(1, 17))


def raw_frame(*, magic=MAGIC, version=WIRE_VERSION, kind=int(FrameKind.FORWARD), codec=1, ndim=None, part=0,
              session=SESSION, seq=0, shape=(1, 2, 3), payload=None) -> bytes:
    """Builds frame bytes by hand, so every header field can be made wrong independently of encode_frame."""
    if ndim is None:
        ndim = len(shape)
    if payload is None:
        payload = np.zeros(math.prod(shape), dtype="<f4").tobytes() if shape else b""
    return _FIXED.pack(magic, version, kind, codec, ndim, part, 0, session, seq) + struct.pack(f"<{len(shape)}I", *shape) + payload


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# --------------------------------------------------------------------------------------------------------- codecs


def test_codec_registry_and_wire_ids():
    assert sorted(CODECS) == ["bf16", "fp16", "fp32", "int64", "uint8"]
    expected = {"fp32": (1, 4), "fp16": (2, 2), "bf16": (3, 2), "int64": (4, 8), "uint8": (5, 1)}
    for name, (wire_id, size) in expected.items():
        codec = get_codec(name)
        assert codec.wire_id == wire_id
        assert codec.bytes_per_element == size
        assert codec_for_wire_id(wire_id) is codec
    assert FLOAT_CODECS == ("fp32", "fp16", "bf16")


def test_unknown_codec_name_and_id():
    with pytest.raises(ConfigError, match="fp8"):
        get_codec("fp8")
    with pytest.raises(WireError, match="unknown codec id 99"):
        codec_for_wire_id(99)


def test_fp32_round_trip_is_exact():
    codec = get_codec("fp32")
    x = torch.cat([randn(1000, scale=1e3), torch.tensor([0.0, -0.0, 1e-40, -3.4e38, 3.4e38, 1.1754944e-38])])
    payload = codec.encode(x)
    assert len(payload) == 4 * x.numel()
    assert payload == x.numpy().astype("<f4").tobytes()  # little-endian, C order
    y = codec.decode(payload, tuple(x.shape))
    assert y.dtype == torch.float32
    assert torch.equal(y, x)
    assert torch.equal(torch.signbit(y), torch.signbit(x))  # -0.0 survives


def test_fp32_round_trip_non_contiguous_and_multi_dim():
    codec = get_codec("fp32")
    x = randn(3, 4, 5).transpose(0, 2)  # non-contiguous view
    y = codec.decode(codec.encode(x), tuple(x.shape))
    assert torch.equal(y, x)


@pytest.mark.parametrize(
    "name, torch_dtype, mantissa_bits",
    [("fp16", torch.float16, 10), ("bf16", torch.bfloat16, 7)],
)
def test_half_codecs_round_to_nearest_within_precision(name, torch_dtype, mantissa_bits):
    codec = get_codec(name)
    # magnitudes well inside fp16's normal range (6.1e-5 .. 65504) so the relative bound holds for both codecs
    x = torch.sign(randn(20000, seed=1)) * torch.exp(torch.empty(20000).uniform_(math.log(1e-3), math.log(1e3), generator=torch.Generator().manual_seed(2)))
    payload = codec.encode(x)
    assert len(payload) == 2 * x.numel()
    y = codec.decode(payload, tuple(x.shape))
    assert y.dtype == torch.float32
    # exactly what a cast to the half type gives (round to nearest even)
    assert torch.equal(y, x.to(torch_dtype).to(torch.float32))
    relative = ((y - x).abs() / x.abs()).max().item()
    unit_roundoff = 2.0 ** -(mantissa_bits + 1)  # fp16: 2^-11, bf16: 2^-8
    assert relative <= unit_roundoff
    # ... and the codec really quantizes to that precision (not finer, not coarser)
    assert relative > unit_roundoff / 2
    # representable values survive exactly
    exact = torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0, -0.25, 96.0])
    assert torch.equal(codec.decode(codec.encode(exact), (7,)), exact)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_bf16_keeps_fp32_range_and_fp16_does_not():
    big = torch.tensor([1e30, -1e30, 70000.0])
    bf16 = get_codec("bf16")
    y = bf16.decode(bf16.encode(big), (3,))
    assert torch.isfinite(y).all()
    assert torch.allclose(y, big, rtol=2**-8)
    fp16 = get_codec("fp16")
    assert torch.isinf(fp16.decode(fp16.encode(big), (3,))).all()


def test_bf16_wire_bits_are_the_top_16_bits():
    codec = get_codec("bf16")
    x = torch.tensor([1.0, -2.0, 0.5])  # exactly representable: bf16 bits = upper half of fp32 bits
    words = np.frombuffer(codec.encode(x), dtype="<u2")
    upper = (x.numpy().view("<u4") >> 16).astype("<u2")
    assert np.array_equal(words, upper)


def test_int64_round_trip_is_exact():
    codec = get_codec("int64")
    x = torch.tensor([[0, 1, -1, 2**62, -(2**63), 2**63 - 1, 100]], dtype=torch.int64)
    payload = codec.encode(x)
    assert len(payload) == 8 * x.numel()
    assert payload == x.numpy().astype("<i8").tobytes()
    y = codec.decode(payload, tuple(x.shape))
    assert y.dtype == torch.int64
    assert torch.equal(y, x)


def test_uint8_round_trip_is_exact():
    codec = get_codec("uint8")
    x = torch.arange(256, dtype=torch.uint8)
    payload = codec.encode(x)
    assert payload == bytes(range(256))
    y = codec.decode(payload, (256,))
    assert y.dtype == torch.uint8
    assert torch.equal(y, x)


def test_decoded_tensor_is_writable_and_does_not_alias_the_buffer():
    codec = get_codec("fp32")
    buffer = bytearray(codec.encode(torch.ones(4)))
    y = codec.decode(memoryview(buffer), (4,))
    y += 1  # must not raise (read-only numpy buffer) nor write into the frame
    assert torch.equal(codec.decode(bytes(buffer), (4,)), torch.ones(4))


# --------------------------------------------------------------------------------------------------------- frames


@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
def test_header_size_is_28_plus_4_per_dim(ndim):
    assert HEADER_FIXED_BYTES == 28
    shape = (2,) * ndim
    data = encode_frame(Frame(FrameKind.FORWARD, torch.zeros(shape)))
    assert len(data) == 28 + 4 * ndim + 4 * math.prod(shape)


def test_hidden_state_frame_size():
    data = encode_frame(Frame(FrameKind.FORWARD, torch.zeros(1, 1, 576), codec="fp32"))
    assert len(data) == 576 * 4 + 40
    assert len(encode_frame(Frame(FrameKind.FORWARD, torch.zeros(1, 1, 576), codec="fp16"))) == 576 * 2 + 40


def test_frame_without_tensor_is_header_only():
    data = encode_frame(Frame(FrameKind.OPEN))
    assert len(data) == 28
    assert data[:2] == b"SV"
    frame = decode_frame(data)
    assert frame.kind == FrameKind.OPEN
    assert frame.tensor is None
    assert frame.shape == ()
    assert frame.session == NO_SESSION


def test_header_layout():
    x = torch.zeros(1, 2, 3)
    data = encode_frame(Frame(FrameKind.RESULT, x, codec="fp16", session=SESSION, seq=0x01020304, part=7))
    magic, version, kind, codec, ndim, part, flags, session, seq = _FIXED.unpack_from(data)
    assert (magic, version, kind, codec, ndim, part, flags) == (b"SV", 1, 3, 2, 3, 7, 0)
    assert session == SESSION
    assert seq == 0x01020304
    assert struct.unpack_from("<3I", data, 28) == (1, 2, 3)


@pytest.mark.parametrize(
    "kind, tensor, codec",
    [
        (FrameKind.FORWARD, randn(1, 5, 32), "fp32"),
        (FrameKind.RESULT, randn(2, 3, 32, seed=3), "fp32"),
        (FrameKind.FORWARD, randn(1, 1, 576, seed=4), "fp16"),
        (FrameKind.RESULT, randn(4, seed=5), "bf16"),
        (FrameKind.FORWARD, torch.tensor([[1, 2, 3, 100]], dtype=torch.int64), "int64"),
        (FrameKind.ERROR, torch.arange(10, dtype=torch.uint8), "uint8"),
        (FrameKind.FORWARD, randn(1, 2, 3, 4, seed=6), "fp32"),
        (FrameKind.OK, None, "fp32"),
        (FrameKind.CLOSE, None, "fp32"),
    ],
)
def test_frame_round_trip(kind, tensor, codec):
    frame = Frame(kind, tensor, codec=codec, session=SESSION, seq=41, part=2)
    data = encode_frame(frame)
    for buffer in (data, bytearray(data), memoryview(data)):
        back = decode_frame(buffer)
        assert back.kind == kind
        assert back.codec == codec
        assert back.session == SESSION
        assert back.seq == 41
        assert back.part == 2
        if tensor is None:
            assert back.tensor is None
            assert back.shape == ()
        else:
            assert back.shape == tuple(tensor.shape)
            expected = tensor
            if codec == "fp16":
                expected = tensor.to(torch.float16).float()
            elif codec == "bf16":
                expected = tensor.to(torch.bfloat16).float()
            assert back.tensor.dtype == expected.dtype
            assert torch.equal(back.tensor, expected)


def test_error_frame_message_round_trip():
    frame = decode_frame(encode_frame(error_frame("bad thing — ünïcode", session=SESSION, seq=3)))
    assert frame.kind == FrameKind.ERROR
    assert frame.codec == "uint8"
    assert frame.message == "bad thing — ünïcode"
    assert (frame.session, frame.seq) == (SESSION, 3)
    assert Frame(FrameKind.OK).message == ""


def test_error_frame_message_is_capped():
    frame = decode_frame(encode_frame(error_frame("x" * 10000)))
    assert frame.message == "x" * 4096


def test_encode_rejects_unframeable():
    with pytest.raises(WireError, match="session id"):
        encode_frame(Frame(FrameKind.OPEN, session=b"short"))
    with pytest.raises(WireError, match="5 dimensions"):
        encode_frame(Frame(FrameKind.FORWARD, torch.zeros(1, 1, 1, 1, 1)))
    with pytest.raises(WireError, match="0 dimensions"):
        encode_frame(Frame(FrameKind.FORWARD, torch.tensor(1.0)))


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=MAX_NDIM).map(tuple),
    codec=st.sampled_from(FLOAT_CODECS),
    kind=st.sampled_from([FrameKind.FORWARD, FrameKind.RESULT]),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    scale=st.sampled_from([1e-3, 1.0, 100.0]),
    seq=st.integers(min_value=0, max_value=2**32 - 1),
    part=st.integers(min_value=0, max_value=255),
)
def test_frame_round_trip_property(shape, codec, kind, seed, scale, seq, part):
    tensor = randn(*shape, seed=seed, scale=scale)
    data = encode_frame(Frame(kind, tensor, codec=codec, session=SESSION, seq=seq, part=part))
    element = get_codec(codec).bytes_per_element
    assert len(data) == HEADER_FIXED_BYTES + 4 * len(shape) + element * math.prod(shape)
    back = decode_frame(data)
    assert (back.kind, back.codec, back.session, back.seq, back.part, back.shape) == (kind, codec, SESSION, seq, part, shape)
    assert back.tensor.dtype == torch.float32
    if codec == "fp32":
        assert torch.equal(back.tensor, tensor)
    else:
        half = torch.float16 if codec == "fp16" else torch.bfloat16
        assert torch.equal(back.tensor, tensor.to(half).float())
        bound = 2.0**-11 if codec == "fp16" else 2.0**-8
        # relative bound for normal numbers, plus fp16's subnormal spacing (2^-24, half of it on rounding)
        assert torch.all((back.tensor - tensor).abs() <= tensor.abs() * bound + 2.0**-25)
    # re-encoding the decoded frame reproduces the bytes exactly
    assert encode_frame(back) == data


# ------------------------------------------------------------------------------------------------ decode refusals


def test_raw_frame_helper_builds_valid_frames():
    # the refusal tests below change one field of this frame; the unchanged frame must decode
    frame = decode_frame(raw_frame())
    assert frame.kind == FrameKind.FORWARD
    assert frame.shape == (1, 2, 3)
    assert torch.equal(frame.tensor, torch.zeros(1, 2, 3))


def test_rejects_oversized_frame_before_looking_at_it():
    data = raw_frame(shape=(1, 4, 32))
    assert decode_frame(data, max_bytes=len(data)).shape == (1, 4, 32)
    with pytest.raises(WireError, match=f"frame of {len(data)} bytes exceeds the limit of {len(data) - 1}"):
        decode_frame(data, max_bytes=len(data) - 1)
    # the size check comes first: even garbage is refused for its size
    with pytest.raises(WireError, match="exceeds the limit"):
        decode_frame(b"\xff" * 100, max_bytes=50)
    with pytest.raises(WireError, match="exceeds the limit"):
        decode_frame(bytes(MAX_FRAME_BYTES + 1))


@pytest.mark.parametrize("size", [0, 1, 2, 27])
def test_rejects_short_frame(size):
    with pytest.raises(WireError, match="shorter than a header"):
        decode_frame(raw_frame()[:size])


def test_rejects_bad_magic():
    with pytest.raises(WireError, match="bad magic"):
        decode_frame(raw_frame(magic=b"XX"))
    with pytest.raises(WireError, match="bad magic"):
        decode_frame(b"\x00" * 64)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_rejects_unsupported_version(version):
    with pytest.raises(WireError, match=f"wire version {version} is not supported"):
        decode_frame(raw_frame(version=version))


@pytest.mark.parametrize("kind", [0, 8, 200])
def test_rejects_unknown_kind(kind):
    with pytest.raises(WireError, match=f"unknown frame kind {kind}"):
        decode_frame(raw_frame(kind=kind))


@pytest.mark.parametrize("codec", [0, 6, 255])
def test_rejects_unknown_codec_id(codec):
    with pytest.raises(WireError, match=f"unknown codec id {codec}"):
        decode_frame(raw_frame(codec=codec))


@pytest.mark.parametrize("ndim", [5, 255])
def test_rejects_too_many_dimensions(ndim):
    data = raw_frame(ndim=ndim, shape=(1,) * ndim, payload=b"\x00" * 4)
    with pytest.raises(WireError, match=f"{ndim} dimensions exceed the limit of 4"):
        decode_frame(data)


def test_rejects_truncated_shape():
    full = raw_frame(shape=(1, 2, 3))
    for cut in (HEADER_FIXED_BYTES + 1, HEADER_FIXED_BYTES + 4, HEADER_FIXED_BYTES + 11):
        with pytest.raises(WireError, match="truncated inside its shape"):
            decode_frame(full[:cut])


@pytest.mark.parametrize(
    "codec, shape, payload_bytes",
    [
        (1, (1, 2, 3), 6 * 4 - 1),  # one byte short
        (1, (1, 2, 3), 6 * 4 + 1),  # one byte too many
        (1, (1, 2, 3), 0),  # no payload at all
        (2, (2, 2), 4 * 4),  # fp16 shape, fp32-sized payload
        (4, (3,), 3 * 4),  # int64 shape, int32-sized payload
        (1, (0, 5), 4),  # empty shape with a payload
    ],
)
def test_rejects_payload_not_matching_shape(codec, shape, payload_bytes):
    data = raw_frame(codec=codec, shape=shape, payload=b"\x00" * payload_bytes)
    expected = math.prod(shape) * codec_for_wire_id(codec).bytes_per_element
    with pytest.raises(WireError, match=rf"needs {expected} bytes, frame carries {payload_bytes}"):
        decode_frame(data)


def test_rejects_huge_shape_without_allocating():
    # shape claims 4 x 2^32 ... elements; the check must be arithmetic, not an allocation
    data = raw_frame(shape=(2**32 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1), payload=b"\x00" * 16)
    with pytest.raises(WireError, match="frame carries 16"):
        decode_frame(data)


@pytest.mark.parametrize("codec", FLOAT_CODECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_non_finite_float_payloads(codec, bad):
    x = torch.zeros(1, 3, 8)
    x[0, 1, 5] = bad
    data = encode_frame(Frame(FrameKind.FORWARD, x, codec=codec))
    with pytest.raises(WireError, match="NaN or Inf"):
        decode_frame(data)
    # the caller can opt out (e.g. to inspect a frame)
    back = decode_frame(data, finite=False)
    assert not torch.isfinite(back.tensor[0, 1, 5])
    assert torch.isfinite(back.tensor).sum() == x.numel() - 1


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_fp16_overflow_is_caught_on_decode():
    data = encode_frame(Frame(FrameKind.FORWARD, torch.full((1, 1, 4), 1e5), codec="fp16"))
    with pytest.raises(WireError, match="NaN or Inf"):
        decode_frame(data)


def test_integer_payloads_are_not_checked_for_finiteness():
    x = torch.tensor([-1, 2**63 - 1], dtype=torch.int64)
    assert torch.equal(decode_frame(encode_frame(Frame(FrameKind.FORWARD, x, codec="int64"))).tensor, x)


def test_rejects_payload_on_frame_without_shape():
    data = raw_frame(kind=int(FrameKind.OPEN), shape=(), payload=b"\x00\x00\x00\x00")
    with pytest.raises(WireError, match="without a shape carries a payload"):
        decode_frame(data)
    assert decode_frame(raw_frame(kind=int(FrameKind.OPEN), shape=(), payload=b"")).tensor is None


def test_wire_error_messages_are_one_line():
    with pytest.raises(WireError) as info:
        decode_frame(raw_frame(magic=b"ZZ"))
    assert "\n" not in info.value.message
    assert str(info.value) == "not a splitveil frame (bad magic)"


# ------------------------------------------------------------------------------------------- hostile input, fuzzed

U32_MAX = 2**32 - 1


@pytest.mark.parametrize(
    "codec, shape",
    [
        (1, (0, U32_MAX, U32_MAX)),  # empty, but numpy cannot even describe the array
        (2, (2**31, 0, 576)),
        (1, (U32_MAX, 0)),
        (4, (0, U32_MAX, U32_MAX, U32_MAX)),
        (5, (U32_MAX, U32_MAX, 0, U32_MAX)),
    ],
)
def test_empty_shape_with_absurd_dimensions_is_a_wire_error(codec, shape):
    with pytest.raises(WireError, match="larger than any frame"):
        decode_frame(raw_frame(codec=codec, shape=shape, payload=b""))


def test_empty_shape_of_modest_size_still_decodes():
    # what the service refuses with its own message (a zero dimension) must reach it
    frame = decode_frame(raw_frame(shape=(1, 0, 32), payload=b""))
    assert frame.shape == (1, 0, 32) and frame.tensor.numel() == 0


def test_non_bytes_input_is_a_wire_error():
    for data in ("SV" + "\0" * 40, None, 12, [1, 2], memoryview(np.zeros(16, dtype="<f4"))):
        with pytest.raises(WireError):
            decode_frame(data)


def _decode_or_wire_error(data, max_bytes=MAX_FRAME_BYTES):
    try:
        frame = decode_frame(data, max_bytes=max_bytes)
    except WireError as error:
        assert error.message and "\n" not in error.message
        return None
    assert isinstance(frame, Frame)
    return frame


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=256))
def test_decode_frame_on_arbitrary_bytes_returns_a_frame_or_a_wire_error(data):
    _decode_or_wire_error(data)
    _decode_or_wire_error(MAGIC + bytes([WIRE_VERSION]) + data)  # past the magic and version checks


_VALID = [
    encode_frame(Frame(FrameKind.FORWARD, randn(1, 3, 8), session=SESSION, seq=5, part=1)),
    encode_frame(Frame(FrameKind.FORWARD, randn(2, 1, 8, seed=1), codec="bf16", session=SESSION)),
    encode_frame(Frame(FrameKind.RESULT, randn(1, 1, 4, 2, seed=2), codec="fp16")),
    encode_frame(error_frame("refused")),
    encode_frame(Frame(FrameKind.OPEN)),
]


@settings(max_examples=2000, deadline=None)
@given(
    base=st.sampled_from(_VALID),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=7)), max_size=4),
    header=st.lists(st.tuples(st.integers(min_value=0, max_value=27), st.integers(min_value=0, max_value=255)), max_size=3),
    shape=st.one_of(st.none(), st.lists(st.sampled_from([0, 1, 2, 7, 2**16, 2**31, U32_MAX]), min_size=1, max_size=MAX_NDIM)),
    drop_payload=st.booleans(),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=10**6)),
    extra=st.binary(max_size=16),
)
def test_decode_frame_on_mutated_frames_returns_a_frame_or_a_wire_error(base, flips, header, shape, drop_payload, cut, extra):
    data = bytearray(base)
    for offset, bit in flips:  # bit flips anywhere
        data[offset % len(data)] ^= 1 << bit
    for offset, value in header:  # header fields overwritten (kind, codec, ndim, ...)
        data[offset] = value
    if shape is not None:  # a new shape, absurd dimensions and zeros among them, in front of the old payload
        old_ndim = min(data[5], MAX_NDIM)
        payload = data[HEADER_FIXED_BYTES + 4 * old_ndim:]
        data[5] = len(shape)
        data = data[:HEADER_FIXED_BYTES] + struct.pack(f"<{len(shape)}I", *shape) + payload
    if drop_payload:  # header and shape only: an empty tensor if a dimension is 0
        data = data[: HEADER_FIXED_BYTES + 4 * min(data[5], MAX_NDIM)]
    if cut is not None:  # truncated
        data = data[: cut % (len(data) + 1)]
    data += extra
    for buffer in (bytes(data), bytearray(data), memoryview(bytes(data))):
        _decode_or_wire_error(buffer)
    _decode_or_wire_error(bytes(data), max_bytes=64)
