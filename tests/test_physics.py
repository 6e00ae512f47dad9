"""coordgate_ext.physics: the product-convolution blur in both orders against a direct
per-pixel loop, its adjoints (<A x, y> = <x, A^T y>), gradients and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coordgate_ext import physics
from tests.support import assert_close

DTYPE = torch.float64


def _true_conv(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(h conv x)[i, j] = sum_{u, v} h[u, v] x[i - (u - kh//2), j - (v - kw//2)], zeros
    outside: the definition, one pixel at a time. x (H, W), h (kh, kw)."""
    height, width = x.shape
    kh, kw = h.shape
    out = torch.zeros_like(x)
    for i in range(height):
        for j in range(width):
            total = x.new_zeros(())
            for u in range(kh):
                for v in range(kw):
                    a, b = i - (u - kh // 2), j - (v - kw // 2)
                    if 0 <= a < height and 0 <= b < width:
                        total = total + h[u, v] * x[a, b]
            out[i, j] = total
    return out


def _direct(x, psfs, maps, order):
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            for k in range(psfs.shape[0]):
                if order == "gather":
                    out[n, c] += maps[k] * _true_conv(x[n, c], psfs[k])
                else:
                    out[n, c] += _true_conv(maps[k] * x[n, c], psfs[k])
    return out


def _problem(k=3, kernel=(3, 5), size=(7, 9), batch=(2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, *size, generator=g, dtype=DTYPE)
    psfs = torch.randn(k, *kernel, generator=g, dtype=DTYPE)  # asymmetric: catches a missing flip
    maps = torch.rand(k, *size, generator=g, dtype=DTYPE)
    return x, psfs, maps


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kernel,size", [((3, 5), (7, 9)), ((5, 3), (6, 5)), ((1, 1), (4, 3))])
def test_gather_matches_direct_loop(backend, kernel, size):
    x, psfs, maps = _problem(kernel=kernel, size=size)
    assert_close(physics.blur_gather(x, psfs, maps, backend=backend), _direct(x, psfs, maps, "gather"))


@pytest.mark.parametrize("kernel,size", [((3, 5), (7, 9)), ((5, 3), (6, 5))])
def test_scatter_matches_direct_loop(kernel, size):
    x, psfs, maps = _problem(kernel=kernel, size=size)
    assert_close(physics.blur_scatter(x, psfs, maps), _direct(x, psfs, maps, "scatter"))


@pytest.mark.parametrize("order", physics.ORDERS)
@pytest.mark.parametrize("kernel", [(3, 5), (7, 7)])
def test_adjoint(order, kernel):
    """<A x, y> = <x, A^T y> for random x, y; also between the two functional forms."""
    x, psfs, maps = _problem(k=4, kernel=kernel, size=(10, 8), seed=1)
    y = torch.randn_like(x)
    op = physics.SpatiallyVaryingBlur(psfs, maps, order)
    lhs = (op(x) * y).sum()
    rhs = (x * op.adjoint(y)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_adjoint_is_the_transpose_of_the_matrix():
    """A^T, applied to the basis, is the transpose of A applied to the basis: a stronger check
    than one random inner product."""
    _, psfs, maps = _problem(k=2, kernel=(3, 3), size=(4, 5), seed=2)
    eye = torch.eye(20, dtype=DTYPE).reshape(20, 1, 4, 5)
    for order in physics.ORDERS:
        op = physics.SpatiallyVaryingBlur(psfs, maps, order)
        forward = op(eye).reshape(20, 20)      # row j = A e_j, i.e. column j of A
        adjoint = op.adjoint(eye).reshape(20, 20)
        assert_close(adjoint, forward.t())


def test_orders_agree_for_a_single_psf_and_unit_maps():
    """With one PSF the orders coincide and equal a true convolution (flipped F.conv2d)."""
    x, psfs, _ = _problem(k=1)
    maps = torch.ones(1, *x.shape[-2:], dtype=DTYPE)
    expected = F.conv2d(x.reshape(-1, 1, *x.shape[-2:]), psfs.flip(-2, -1)[:, None], padding="same").reshape(x.shape)
    assert_close(physics.blur_gather(x, psfs, maps), expected)
    assert_close(physics.blur_scatter(x, psfs, maps), expected)


def test_gradients():
    x, psfs, maps = _problem(k=2, kernel=(3, 3), size=(5, 4), batch=(1, 1))
    for fn in (physics.blur_gather, physics.blur_scatter, physics.blur_gather_adjoint, physics.blur_scatter_adjoint):
        inputs = tuple(t.clone().requires_grad_() for t in (x, psfs, maps))
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True), fn.__name__


def test_module_buffers_and_repr():
    _, psfs, maps = _problem()
    op = physics.SpatiallyVaryingBlur(psfs, maps, "scatter")
    assert set(dict(op.named_buffers())) == {"psfs", "maps"}
    assert "order='scatter'" in repr(op) and "K=3" in repr(op)


def test_empty_batch():
    _, psfs, maps = _problem()
    x = torch.zeros(0, 1, 7, 9, dtype=DTYPE)
    assert physics.blur_gather(x, psfs, maps).shape == x.shape
    assert physics.blur_scatter(x, psfs, maps).shape == x.shape


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(psfs=torch.ones(3, 4, 3)), "odd"),
        (dict(maps=torch.ones(2, 7, 9)), "3 PSFs but 2 weight maps"),
        (dict(maps=torch.ones(3, 7, 8)), r"weight maps are \(7, 8\)"),
        (dict(x=torch.ones(7, 9)), r"\(N, C, H, W\)"),
        (dict(psfs=torch.ones(3, 3)), r"\(K, kh, kw\)"),
    ],
)
def test_errors(change, match):
    x, psfs, maps = _problem()
    args = dict(x=x, psfs=psfs, maps=maps)
    args.update({k: v.to(DTYPE) for k, v in change.items()})
    with pytest.raises(ValueError, match=match):
        physics.blur_gather(**args)
    with pytest.raises(ValueError, match=match):
        physics.blur_scatter(**args)


def test_unknown_order():
    _, psfs, maps = _problem()
    with pytest.raises(ValueError, match="order must be one of gather, scatter"):
        physics.SpatiallyVaryingBlur(psfs, maps, "both")
