"""Pure image-reconstruction metrics on tensors [N, C, H, W] with values in [0, data_range]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mse(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error over every pixel of every image."""
    return float(F.mse_loss(x.float(), y.float()))


def psnr(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, averaged over images (each image's own MSE; capped at 100 dB)."""
    per_image = ((x.float() - y.float()) ** 2).flatten(1).mean(1)  # [N]
    values = 10 * torch.log10(data_range**2 / per_image.clamp_min(1e-10))
    return float(values.clamp_max(100.0).mean())


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian of `size` taps [size]."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def ssim_per_image(x: torch.Tensor, y: torch.Tensor, *, window: int = 7, sigma: float = 1.5,
                   data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """SSIM of each image pair [N] (Wang et al. 2004): Gaussian-weighted local statistics over the valid region,
    averaged over pixels and channels. The window shrinks to the image when the image is smaller."""
    x, y = x.double(), y.double()
    channels, height, width = x.shape[1:]
    size = min(window, height, width)
    size -= 1 - size % 2  # odd
    g = gaussian_window(size, sigma)
    kernel_h = g.view(1, 1, size, 1).repeat(channels, 1, 1, 1)  # [C, 1, size, 1]
    kernel_w = g.view(1, 1, 1, size).repeat(channels, 1, 1, 1)  # [C, 1, 1, size]

    def blur(t: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, C, H-size+1, W-size+1]
        return F.conv2d(F.conv2d(t, kernel_h, groups=channels), kernel_w, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1).float()


def ssim(x: torch.Tensor, y: torch.Tensor, **kwargs) -> float:
    """Mean SSIM over image pairs; see `ssim_per_image` for the options."""
    return float(ssim_per_image(x, y, **kwargs).mean())


def _pairwise_distances(t: torch.Tensor) -> torch.Tensor:
    """[n, d] -> [n, n] Euclidean distances (eps inside the square root, as in SiftFunnel's dCor)."""
    squared = (t * t).sum(1)
    gram = squared.unsqueeze(1) + squared.unsqueeze(0) - 2 * t @ t.T
    return torch.sqrt(gram.clamp_min(0) + 1e-10)


def _double_centred(d: torch.Tensor) -> torch.Tensor:
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def _u_centred(d: torch.Tensor) -> torch.Tensor:
    """U-centring (Székely & Rizzo 2014): unbiased for dCov², zero diagonal."""
    n = len(d)
    centred = d - d.sum(0, keepdim=True) / (n - 2) - d.sum(1, keepdim=True) / (n - 2) + d.sum() / ((n - 1) * (n - 2))
    return centred.fill_diagonal_(0.0)


def distance_correlation(x: torch.Tensor, z: torch.Tensor, *, bias_corrected: bool = False) -> float:
    """Squared distance correlation dCor²(X, Z) of paired samples (first axis; the rest is flattened).

    Default (as in NoPeek and SiftFunnel): dCov²(X, Z) = mean(A * B) of the double-centred distance matrices and
    dCor² = dCov²(X, Z) / sqrt(dCov²(X, X) dCov²(Z, Z)); 1 when Z is a similarity transform of X, near 0 for
    independent low-dimensional samples. In high dimension this V-statistic is biased towards 1 even for independent
    samples; `bias_corrected` uses U-centred matrices instead (needs n > 3; may dip slightly below 0).
    """
    centre = _u_centred if bias_corrected else _double_centred
    if bias_corrected and len(x) < 4:
        raise ValueError("the bias-corrected distance correlation needs at least 4 samples")
    a = centre(_pairwise_distances(x.flatten(1).double()))
    b = centre(_pairwise_distances(z.flatten(1).double()))
    dcov_xz, dcov_xx, dcov_zz = (a * b).sum(), (a * a).sum(), (b * b).sum()
    denominator = math.sqrt(float(dcov_xx * dcov_zz))
    return float(dcov_xz / denominator) if denominator > 0 else 0.0
