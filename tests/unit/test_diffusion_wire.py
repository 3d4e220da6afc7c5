"""Diffusion wire codecs: int8 affine quantisation round-trips within half a step, float codecs as the frames do,
and malformed int8 payloads are refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitveil.core.errors import ConfigError, WireError
from splitveil.diffusion.wire import (DIFFUSION_WIRES, check_wire, dequantise_int8, from_wire, quantise_int8,
                                      round_trip, to_wire, wire_shape)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 3), width=st.integers(1, 40), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 1000))
def test_int8_round_trip_within_half_a_step(rows, width, scale, seed):
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * scale
    packed = quantise_int8(x)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, 8 + width)
    back = dequantise_int8(packed, tuple(x.shape))
    step = (x.max(1).values - x.min(1).values) / 255
    assert bool(((back - x).abs() <= step[:, None] / 2 + 1e-5 * scale).all())


def test_constant_rows_and_shapes():
    x = torch.full((2, 3, 4, 4), 1.5)
    assert torch.equal(round_trip(x, "int8"), x)
    assert wire_shape((2, 3, 4, 4), "int8") == (2, 8 + 48)


@pytest.mark.parametrize("wire", DIFFUSION_WIRES)
def test_every_wire_round_trips(wire):
    x = torch.randn(2, 4, 3)
    back = from_wire(to_wire(x, wire), wire, tuple(x.shape)) if wire != "int8" else round_trip(x, wire)
    tolerance = {"fp32": 0, "fp16": 1e-3, "bf16": 1e-2, "int8": 0.05}[wire]
    assert float((back - x).abs().max()) <= tolerance * float(x.abs().max()) + 1e-7


def test_bad_int8_payloads_are_refused():
    packed = quantise_int8(torch.randn(1, 5))
    with pytest.raises(WireError):
        dequantise_int8(packed, (1, 6))
    broken = packed.clone()
    broken[0, 4:8] = torch.tensor([0, 0, 192, 127], dtype=torch.uint8)  # step = NaN
    with pytest.raises(WireError):
        dequantise_int8(broken, (1, 5))
    with pytest.raises(ConfigError):
        check_wire("int4")
