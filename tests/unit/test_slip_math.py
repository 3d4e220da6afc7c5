"""SLIP's pure parts: SVD split, ring arithmetic, masks, mask pool, Freivalds."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from splitveil.core.errors import ConfigError
from splitveil.protect.slip.decompose import choose_rank, conv_as_matmul, decompose, group_linears, residual_model_
from splitveil.protect.slip.errors import FixedPointOverflow, MaskPoolEmpty, MaskReuseError
from splitveil.protect.slip.fixedpoint import (
    FixedPoint,
    RingWeight,
    float64_to_wire,
    high_bits,
    ring_matmul,
    uniform_ring,
    wire_to_float64,
)
from splitveil.protect.slip.freivalds import FreivaldsCheck
from splitveil.protect.slip.pool import MaskPool


def test_decompose_sums_to_the_weight_and_keeps_the_top_components():
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    part = decompose(w, rank=5)
    assert part.rank == 5 and part.left.shape == (40, 5) and part.right.shape == (5, 24)
    assert torch.allclose(part.secure_weight() + part.residual, w, atol=1e-5)
    s = torch.linalg.svdvals(w.double())
    residual_s = torch.linalg.svdvals(part.residual.double())
    assert torch.allclose(residual_s[:19], s[5:], atol=1e-4)  # the residual holds exactly the tail of the spectrum
    assert part.secure_macs_per_row() == 5 * (40 + 24)


def test_rank_zero_is_the_weight_bit_for_bit():
    w = torch.randn(8, 6)
    part = decompose(w, rank=0)
    assert part.rank == 0 and torch.equal(part.residual, w)


def test_rank_by_energy_and_bad_choices():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squared: 16, 4, 1, 1 of 22
    assert choose_rank(s, energy=0.7) == 1 and choose_rank(s, energy=0.9) == 2 and choose_rank(s, energy=1.0) == 4
    assert choose_rank(s, rank=10) == 4 and choose_rank(s, energy=0.0) == 0
    with pytest.raises(ConfigError):
        choose_rank(s, rank=1, energy=0.5)
    with pytest.raises(ConfigError):
        choose_rank(s, rank=-1)


def test_conv_as_matrix_product_equals_the_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2)
    x = torch.randn(2, 3, 9, 7)
    assert torch.allclose(conv_as_matmul(conv, x), conv(x), atol=1e-5)
    part = decompose(conv.weight.reshape(5, -1), rank=2)
    split = conv_as_matmul(conv, x, part.residual) + conv_as_matmul(conv, x, part.secure_weight()) - conv.bias[:, None, None]
    assert torch.allclose(split, conv(x), atol=1e-5)


def test_residual_model_removes_the_top_components_of_every_layer():
    from splitveil.models.vision_zoo import build_vision_model

    model = build_vision_model("lenet", (1, 28, 28), 10)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    ranks = residual_model_(model, rank=2)
    assert set(ranks) == set(before) and all(r == 2 for r in ranks.values())
    for name, module in model.named_modules():
        if name in before:
            assert not torch.equal(module.weight, before[name])


def test_linears_reading_one_input_are_grouped():
    layer = nn.Module()
    layer.attn = nn.Module()
    for name, out in (("q_proj", 8), ("k_proj", 4), ("v_proj", 4), ("o_proj", 8)):
        setattr(layer.attn, name, nn.Linear(8, out))
    named = [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    groups = group_linears(named)
    assert [[n for n, _ in g] for g in groups] == [["attn.q_proj", "attn.k_proj", "attn.v_proj"], ["attn.o_proj"]]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.integers(1, 7), st.integers(0, 2**32 - 1), st.integers(1, 30))
def test_ring_products_equal_integer_arithmetic_mod_2_64(rows, n, m, seed, weight_bits):
    rng = np.random.default_rng(seed)
    x = uniform_ring((rows, n), generator=rng)
    w = torch.from_numpy(rng.integers(-(2**weight_bits), 2**weight_bits, size=(m, n), dtype=np.int64))
    expected = [[(sum(int(a) * int(b) for a, b in zip(x[i].tolist(), w[j].tolist())) + 2**63) % 2**64 - 2**63
                 for j in range(m)] for i in range(rows)]
    assert ring_matmul(x, w).tolist() == expected
    assert RingWeight(w).matmul(x).tolist() == expected  # the float64-limb path is exact too


def test_a_mapped_ring_weight_gives_the_encoded_weights_products_without_a_copy():
    """`RingWeight.mapped` (what a large bundle's executor and dealer hold: the file's float32 pages, encoded per
    block) multiplies bit for bit like the ring weight of `FixedPoint.encode_w`."""
    torch.manual_seed(3)
    fp = FixedPoint()
    w = torch.randn(2 * RingWeight.COMPACT_ROWS + 5, 48) * 0.05  # three blocks, the last a short one
    x = uniform_ring((3, 48))
    reference = RingWeight(fp.encode_w(w))
    mapped = RingWeight.mapped(w, fp.frac_bits_w)
    assert mapped.raw is w and mapped.float32 is None and mapped.float64 is None  # held as given
    assert mapped.largest == reference.largest and mapped.limb_bits == reference.limb_bits
    assert torch.equal(mapped.matmul(x), reference.matmul(x))
    s = uniform_ring((2, w.shape[0]))
    assert torch.equal(mapped.left_matmul(s), reference.left_matmul(s))
    assert torch.equal(mapped.to_int64(), fp.encode_w(w)) and mapped.row_norm() == reference.row_norm()


def test_fixed_point_round_trip_and_overflow():
    fp = FixedPoint(16, 20)
    x = torch.tensor([[0.5, -1.25, 3.0]])
    w = torch.tensor([[0.25, 0.5, -0.125]])
    y = fp.decode_product(ring_matmul(fp.encode_x(x), fp.encode_w(w)))
    assert torch.allclose(y, x @ w.t(), atol=1e-5)
    with pytest.raises(FixedPointOverflow):
        fp.check_product_fits(torch.full((1, 4), 2.0**26), 1.0)
    with pytest.raises(FixedPointOverflow):
        FixedPoint(40, 30)


def test_masked_ring_values_are_uniform_whatever_the_input():
    from scipy.stats import chisquare

    rng = np.random.default_rng(1)
    for x in (torch.zeros(4000, dtype=torch.int64), torch.full((4000,), 123456789, dtype=torch.int64)):
        masked = x + uniform_ring((4000,), generator=rng)
        counts = torch.bincount(high_bits(masked, 4), minlength=16).numpy()
        assert chisquare(counts).pvalue > 1e-3


def test_float64_travels_bit_for_bit_as_int64():
    values = torch.tensor([1.0, -2.5e300, 3.14159, 0.0], dtype=torch.float64)
    assert torch.equal(wire_to_float64(float64_to_wire(values)), values)


def pool(n=3, m=2, **options):
    w = torch.arange(m * n, dtype=torch.int64).reshape(m, n)
    rng = np.random.default_rng(0)
    return MaskPool(sample=lambda c: uniform_ring((c, n), generator=rng), deal=lambda r: ring_matmul(r, w), ring=True, **options), w


def test_a_mask_is_never_used_twice():
    masks_pool, w = pool()
    masks_pool.refill(4)
    masks = masks_pool.take(2)
    x = torch.ones(2, 3, dtype=torch.int64)
    sent = masks.mask(x)
    with pytest.raises(MaskReuseError):
        masks.mask(x + 1)  # a second input under the same r would reveal the difference
    assert torch.equal(masks.unmask(ring_matmul(sent, w)), ring_matmul(x, w))
    with pytest.raises(MaskReuseError):
        masks.unmask(ring_matmul(sent, w))
    later = masks_pool.take(2)
    assert list(later.serials) == [2, 3] and not torch.equal(later.r, masks.r)


def test_unmask_before_mask_and_empty_pool_are_refused():
    masks_pool, _ = pool(auto_refill=False)
    with pytest.raises(MaskPoolEmpty):
        masks_pool.take(1)
    masks_pool.refill(1)
    with pytest.raises(MaskReuseError):
        masks_pool.take(1).unmask(torch.zeros(1, 2, dtype=torch.int64))


@pytest.mark.parametrize("ring", [True, False])
def test_freivalds_catches_every_corrupted_reply(ring):
    rng = np.random.default_rng(2)
    if ring:
        w = torch.from_numpy(rng.integers(-(2**20), 2**20, size=(16, 12), dtype=np.int64))
        x = uniform_ring((3, 12), generator=rng)
        y = ring_matmul(x, w)
    else:
        w = torch.from_numpy(rng.standard_normal((16, 12)))
        x = torch.from_numpy(rng.uniform(-2**24, 2**24, size=(3, 12)))
        y = x @ w.t()
    check = FreivaldsCheck(w, repetitions=16, generator=rng)  # worst case passes with p <= 2^-16
    assert check.verify(x, y)
    for trial in range(200):
        bad = y.clone()
        row, col = trial % 3, (trial * 7) % 16
        if ring:
            bad[row, col] += [1, 2**40, 2**63, int(rng.integers(1, 2**62))][trial % 4]  # incl. the worst case 2^63
        else:
            bad[row, col] += float(rng.standard_normal()) * abs(float(y[row, col])) * 1e-6 + 1e-3
        assert not check.verify(x, bad)
