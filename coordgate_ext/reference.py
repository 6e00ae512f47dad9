"""The pure-PyTorch specification of every coordgate_ext operator.

Each function here is the reference twin of a fused implementation, with the same signature,
and is also the ``backend="reference"`` of the public API. Notation (DESIGN.md section 1):
input ``x`` (N, Cin, H, W), conv weight (C, Cin/groups, kh, kw), output grid Ho x Wo,

    y[n, c, i, j]   = b[c] + sum_{ci, u, v} W[c, ci, u, v] * x[n, ci, i*sh + u*dh - ph, j*sw + v*dw - pw]
    g[c, i, j]      = psi(E(r_i, q_j))[c],   r = linspace(-1, 1, Ho), q = linspace(-1, 1, Wo)
    out[n, c, i, j] = g[c, i, j] * y[n, c, i, j]
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "activation",
    "coordinate_grid",
    "mlp_gate",
    "map_gate",
    "bilinear_coefficients",
    "bilinear_gate",
    "gated_conv2d",
    "gated_conv2d_mix",
    "coordgate",
]

#: Activation names accepted for the encoder's hidden layers (phi) and gate (psi), in the
#: order of the C++ enum coordgate::Activation.
ACTIVATIONS = ("none", "relu", "sigmoid", "tanh", "silu", "gelu", "softplus")


def activation(name: str, a: torch.Tensor) -> torch.Tensor:
    """phi(a) for one of ACTIVATIONS (gelu is the exact, erf form; softplus has beta 1)."""
    if name == "none":
        return a
    if name == "relu":
        return F.relu(a)
    if name == "sigmoid":
        return torch.sigmoid(a)
    if name == "tanh":
        return torch.tanh(a)
    if name == "silu":
        return F.silu(a)
    if name == "gelu":
        return F.gelu(a)
    if name == "softplus":
        return F.softplus(a)
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {name!r}")


def coordinate_grid(height: int, width: int, *, dtype=None, device=None) -> torch.Tensor:
    """(height * width, 2) coordinates, row-major over the grid: [r_i, q_j] with
    r = linspace(-1, 1, height) along H (rows) and q = linspace(-1, 1, width) along W."""
    r = torch.linspace(-1, 1, height, dtype=dtype, device=device)
    q = torch.linspace(-1, 1, width, dtype=dtype, device=device)
    return torch.stack(torch.meshgrid(r, q, indexing="ij"), dim=-1).reshape(-1, 2)


def mlp_gate(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    height: int,
    width: int,
    hidden_activation: str,
    gate_activation: str,
) -> torch.Tensor:
    """(C, height, width) gate of an MLP coordinate encoder (the paper's "pos" encoder).

    Layers ``weights[l]`` (out_l, in_l) and ``biases[l]`` (out_l) in nn.Linear's layout, with
    in_0 = 2 and out_{L-1} = C: h_0 = [r, q]; h_{l+1} = phi(W_l h_l + b_l) for the hidden
    layers; gate = psi(W_{L-1} h_{L-1} + b_{L-1}).
    """
    h = coordinate_grid(height, width, dtype=weights[0].dtype, device=weights[0].device)
    for layer, (w, b) in enumerate(zip(weights, biases)):
        act = gate_activation if layer == len(weights) - 1 else hidden_activation
        h = activation(act, F.linear(h, w, b))
    return h.t().reshape(-1, height, width)


def map_gate(gate_map: torch.Tensor, height: int, width: int, gate_activation: str) -> torch.Tensor:
    """(C, height, width) gate from a learned (C, Hm, Wm) map: psi(map) brought to the grid,
    by exact repeat_interleave when height and width are multiples of Hm and Wm (the first
    author's behaviour), by bilinear resampling (align_corners=False) otherwise."""
    g = activation(gate_activation, gate_map)
    hm, wm = g.shape[-2:]
    if height % hm == 0 and width % wm == 0:
        return g.repeat_interleave(height // hm, dim=1).repeat_interleave(width // wm, dim=2)
    return F.interpolate(g[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def bilinear_coefficients(displacement: torch.Tensor) -> torch.Tensor:
    """(9, Hm, Wm) bilinear weights over a 3x3 neighbourhood from a (2, Hm, Wm) displacement.

    Channel 0 is the displacement dx along W, channel 1 is dy along H; the neighbourhood is
    flattened row-major (k = 3 * (row + 1) + (col + 1), row and col in -1, 0, 1). The weight
    is separable, w[row, col] = a_row(dy) * a_col(dx), with a(d) = |d| at offset -1 if d >= 0
    and at +1 if d < 0, 1 - |d| at offset 0, and 0 at the remaining offset: a sub-pixel shift
    by (-dy, -dx). This is the first author's create_bilinear_coeff_map_cart_3x3.
    """
    dx, dy = displacement[0], displacement[1]

    def weights_1d(d: torch.Tensor) -> torch.Tensor:
        mag = d.abs()
        zero = torch.zeros_like(d)
        positive = d >= 0
        return torch.stack(
            [torch.where(positive, mag, zero), 1 - mag, torch.where(positive, zero, mag)]
        )

    rows, cols = weights_1d(dy), weights_1d(dx)
    return (rows[:, None] * cols[None, :]).reshape(9, *displacement.shape[1:])


def bilinear_gate(
    displacement: torch.Tensor, height: int, width: int, gate_activation: str
) -> torch.Tensor:
    """(9, height, width) gate: psi(bilinear_coefficients(displacement)) brought to the grid
    as in map_gate."""
    return map_gate(bilinear_coefficients(displacement), height, width, gate_activation)


def gated_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gate: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """out = gate[None] * conv2d(input, weight, bias): (N, C, Ho, Wo); gate is (C, Ho, Wo).
    Zero padding; the other padding modes are applied to the input beforehand."""
    y = F.conv2d(input, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    return y * gate[None]


def gated_conv2d_mix(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gate: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    mix_weight: torch.Tensor,
    mix_bias: torch.Tensor | None,
) -> torch.Tensor:
    """The block: a 1x1 channel mix after the gated convolution,
    out = conv1x1(gated_conv2d(...), mix_weight (Cout, C, 1, 1), mix_bias). This is the first
    author's ``CoordGate(conv_kxk(x))``: a rank-C spatially varying convolution."""
    z = gated_conv2d(input, weight, bias, gate, stride, padding, dilation, groups)
    return F.conv2d(z, mix_weight, mix_bias)


def coordgate(
    input: torch.Tensor, gate: torch.Tensor, mix_weight: torch.Tensor, mix_bias: torch.Tensor | None
) -> torch.Tensor:
    """The paper's CoordGate module: the gate on its input, then a 1x1 convolution,
    out = conv1x1(input * gate[None], mix_weight (Cout, C, 1, 1), mix_bias)."""
    return F.conv2d(input * gate[None], mix_weight, mix_bias)
