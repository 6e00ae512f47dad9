"""Spatially varying blur as a product convolution, on the package's gated-convolution op.

A spatially varying point-spread function (PSF) is approximated by K basis PSFs h_k
(K, kh, kw) and K weight maps m_k (K, H, W) (Nagy and O'Leary's product convolution). The
convolution is the true one, ``(h conv x)[p] = sum_u h[u] x[p - u]`` with the offset u running
over -kh//2..kh//2 x -kw//2..kw//2 (odd sizes, so that the PSF has a centre), and zero padding:
pixels outside the image are zero. Two orders:

    gather   (A_g x)[p] = sum_k m_k[p] * (h_k conv x)[p]          masks after the kernels
    scatter  (A_s x)[p] = sum_k (h_k conv (m_k * x))[p]           masks before the kernels

The gather order is CoordGate's own form: with x a single channel, it is the gated convolution
with C = K output channels, weight flip(h_k) (F.conv2d correlates, so a true convolution takes
the flipped kernel), gate m_k, followed by the 1x1 mix of ones that sums the K channels:
``coordgate_conv2d(x, flip(h)[:, None], None, m, padding="same", mix_weight=ones(1, K, 1, 1))``.
The scatter order is one ordinary convolution of the K masked copies (K in, 1 out).

With zero padding and odd kernels the adjoint of ``x -> h conv x`` is ``y -> flip(h) conv y``,
and the adjoint of a pointwise product with m is the same product, so

    A_g^T y = sum_k flip(h_k) conv (m_k * y)   = the scatter order with flipped PSFs
    A_s^T y = sum_k m_k * (flip(h_k) conv y)   = the gather order with flipped PSFs.

Images are (N, C, H, W); each channel is blurred alone (channels fold into the batch). Every
function is differentiable in the image, the PSFs and the maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .functional import coordgate_conv2d

__all__ = [
    "ORDERS",
    "blur_gather",
    "blur_gather_adjoint",
    "blur_scatter",
    "blur_scatter_adjoint",
    "SpatiallyVaryingBlur",
]

ORDERS = ("gather", "scatter")


def _check(x: torch.Tensor, psfs: torch.Tensor, maps: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    if psfs.dim() != 3:
        raise ValueError(f"expected PSFs of shape (K, kh, kw), got {tuple(psfs.shape)}")
    if maps.dim() != 3:
        raise ValueError(f"expected weight maps of shape (K, H, W), got {tuple(maps.shape)}")
    kh, kw = psfs.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"PSF sizes must be odd (a centred PSF), got {kh}x{kw}")
    if maps.shape[0] != psfs.shape[0]:
        raise ValueError(f"got {psfs.shape[0]} PSFs but {maps.shape[0]} weight maps")
    if tuple(maps.shape[-2:]) != tuple(x.shape[-2:]):
        raise ValueError(
            f"the weight maps are {tuple(maps.shape[-2:])} but the images are {tuple(x.shape[-2:])}"
        )


def _fold(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*C, 1, H, W): every channel is its own single-channel image."""
    return x.reshape(-1, 1, *x.shape[-2:])


def blur_gather(
    x: torch.Tensor, psfs: torch.Tensor, maps: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """``sum_k m_k * (h_k conv x)``: x (N, C, H, W), psfs (K, kh, kw) odd, maps (K, H, W);
    returns (N, C, H, W). One fused gated convolution with a summing 1x1 mix."""
    _check(x, psfs, maps)
    k = psfs.shape[0]
    ones = torch.ones(1, k, 1, 1, dtype=x.dtype, device=x.device)
    out = coordgate_conv2d(
        _fold(x), psfs.flip(-2, -1)[:, None].to(x.dtype), None, maps.to(x.dtype), padding="same",
        mix_weight=ones, backend=backend,
    )
    return out.reshape(x.shape)


def blur_scatter(x: torch.Tensor, psfs: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``sum_k h_k conv (m_k * x)``: x (N, C, H, W), psfs (K, kh, kw) odd, maps (K, H, W);
    returns (N, C, H, W). The masked copies (N*C, K, H, W) go through one K -> 1 convolution."""
    _check(x, psfs, maps)
    # channels_last: oneDNN's K -> 1 convolution is several times faster in it than in NCHW.
    masked = (_fold(x) * maps[None].to(x.dtype)).contiguous(memory_format=torch.channels_last)
    out = F.conv2d(masked, psfs.flip(-2, -1)[None].to(x.dtype), padding="same")
    return out.reshape(x.shape)


def blur_gather_adjoint(
    y: torch.Tensor, psfs: torch.Tensor, maps: torch.Tensor
) -> torch.Tensor:
    """A_g^T y = ``sum_k flip(h_k) conv (m_k * y)``, the adjoint of blur_gather (same shapes)."""
    return blur_scatter(y, psfs.flip(-2, -1), maps)


def blur_scatter_adjoint(
    y: torch.Tensor, psfs: torch.Tensor, maps: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """A_s^T y = ``sum_k m_k * (flip(h_k) conv y)``, the adjoint of blur_scatter (same shapes)."""
    return blur_gather(y, psfs.flip(-2, -1), maps, backend=backend)


class SpatiallyVaryingBlur(torch.nn.Module):
    """The product-convolution operator A as a module: ``A(x)`` and ``A.adjoint(y)``.

    psfs (K, kh, kw) odd, maps (K, H, W) are buffers (the physics is given, not learnt; wrap
    them in nn.Parameter after construction to fit them). ``order`` is "gather" (masks after
    the kernels) or "scatter" (masks before).
    """

    def __init__(self, psfs: torch.Tensor, maps: torch.Tensor, order: str = "gather", *, backend: str = "auto"):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
        _check(torch.empty(0, 1, *maps.shape[-2:]), psfs, maps)
        self.register_buffer("psfs", psfs)
        self.register_buffer("maps", maps)
        self.order = order
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.order == "gather":
            return blur_gather(x, self.psfs, self.maps, backend=self.backend)
        return blur_scatter(x, self.psfs, self.maps)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if self.order == "gather":
            return blur_gather_adjoint(y, self.psfs, self.maps)
        return blur_scatter_adjoint(y, self.psfs, self.maps, backend=self.backend)

    def extra_repr(self) -> str:
        k, kh, kw = self.psfs.shape
        return f"K={k}, psf={kh}x{kw}, grid={tuple(self.maps.shape[-2:])}, order={self.order!r}"
