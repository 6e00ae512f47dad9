"""Image-quality metrics: MSE, PSNR and SSIM, per item, for 1-D signals and 2-D images.

Inputs are batches, (N, C, H, W) images or (N, C, L) signals; every function returns one
value per item, shape (N,), averaged over channels (and pixels). ``data_range`` is the span
of values a perfect signal can take (1 for images in [0, 1]).

    MSE  = mean (x - y)^2
    PSNR = 10 log10(data_range^2 / MSE)                         (+inf for identical inputs)
    SSIM = mean over valid window positions of
           (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),

with Wang et al.'s (2004) choices: local means, variances and covariance weighted by a
Gaussian window (sigma 1.5, 11 taps, normalised to sum one; the 1-D window for signals),
C1 = (0.01 data_range)^2, C2 = (0.03 data_range)^2, and only the positions where the window
lies wholly inside the image (no padding). The variances are the window-weighted population
ones, E_w[x^2] - E_w[x]^2, as in the paper (not the sample-corrected form).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mse", "psnr", "ssim", "gaussian_window"]

K1, K2 = 0.01, 0.03
WINDOW_SIGMA = 1.5
WINDOW_SIZE = 11


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"the two inputs differ in shape: {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() not in (3, 4):
        raise ValueError(f"expected (N, C, L) signals or (N, C, H, W) images, got {x.dim()}-D")


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) mean squared error per item."""
    _check_pair(x, y)
    return (x - y).pow(2).flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """(N,) peak signal-to-noise ratio in dB per item; +inf where the inputs are equal."""
    return 10 * torch.log10(data_range**2 / mse(x, y))


def gaussian_window(size: int = WINDOW_SIZE, sigma: float = WINDOW_SIGMA, dtype=torch.float64) -> torch.Tensor:
    """(size,) normalised 1-D Gaussian; the 2-D window is its outer product (separable)."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(offsets**2) / (2 * sigma**2))
    return (w / w.sum()).to(dtype)


def _local_mean(z: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Window-weighted mean over every valid position, channel by channel (depthwise)."""
    c = z.shape[1]
    if z.dim() == 3:
        return F.conv1d(z, window.view(1, 1, -1).expand(c, 1, -1), groups=c)
    z = F.conv2d(z, window.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(z, window.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = WINDOW_SIZE,
    sigma: float = WINDOW_SIGMA,
) -> torch.Tensor:
    """(N,) structural similarity per item (see the module docstring); 1 for identical
    inputs. Every spatial dimension must be at least ``window_size``."""
    _check_pair(x, y)
    if min(x.shape[2:]) < window_size:
        raise ValueError(f"SSIM needs every side >= the window ({window_size}), got {tuple(x.shape[2:])}")
    # Computed in float64 at least: E[x^2] - E[x]^2 cancels badly in float32 for flat areas.
    dtype = torch.promote_types(x.dtype, torch.float64)
    x, y = x.to(dtype), y.to(dtype)
    window = gaussian_window(window_size, sigma, dtype).to(x.device)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mu_x, mu_y = _local_mean(x, window), _local_mean(y, window)
    var_x = _local_mean(x * x, window) - mu_x**2
    var_y = _local_mean(y * y, window) - mu_y**2
    cov = _local_mean(x * y, window) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)

