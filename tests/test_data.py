"""coordgate_ext.data: the 1-D and 2-D generators (shapes, ranges, seeds), the PSF field
(it really varies over the field), the weight maps and the noise model."""

from __future__ import annotations

import math

import pytest
import torch

from coordgate_ext import data


def _moments(psf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid (2,) and covariance (2, 2) of a non-negative (kh, kw) PSF, in (row, col)."""
    kh, kw = psf.shape
    u = torch.arange(kh, dtype=torch.float64)[:, None].expand(kh, kw)
    v = torch.arange(kw, dtype=torch.float64)[None, :].expand(kh, kw)
    p = psf.double() / psf.sum()
    mean = torch.stack([(p * u).sum(), (p * v).sum()])
    du, dv = u - mean[0], v - mean[1]
    cov = torch.stack([torch.stack([(p * du * du).sum(), (p * du * dv).sum()]),
                       torch.stack([(p * du * dv).sum(), (p * dv * dv).sum()])])
    return mean, cov


# --------------------------------------------------------------------------------- 1-D


def test_signal_kernels_normalised_and_varying():
    task = data.SignalTask(length=64)
    k = data.signal_kernels(task, torch.float64)
    assert k.shape == (64, task.kernel_size)
    torch.testing.assert_close(k.sum(1), torch.ones(64, dtype=torch.float64))
    offsets = torch.arange(task.kernel_size, dtype=torch.float64) - task.kernel_size // 2
    mean = (k * offsets).sum(1)
    std = ((k * (offsets - mean[:, None]) ** 2).sum(1)).sqrt()
    # The kernel moves from left to right and widens along the signal.
    assert mean[0] < -2 and mean[-1] > 2 and torch.all(mean.diff() > 0)
    assert std[-1] > 3 * std[0] and torch.all(std.diff() > 0)


def test_signal_blur_matches_direct_sum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 20, generator=g, dtype=torch.float64)
    kernels = torch.randn(20, 5, generator=g, dtype=torch.float64)
    expected = torch.zeros_like(x)
    for i in range(20):
        for u in range(-2, 3):
            if 0 <= i - u < 20:
                expected[..., i] += kernels[i, u + 2] * x[..., i - u]
    torch.testing.assert_close(data.signal_blur(x, kernels), expected)


def test_signal_dataset_shapes_range_and_seed():
    task = data.SignalTask(length=96)
    a = data.make_signal_dataset(12, seed=3, task=task)
    b = data.make_signal_dataset(12, seed=3, task=task)
    c = data.make_signal_dataset(12, seed=4, task=task)
    assert a.inputs.shape == a.targets.shape == (12, 1, 96) and len(a) == 12
    assert a.inputs.min() >= 0 and torch.allclose(a.inputs.amax(-1), torch.ones(12, 1))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    # The targets are the blur of the inputs plus noise of the stated level.
    residual = a.targets - data.signal_blur(a.inputs, data.signal_kernels(task))
    assert abs(residual.std().item() - task.noise) < 0.2 * task.noise


def test_signal_kernel_size_must_be_odd():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        data.signal_kernels(data.SignalTask(kernel_size=8))


# --------------------------------------------------------------------------------- 2-D


def test_field_psf_varies_over_the_field():
    """Round and sharp at the centre; wider and astigmatic towards the edge, with the long
    axis along the radius (the diagonal in a corner)."""
    psf = data.FieldPSF()
    r = torch.tensor([0.0, 0.0, 1.0, 1.0])
    q = torch.tensor([0.0, 1.0, 0.0, 1.0])
    h = data.field_psf(r, q, psf, torch.float64)
    assert h.shape == (4, psf.size, psf.size)
    torch.testing.assert_close(h.sum((1, 2)), torch.ones(4, dtype=torch.float64))
    covs = [_moments(p)[1] for p in h]
    centre_eig, edge_eig = torch.linalg.eigvalsh(covs[0]), torch.linalg.eigvalsh(covs[3])
    assert torch.isclose(centre_eig[0], centre_eig[1], rtol=1e-6)
    assert edge_eig[1] > 3 * centre_eig[1]            # wider
    assert edge_eig[1] > 2 * edge_eig[0]              # astigmatic
    # Edge midpoints: r = 0, q = 1 elongated along columns; r = 1, q = 0 along rows.
    assert covs[1][1, 1] > 1.5 * covs[1][0, 0]
    assert covs[2][0, 0] > 1.5 * covs[2][1, 1]
    # The corner's long axis is the diagonal (1, 1) / sqrt(2).
    _, vectors = torch.linalg.eigh(covs[3])
    assert abs(abs(vectors[0, 1] * vectors[1, 1]) - 0.5) < 1e-6


def test_anchor_maps_partition_of_unity():
    maps = data.anchor_maps(17, 13, 3, torch.float64)
    assert maps.shape == (9, 17, 13) and maps.min() >= 0
    torch.testing.assert_close(maps.sum(0), torch.ones(17, 13, dtype=torch.float64))
    # Anchor k = a * 3 + b sits at row a * 8, column b * 6 (the grid's -1, 0, 1), with weight one.
    for a in range(3):
        for b in range(3):
            assert maps[a * 3 + b, a * 8, b * 6] == 1
    with pytest.raises(ValueError, match="at least 2"):
        data.anchor_maps(8, 8, 1)


def test_operator_blurs_a_point_more_at_the_corner():
    """The effective PSF of the whole operator (its response to a point) at the centre and
    near a corner: the PSF really varies in space."""
    op = data.microscopy_operator(48, 48, dtype=torch.float64)
    x = torch.zeros(2, 1, 48, 48, dtype=torch.float64)
    x[0, 0, 24, 24] = 1
    x[1, 0, 8, 8] = 1
    y = op(x)
    torch.testing.assert_close(y.sum((1, 2, 3)), torch.ones(2, dtype=torch.float64))  # flux kept
    centre = _moments(y[0, 0, 18:31, 18:31])[1]
    corner = _moments(y[1, 0, 2:15, 2:15])[1]
    assert torch.linalg.eigvalsh(corner)[1] > 2 * torch.linalg.eigvalsh(centre)[1]
    assert y[1].max() < 0.6 * y[0].max()


def test_random_scenes_range_and_seed():
    a = data.random_scenes(5, 32, 7)
    b = data.random_scenes(5, 32, torch.Generator().manual_seed(7))
    assert a.shape == (5, 1, 32, 32)
    assert torch.equal(a, b)
    assert a.min() >= 0 and torch.allclose(a.amax((1, 2, 3)), torch.ones(5))
    assert not torch.equal(a, data.random_scenes(5, 32, 8))
    # Scenes are sparse, as fluorescence is: most of the field is dark.
    assert (a < 0.05).float().mean() > 0.3


def test_poisson_gaussian_statistics():
    y = torch.full((200_000,), 0.25)
    noisy = data.poisson_gaussian(y, photons=100.0, read_noise=0.02, generator=0)
    assert abs(noisy.mean().item() - 0.25) < 2e-3
    expected_var = 0.25 / 100 + 0.02**2
    assert abs(noisy.var().item() / expected_var - 1) < 0.03
    noise_free = data.poisson_gaussian(torch.zeros(1000), photons=100.0, read_noise=0.0, generator=0)
    assert torch.equal(noise_free, torch.zeros(1000))


def test_microscopy_dataset():
    a = data.make_microscopy_dataset(6, 32, seed=1)
    b = data.make_microscopy_dataset(6, 32, seed=1)
    assert a.inputs.shape == a.targets.shape == (6, 1, 32, 32)
    assert a.inputs.dtype == torch.float32
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    blurred = a.info["operator"](a.targets)
    # Shot noise scales with the signal: its variance is y / photons + read^2 on average.
    residual = a.inputs - blurred
    expected = (blurred.clamp(min=0) / a.info["photons"] + a.info["read_noise"] ** 2).mean()
    assert abs(residual.pow(2).mean().item() / expected.item() - 1) < 0.1
    train, test = a.split(4)
    assert len(train) == 4 and len(test) == 2 and torch.equal(test.targets, a.targets[4:])
    assert math.isfinite(a.inputs.sum().item())
