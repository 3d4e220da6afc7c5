"""SSIM / PSNR / MSE, distance correlation and MINE on inputs with known answers."""

import math

import pytest
import torch

from splitveil.metrics.image import distance_correlation, gaussian_window, mse, psnr, ssim, ssim_per_image
from splitveil.metrics.mine import dv_bound, mine_estimate


def test_ssim_of_identical_images_is_one_and_of_noise_is_lower():
    x = torch.rand(3, 1, 28, 28)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert ssim(x, noisy) < 0.9
    assert ssim(x, noisy) == pytest.approx(ssim(noisy, x), abs=1e-6)


def test_ssim_matches_scikit_image_reference():
    from skimage.metrics import structural_similarity

    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    ours = ssim_per_image(x, y, window=11)  # skimage's Gaussian window at sigma 1.5 has 11 taps
    reference = [structural_similarity(x[i, 0].double().numpy(), y[i, 0].double().numpy(), gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False, data_range=1.0) for i in range(4)]
    assert torch.allclose(ours.double(), torch.tensor(reference), atol=1e-5)


def test_ssim_of_a_constant_shift_follows_the_luminance_term():
    x = torch.full((1, 1, 16, 16), 0.5)
    y = torch.full((1, 1, 16, 16), 0.3)
    c1 = 0.01**2
    assert ssim(x, y) == pytest.approx((2 * 0.5 * 0.3 + c1) / (0.25 + 0.09 + c1), rel=1e-5)


def test_gaussian_window_is_normalised_and_symmetric():
    g = gaussian_window(7, 1.5)
    assert float(g.sum()) == pytest.approx(1.0) and torch.allclose(g, g.flip(0))


def test_psnr_and_mse_known_values():
    x = torch.zeros(2, 1, 4, 4)
    y = torch.full((2, 1, 4, 4), 0.1)
    assert mse(x, y) == pytest.approx(0.01)
    assert psnr(x, y) == pytest.approx(20.0, rel=1e-5)
    assert psnr(x, x) == 100.0


def test_distance_correlation_of_x_with_itself_is_one_and_of_independent_samples_near_zero():
    torch.manual_seed(0)
    a = torch.randn(400, 5)
    assert distance_correlation(a, a) == pytest.approx(1.0, abs=1e-6)
    assert distance_correlation(a, 3 * a + 1) == pytest.approx(1.0, abs=1e-6)
    assert distance_correlation(a, torch.randn(400, 5)) < 0.06
    # high-dimensional independent data: the V-statistic is biased, the bias-corrected one is not
    x, z = torch.rand(200, 1, 16, 16), torch.rand(200, 8, 16, 16)
    assert abs(distance_correlation(x, z, bias_corrected=True)) < 0.05
    assert distance_correlation(x, x.repeat(1, 3, 1, 1) ** 2, bias_corrected=True) > 0.9


def test_dv_bound_is_zero_when_joint_and_marginal_scores_agree():
    t = torch.randn(100)
    assert float(dv_bound(t, t)) <= 1e-6  # mean <= log mean exp (Jensen)
    assert float(dv_bound(torch.zeros(10), torch.zeros(10))) == pytest.approx(0.0, abs=1e-6)


def test_mine_ranks_dependent_pairs_above_independent_ones():
    from splitveil.data.images import load_dataset

    x = load_dataset("digits").images[:400]
    dependent = mine_estimate(x, torch.cat([x, x ** 2], 1), steps=80, lr=2e-3, seed=0)
    independent = mine_estimate(x, torch.rand(400, 2, 8, 8), steps=80, lr=2e-3, seed=0)
    assert dependent > 1.0 > 0.3 > independent
    assert math.isfinite(dependent)
