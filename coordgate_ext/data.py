"""Synthetic data for the experiments, generated from a seed, never downloaded.

Two tasks, both about spatially varying convolution:

1-D (the paper's toy task): random signals x of length L (piecewise-constant steps plus
spikes) convolved with a kernel whose shape changes along the signal,

    y[i] = sum_u h_{t_i}[u] x[i - u],     t_i = linspace(-1, 1, L)[i],   u in -k//2..k//2,
    h_t[u] ~ exp(-(u - mu(t))^2 / (2 sigma(t)^2)),   mu(t) = shift * t,
    sigma(t) = sigma_min + (sigma_max - sigma_min) (t + 1) / 2,   sum_u h_t[u] = 1,

zero outside the signal: narrow and shifted left at the start, wide and shifted right at the end.
The task is to learn the operator x -> y itself.

2-D (microscopy-like): random fluorescent scenes (beads, filaments, cell-like blobs) blurred
by a field-dependent PSF and corrupted by Poisson-Gaussian noise; the task is to restore the
scene. The PSF at normalised field position (r, q) in [-1, 1]^2 (r along rows) is an
anisotropic Gaussian whose axes follow the polar frame of the field,

    rho = sqrt(r^2 + q^2) / sqrt(2) in [0, 1],        theta = atan2(r, q),
    sigma_radial = sigma0 + radial_growth * rho^2,    sigma_tangential = sigma0 + tangential_growth * rho^2,

round and sharp at the centre, wider and astigmatic (elongated radially) towards the edges
and corners. It is sampled on a G x G grid of anchor positions and the blur is the product
convolution of physics.py in the scatter order (light leaving the point p spreads with the
PSF of p), y = sum_k h_k conv (m_k * x), with bilinear "tent" weight maps m_k that interpolate
between anchors and sum to one everywhere. Noise: y_noisy = Poisson(photons * y) / photons +
N(0, read_noise^2).

Every generator takes a torch.Generator or a seed, and the same seed gives the same tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .physics import SpatiallyVaryingBlur

__all__ = [
    "SignalTask",
    "signal_kernels",
    "signal_blur",
    "random_signals",
    "make_signal_dataset",
    "FieldPSF",
    "field_psf",
    "anchor_maps",
    "microscopy_operator",
    "random_scenes",
    "poisson_gaussian",
    "Dataset",
    "make_microscopy_dataset",
]


def _generator(seed_or_generator) -> torch.Generator:
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    return torch.Generator().manual_seed(int(seed_or_generator))


def _uniform(generator: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator)


@dataclass
class Dataset:
    """Paired tensors: ``inputs`` (what the model sees) and ``targets`` (what it must output),
    both (N, 1, H, W) for the 2-D task or (N, 1, L) for the 1-D task, with the seed that made
    them and the forward operator's description (for figures and the record)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    seed: int
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def split(self, n_train: int) -> tuple["Dataset", "Dataset"]:
        """The first ``n_train`` pairs and the rest."""
        return (
            Dataset(self.inputs[:n_train], self.targets[:n_train], self.seed, self.info),
            Dataset(self.inputs[n_train:], self.targets[n_train:], self.seed, self.info),
        )


# ----------------------------------------------------------------------------------- 1-D task


@dataclass(frozen=True)
class SignalTask:
    """The 1-D operator: kernel size (odd), shift amplitude and width range (pixels), noise."""

    length: int = 128
    kernel_size: int = 15
    shift: float = 3.0
    sigma_min: float = 0.6
    sigma_max: float = 2.5
    noise: float = 0.005


def signal_kernels(task: SignalTask = SignalTask(), dtype=torch.float32) -> torch.Tensor:
    """(L, k) per-position kernels h_{t_i}[u], u = -k//2..k//2, each summing to one."""
    if task.kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {task.kernel_size}")
    t = torch.linspace(-1, 1, task.length, dtype=torch.float64)[:, None]
    u = torch.arange(task.kernel_size, dtype=torch.float64) - task.kernel_size // 2
    mu = task.shift * t
    sigma = task.sigma_min + (task.sigma_max - task.sigma_min) * (t + 1) / 2
    h = torch.exp(-((u - mu) ** 2) / (2 * sigma**2))
    return (h / h.sum(dim=1, keepdim=True)).to(dtype)


def signal_blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """y[n, c, i] = sum_u kernels[i, u] x[n, c, i - u] with zeros outside: x (N, C, L),
    kernels (L, k) odd k; returns (N, C, L). Computed exactly, pixel by pixel (no basis)."""
    k = kernels.shape[1]
    padded = torch.nn.functional.pad(x, (k // 2, k // 2))
    # windows[..., i, j] = x[i - k//2 + j]; the offset u = k//2 - j, so the kernel is flipped.
    windows = padded.unfold(-1, k, 1)
    return (windows * kernels.flip(-1).to(x.dtype)).sum(-1)


def random_signals(n: int, length: int, generator) -> torch.Tensor:
    """(n, 1, length) non-negative signals with a peak of one: a piecewise-constant part
    (2 to 6 random steps, levels in [0, 0.5] between them) plus 3 to 10 spikes (heights in [0.3, 1])."""
    g = _generator(generator)
    positions = torch.arange(length)
    n_steps = torch.randint(2, 7, (n,), generator=g)
    edges = torch.randint(0, length, (n, 6), generator=g)
    # Steps beyond an item's count are moved past the end, where they change nothing.
    edges = torch.where(torch.arange(6)[None] < n_steps[:, None], edges, torch.full_like(edges, length))
    segment = (positions[None, :, None] >= edges[:, None, :]).sum(-1)
    steps = torch.gather(_uniform(g, 0.0, 0.5, n, 7), 1, segment)

    n_spikes = torch.randint(3, 11, (n,), generator=g)
    where = torch.randint(0, length, (n, 10), generator=g)
    heights = _uniform(g, 0.3, 1.0, n, 10) * (torch.arange(10)[None] < n_spikes[:, None])
    spikes = torch.zeros(n, length).scatter_add_(1, where, heights)
    x = steps + spikes
    return (x / x.amax(dim=1, keepdim=True).clamp(min=1e-6))[:, None]


def make_signal_dataset(n: int, seed: int = 0, task: SignalTask = SignalTask()) -> Dataset:
    """n pairs (inputs = sharp signals, targets = signal_blur + N(0, task.noise^2)), each
    (n, 1, task.length): the model learns the spatially varying convolution itself."""
    g = _generator(seed)
    x = random_signals(n, task.length, g)
    kernels = signal_kernels(task)
    y = signal_blur(x, kernels) + task.noise * torch.randn(x.shape, generator=g)
    return Dataset(x, y, seed, {"task": task, "kernels": kernels})


# ----------------------------------------------------------------------------------- 2-D task


@dataclass(frozen=True)
class FieldPSF:
    """The microscope's field-dependent PSF (pixels): see the module docstring. ``size`` is
    the (odd) side of each sampled PSF, ``grid`` the number of anchors per side."""

    sigma0: float = 0.8
    radial_growth: float = 1.8
    tangential_growth: float = 0.5
    size: int = 13
    grid: int = 4


def field_psf(r: torch.Tensor, q: torch.Tensor, psf: FieldPSF = FieldPSF(), dtype=torch.float32) -> torch.Tensor:
    """(P, size, size) PSFs at P field positions (r, q) in [-1, 1]^2, each summing to one;
    offsets (u along rows, v along columns) run over -size//2..size//2."""
    r, q = r.to(torch.float64).reshape(-1), q.to(torch.float64).reshape(-1)
    rho2 = (r**2 + q**2) / 2
    theta = torch.atan2(r, q)
    s_rad = (psf.sigma0 + psf.radial_growth * rho2)[:, None, None]
    s_tan = (psf.sigma0 + psf.tangential_growth * rho2)[:, None, None]
    offsets = torch.arange(psf.size, dtype=torch.float64) - psf.size // 2
    u, v = offsets[None, :, None], offsets[None, None, :]
    # Components of the offset along the radial direction (cos theta, sin theta) in (v, u).
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    radial = v * cos + u * sin
    tangential = -v * sin + u * cos
    h = torch.exp(-(radial**2) / (2 * s_rad**2) - tangential**2 / (2 * s_tan**2))
    return (h / h.sum(dim=(1, 2), keepdim=True)).to(dtype)


def anchor_maps(height: int, width: int, grid: int, dtype=torch.float32) -> torch.Tensor:
    """(grid*grid, height, width) bilinear tent weights of the anchors at
    (linspace(-1, 1, grid)[a], linspace(-1, 1, grid)[b]), k = a * grid + b; they sum to one
    at every pixel, so a constant PSF field gives back a plain convolution."""
    if grid < 2:
        raise ValueError(f"the anchor grid needs at least 2 points per side, got {grid}")
    anchors = torch.linspace(-1, 1, grid, dtype=torch.float64)
    step = 2 / (grid - 1)

    def tents(n: int) -> torch.Tensor:
        coords = torch.linspace(-1, 1, n, dtype=torch.float64)
        return (1 - (coords[None] - anchors[:, None]).abs() / step).clamp(min=0)

    rows, cols = tents(height), tents(width)
    return (rows[:, None, :, None] * cols[None, :, None, :]).reshape(grid * grid, height, width).to(dtype)


def microscopy_operator(height: int, width: int, psf: FieldPSF = FieldPSF(), dtype=torch.float32) -> SpatiallyVaryingBlur:
    """The 2-D forward blur: a scatter-order SpatiallyVaryingBlur with field_psf sampled on
    the anchor grid and anchor_maps as weights."""
    anchors = torch.linspace(-1, 1, psf.grid)
    r, q = torch.meshgrid(anchors, anchors, indexing="ij")
    return SpatiallyVaryingBlur(
        field_psf(r, q, psf, dtype), anchor_maps(height, width, psf.grid, dtype), order="scatter"
    )


def _splat(points: torch.Tensor, weights: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear splatting: (B, P, 2) points (row, col) in pixels with (B, P) weights onto a
    (B, size, size) image; each point's weight is shared among its four neighbouring pixels,
    and points outside the field are dropped."""
    b = points.shape[0]
    base = points.floor()
    frac = points - base
    base = base.long()
    image = torch.zeros(b, size * size)
    for dr in (0, 1):
        for dc in (0, 1):
            r, c = base[..., 0] + dr, base[..., 1] + dc
            w = weights * (frac[..., 0] if dr else 1 - frac[..., 0]) * (frac[..., 1] if dc else 1 - frac[..., 1])
            inside = (r >= 0) & (r < size) & (c >= 0) & (c < size)
            index = (r.clamp(0, size - 1) * size + c.clamp(0, size - 1))
            image.scatter_add_(1, index, w * inside)
    return image.reshape(b, size, size)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) images convolved with a normalised Gaussian of ``sigma`` pixels (zero padding)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = torch.nn.functional.conv2d(images[:, None], kernel.view(1, 1, 1, -1), padding=(0, radius))
    return torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1), padding=(radius, 0))[:, 0]


#: Gaussian cross-section (pixels) of the rendered filaments.
FILAMENT_SIGMA = 0.6
#: Points sampled along each filament: spacing below half a pixel for any curve in a 64 x 64 field.
FILAMENT_POINTS = 400


def random_scenes(
    n: int, size: int, generator, *, beads: int = 16, filaments: int = 4, cells: int = 3, chunk: int = 16
) -> torch.Tensor:
    """(n, 1, size, size) fluorescent scenes scaled to a peak of one, in [0, 1]:

    - ``cells`` cell-like blobs: soft-edged ellipses (semi-axes 10% to 25% of the side, random
      orientation, brightness 0.15 to 0.35) each with a brighter nucleus;
    - ``filaments`` filaments: quadratic Bezier curves with a Gaussian cross-section
      (sigma FILAMENT_SIGMA px, brightness 0.3 to 0.8; brighter where two cross);
    - up to ``beads`` sub-resolution beads: Gaussian spots (sigma 0.4 to 0.9 px, brightness
      0.4 to 1), a random number per scene.

    The pixel (i, j) is the point (i, j) of a size x size grid. Rendered ``chunk`` scenes at a
    time to bound the memory of the (scene, object, H, W) intermediates.
    """
    g = _generator(generator)
    coords = torch.arange(size, dtype=torch.float32)
    rows, cols = coords[:, None], coords[None, :]
    out = []
    for begin in range(0, n, chunk):
        b = min(chunk, n - begin)
        # Cells: an ellipse's inside is (a / ra)^2 + (c / rc)^2 < 1 in its rotated frame.
        centre = _uniform(g, 0.1 * size, 0.9 * size, b, cells, 2)
        radii = _uniform(g, 0.10 * size, 0.25 * size, b, cells, 2)
        angle = _uniform(g, 0, math.pi, b, cells)
        level = _uniform(g, 0.15, 0.35, b, cells)
        dr = rows - centre[..., 0, None, None]
        dc = cols - centre[..., 1, None, None]
        cos, sin = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
        a = (dr * cos + dc * sin) / radii[..., 0, None, None]
        c = (-dr * sin + dc * cos) / radii[..., 1, None, None]
        radius = torch.sqrt(a**2 + c**2)
        # A soft membrane about a tenth of the radius wide, and a nucleus at 40% of the radius.
        scene = (level[..., None, None] * torch.sigmoid((1 - radius) / 0.08)).sum(1)
        scene += (1.5 * level[..., None, None] * torch.sigmoid((0.4 - radius) / 0.05)).sum(1)

        # Filaments: quadratic Bezier curves with control points p0, p1, p2 anywhere in the
        # field, sampled densely and splatted, then given their cross-section by one blur;
        # each sample carries its arc length so that the line's peak is ``brightness``.
        ctrl = _uniform(g, 0, size - 1, b, filaments, 3, 2)
        t = torch.linspace(0, 1, FILAMENT_POINTS)[None, None, :, None]
        curve = (1 - t) ** 2 * ctrl[:, :, 0:1] + 2 * (1 - t) * t * ctrl[:, :, 1:2] + t**2 * ctrl[:, :, 2:3]
        arc = (curve[:, :, 1:] - curve[:, :, :-1]).norm(dim=-1)
        arc = torch.cat([arc, arc[:, :, -1:]], dim=2)
        brightness = _uniform(g, 0.3, 0.8, b, filaments)[..., None]
        weight = brightness * arc * math.sqrt(2 * math.pi) * FILAMENT_SIGMA
        lines = _splat(curve.reshape(b, -1, 2), weight.reshape(b, -1), size)
        scene += _gaussian_blur(lines, FILAMENT_SIGMA)

        where = _uniform(g, 0, size - 1, b, beads, 2)
        sigma = _uniform(g, 0.4, 0.9, b, beads)
        present = torch.rand(b, 1, generator=g) > torch.rand(b, beads, generator=g)
        height = _uniform(g, 0.4, 1.0, b, beads) * present
        d2 = (rows - where[..., 0, None, None]) ** 2 + (cols - where[..., 1, None, None]) ** 2
        scene += (height[..., None, None] * torch.exp(-d2 / (2 * sigma[..., None, None] ** 2))).sum(1)
        out.append(scene / scene.amax(dim=(1, 2), keepdim=True).clamp(min=1e-6))
    return torch.cat(out)[:, None]


def poisson_gaussian(y: torch.Tensor, photons: float, read_noise: float, generator) -> torch.Tensor:
    """Poisson(photons * y) / photons + N(0, read_noise^2): shot noise with ``photons`` photons
    at intensity one, plus read noise. y must be non-negative."""
    g = _generator(generator)
    shot = torch.poisson(photons * y.clamp(min=0), generator=g) / photons
    return shot + read_noise * torch.randn(y.shape, generator=g, dtype=y.dtype)


def make_microscopy_dataset(
    n: int,
    size: int = 64,
    seed: int = 0,
    psf: FieldPSF = FieldPSF(),
    photons: float = 300.0,
    read_noise: float = 0.01,
) -> Dataset:
    """n pairs (inputs = noisy blurred images, targets = sharp scenes), each (n, 1, size, size),
    float32. The operator (its PSFs and maps) is in ``info["operator"]``."""
    g = _generator(seed)
    sharp = random_scenes(n, size, g)
    operator = microscopy_operator(size, size, psf)
    with torch.no_grad():
        blurred = operator(sharp)
    noisy = poisson_gaussian(blurred, photons, read_noise, g)
    return Dataset(noisy, sharp, seed, {"psf": psf, "operator": operator, "photons": photons,
                                        "read_noise": read_noise})
