"""Fuzzing `decode_frame`: for any bytes it returns a Frame or raises WireError, and nothing else.

Three generators: structured headers over every field's whole range (hypothesis shrinks these well), the service
fuzzer's hostile categories (`harness/fuzz_service.py`, the same messages the server gets), and raw bytes.
A returned Frame must agree with its header and payload (shape, element count, finite floats).
"""

import math
import random
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitveil.core.errors import WireError
from splitveil.harness.fuzz_service import CATEGORIES, HEADER, Target, float_payload, raw_frame, valid_forward
from splitveil.wire.codecs import FLOAT_CODECS, codec_for_wire_id
from splitveil.wire.frame import HEADER_FIXED_BYTES, NO_SESSION, Frame, FrameKind, decode_frame, encode_frame

LIMIT = 64 * 1024  # a small frame limit keeps every example cheap; the checks are the same at any limit
FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

uint32 = st.integers(0, 2**32 - 1)
dims = st.one_of(st.sampled_from([0, 1, 2, 3, 32, 576, 2**16, 2**31 - 1, 2**31, 2**32 - 1]), uint32)
shapes = st.one_of(st.lists(dims, max_size=6), st.lists(st.sampled_from([0, 1, 2**31, 2**32 - 1]), min_size=2, max_size=4))


def check(data: bytes, *, max_bytes: int = LIMIT) -> Frame | None:
    """The property: a Frame consistent with the bytes, or WireError with a one-line message."""
    try:
        frame = decode_frame(data, max_bytes=max_bytes)
    except WireError as error:
        assert error.message and "\n" not in error.message
        return None
    assert len(data) <= max_bytes
    magic, version, kind, codec_id, ndim, part, _flags, session, seq = HEADER.unpack_from(data, 0)
    codec = codec_for_wire_id(codec_id)
    assert (frame.kind, frame.codec, frame.part, frame.session, frame.seq) == (FrameKind(kind), codec.name, part, session, seq)
    assert len(frame.shape) == ndim
    if frame.tensor is None:
        assert ndim == 0 and len(data) == HEADER_FIXED_BYTES
    else:
        assert tuple(frame.tensor.shape) == frame.shape
        assert math.prod(frame.shape) * codec.bytes_per_element == len(data) - HEADER_FIXED_BYTES - 4 * ndim
        if codec.name in FLOAT_CODECS:
            assert bool(torch.isfinite(frame.tensor).all())
    return frame


def _field(valid: list[int]):
    """Mostly a valid value (so that decoding gets deep), sometimes any byte."""
    return st.one_of(st.sampled_from(valid), st.integers(0, 255))


@FUZZ
@given(kind=_field([k.value for k in FrameKind]), codec=_field([1, 2, 3, 4, 5]), ndim=st.one_of(st.none(), st.integers(0, 255)),
       part=st.integers(0, 255), flags=st.integers(0, 255), version=st.sampled_from([1, 1, 1, 1, 0, 2, 255]),
       magic=st.sampled_from([b"SV"] * 6 + [b"VS", b"\0\0"]), session=st.binary(min_size=16, max_size=16), seq=uint32,
       shape=shapes, data=st.data())
def test_structured_headers_decode_or_raise_wire_error(kind, codec, ndim, part, flags, version, magic, session, seq, shape, data):
    size = math.prod(shape) * (codec_for_wire_id(codec).bytes_per_element if 1 <= codec <= 5 else 4)
    exact = [st.just(bytes(size))] if size <= 4096 else []
    payload = data.draw(st.one_of(st.binary(max_size=64), *exact), label="payload")
    check(raw_frame(kind=kind, codec=codec, ndim=ndim, part=part, flags=flags, version=version, magic=magic, session=session,
                    seq=seq, shape=tuple(shape), payload=payload))


@FUZZ
@given(category=st.sampled_from([n for n in CATEGORIES.names() if CATEGORIES.get(n).transport == "websocket"]),
       rng=st.randoms(use_true_random=False), session=st.binary(min_size=16, max_size=16), seq=st.integers(0, 1000),
       hidden=st.sampled_from([1, 8, 32, 576]))
def test_hostile_categories_decode_or_raise_wire_error(category, rng, session, seq, hidden):
    target = Target(session=session, seq=seq, hidden=hidden, max_frame_bytes=LIMIT, foreign=bytes(16))
    for message in CATEGORIES.get(category).generate(rng, target):
        if isinstance(message, bytes):
            check(message)


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_decode_or_raise_wire_error(data):
    check(data)


@FUZZ
@given(rng=st.randoms(use_true_random=False), flips=st.integers(1, 8), codec=st.sampled_from(FLOAT_CODECS))
def test_bit_flips_of_valid_frames(rng, flips, codec):
    frame = bytearray(valid_forward(rng, Target(session=rng.randbytes(16), hidden=16), codec=codec))
    for _ in range(flips):
        frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
    check(bytes(frame))


@settings(max_examples=300, deadline=None, database=None)
@given(codec=st.sampled_from(FLOAT_CODECS), positions=st.integers(1, 4), session=st.binary(min_size=16, max_size=16),
       seq=uint32, cut=st.data())
def test_valid_frames_round_trip_and_every_truncation_is_refused(codec, positions, session, seq, cut):
    values = torch.randn(1, positions, 8)
    data = encode_frame(Frame(FrameKind.FORWARD, values, codec=codec, session=session, seq=seq, part=1))
    frame = check(data)
    assert frame is not None and frame.shape == (1, positions, 8)
    assert encode_frame(frame) == data
    end = cut.draw(st.integers(0, len(data) - 1))
    with pytest.raises(WireError):
        decode_frame(data[:end], max_bytes=LIMIT)


NONFINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("codec", FLOAT_CODECS)
@pytest.mark.parametrize("value", NONFINITE + [65520.0, 1e38])
def test_nonfinite_values_are_refused_in_every_float_codec(codec, value):
    """NaN and Inf are refused; so is a value that only becomes Inf on the wire (fp16 overflow of 65520 or 1e38)."""
    values = torch.zeros(1, 2, 8)
    values[0, 1, 3] = value
    data = raw_frame(session=bytes(range(16)), codec={"fp32": 1, "fp16": 2, "bf16": 3}[codec], shape=(1, 2, 8),
                     payload=float_payload(values.numpy(), codec))
    wire_value = decode_frame(data, finite=False).tensor[0, 1, 3].item()
    if math.isfinite(wire_value):
        assert check(data) is not None
    else:
        with pytest.raises(WireError, match="NaN or Inf"):
            decode_frame(data)


# Hostile frames found by hand or by the fuzzers, kept as regressions (hex of the whole frame).
REGRESSIONS = {
    "zero dimension, huge others, fp32 (issue 12 item 4)": raw_frame(shape=(0, 2**32 - 1, 2**32 - 1)),
    "zero dimension, huge others, fp16": raw_frame(codec=2, shape=(2**31, 0, 576)),
    "zero dimension, huge others, int64 (issue 12 item 4)": raw_frame(codec=4, shape=(2**32 - 1, 0, 2**32 - 1, 2**32 - 1)),
    "zero dimension, huge others, uint8": raw_frame(codec=5, shape=(0, 2**32 - 1)),
    "product overflowing 64 bits": raw_frame(shape=(2**32 - 1,) * 4, payload=bytes(16)),
    "ndim 255 with no dimensions": raw_frame(ndim=255),
    "ndim 5 with five dimensions": raw_frame(shape=(1, 1, 1, 1, 1), payload=bytes(4)),
    "header only, shape cut": raw_frame(shape=(1, 1, 8))[: HEADER_FIXED_BYTES + 5],
    "empty message": b"",
    "OPEN with a payload": raw_frame(kind=FrameKind.OPEN, payload=b"x"),
}


MAY_DECODE = {"zero dimension, huge others, fp16", "zero dimension, huge others, uint8"}  # an empty tensor is a Frame


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_known_hostile_frames_decode_or_raise_wire_error(name):
    frame = check(REGRESSIONS[name])
    assert frame is None or name in MAY_DECODE


def test_the_property_fails_on_a_foreign_exception(monkeypatch):
    """`check` is not vacuous: a decoder that raised anything but WireError (issue 12 item 4) would fail it."""
    def broken(data, **_):
        raise RuntimeError("stands for a decoder that allocates from an absurd shape")

    monkeypatch.setattr(sys.modules[__name__], "decode_frame", broken)
    with pytest.raises(RuntimeError):
        check(REGRESSIONS["zero dimension, huge others, fp32 (issue 12 item 4)"])


def test_a_valid_frame_passes_the_property():
    frame = check(valid_forward(random.Random(0), Target(session=bytes(range(16)), hidden=8), codec="fp32", positions=2))
    assert frame is not None and frame.shape == (1, 2, 8) and frame.session == bytes(range(16)) != NO_SESSION
