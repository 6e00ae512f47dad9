"""FLOP formulas of the custom ops for ``torch.utils.flop_counter.FlopCounterMode``.

Counted the way FlopCounterMode counts PyTorch's own ops, with torch's formulas reused:

- the convolution, 2 * N * Ho * Wo * C * (Cin / groups) * kh * kw (``conv_flop_count``);
  in backward its input and weight gradients, each only where ``output_mask`` asks for it
  (``conv_backward_flop``, whose weight-gradient count ignores groups: kept, so that the op
  counts what F.conv2d's backward counts);
- the optional 1x1 mix (Cout, C, 1, 1) as a GEMM, 2 * N * Ho * Wo * Cout * C; in backward
  the same once for the gated tensor's gradient (when any gradient below the mix is asked
  for) and once for the mix weight's gradient;
- the MLP encoder's GEMMs, 2 * Ho * Wo * sum_l in_l * out_l, wherever an op evaluates the
  encoder: mlp_gate and mlp_gated_conv2d, and again their backward ops, which have the
  encoder's parameters and recompute its activations. The encoder's gradients count as
  torch counts nn.Linear's backward when the input needs no gradient (the coordinates): a
  weight-gradient GEMM per layer, an input-gradient GEMM per layer after the first.
- the convolution again in a backward op given an empty ``conv_out`` (recompute) when the
  gate's or the mix weight's gradient needs it.

Recomputation is counted because it is work the op does (torch's own flash-attention
backward formula counts its recomputed scores); the Triton backend's encoder recompute runs
through ATen and is counted by torch the same way. Elementwise work (the gate multiply,
activations, biases, the gate gradient's reduction) is not counted, as torch does not count
it for its own ops.

The coordgate_ext formulas are registered on import when the extension is loaded; those of
coordgate_ext_triton by ``register_triton`` when ops/triton_ops.py (which imports triton)
is imported.
"""

from __future__ import annotations

from math import prod
from typing import Optional, Sequence

import torch
from torch.utils.flop_counter import (
    conv_backward_flop,
    conv_flop_count,
    flop_registry,
    mm_flop,
    register_flop_formula,
)

from ._library import loaded
from .gated_conv2d import conv_output_size

__all__ = ["gated_conv2d_flops", "gated_conv2d_backward_flops", "encoder_flops", "encoder_backward_flops",
           "register_triton"]

Shape = Sequence[int]


def _conv_out_shape(input: Shape, weight: Shape, stride, padding, dilation) -> tuple[int, int, int, int]:
    """(N, C, Ho, Wo) of the ungated convolution."""
    ho = conv_output_size(input[2], weight[2], stride[0], padding[0], dilation[0])
    wo = conv_output_size(input[3], weight[3], stride[1], padding[1], dilation[1])
    return (input[0], weight[0], ho, wo)


def _mix_flops(conv_shape: Shape, mix_weight: Optional[Shape]) -> int:
    """The 1x1 mix as a GEMM (N*Ho*Wo, C) x (C, Cout)."""
    if mix_weight is None:
        return 0
    n, c, ho, wo = conv_shape
    return mm_flop((n * ho * wo, c), (c, mix_weight[0]))


def encoder_flops(weights: Sequence[Shape], height: int, width: int) -> int:
    """The encoder's GEMMs on a height x width grid: sum_l 2 * H * W * in_l * out_l
    (weights in nn.Linear's (out, in) layout)."""
    return sum(mm_flop((height * width, w[1]), (w[1], w[0])) for w in weights)


def encoder_backward_flops(weights: Sequence[Shape], height: int, width: int) -> int:
    """The encoder's gradient GEMMs: every layer's weight gradient, and the input gradient of
    every layer but the first (the coordinates need none)."""
    pixels = height * width
    weight_grads = sum(mm_flop((w[0], pixels), (pixels, w[1])) for w in weights)
    input_grads = sum(mm_flop((pixels, w[0]), (w[0], w[1])) for w in weights[1:])
    return weight_grads + input_grads


def gated_conv2d_flops(input: Shape, weight: Shape, stride, padding, dilation,
                       mix_weight: Optional[Shape] = None) -> int:
    """The gated convolution's forward: the convolution and the optional mix."""
    conv_shape = _conv_out_shape(input, weight, stride, padding, dilation)
    return conv_flop_count(input, weight, conv_shape) + _mix_flops(conv_shape, mix_weight)


def gated_conv2d_backward_flops(input: Shape, weight: Shape, conv_out: Shape, stride, padding, dilation,
                                groups: int, mix_weight: Optional[Shape], output_mask: Sequence[bool]) -> int:
    """The gated convolution's backward; output_mask is (input, weight, bias, gate or encoder,
    mix_weight, mix_bias)."""
    need_input, need_weight, _, need_gate, need_mix_weight = output_mask[:5]
    conv_shape = _conv_out_shape(input, weight, stride, padding, dilation)
    flops = 0
    if mix_weight is not None:
        flops += _mix_flops(conv_shape, mix_weight) * (any(output_mask[:4]) + bool(need_mix_weight))
    if (need_gate or need_mix_weight) and prod(conv_out) == 0:  # y not saved: recomputed
        flops += conv_flop_count(input, weight, conv_shape)
    if need_input or need_weight:
        flops += conv_backward_flop(
            conv_shape, input, weight, None, stride, padding, dilation, False, [0, 0], groups,
            [need_input, need_weight, False], out_val=[list(input), list(weight)],
        )
    return flops


if loaded():
    _ops = torch.ops.coordgate_ext

    @register_flop_formula(_ops.mlp_gate)
    def _mlp_gate_flop(weights, biases, height, width, hidden_activation, gate_activation, *, out_shape=None):
        return encoder_flops(weights, height, width)

    @register_flop_formula(_ops.mlp_gate_backward)
    def _mlp_gate_backward_flop(grad_gate, weights, biases, height, width, hidden_activation, gate_activation,
                                *, out_shape=None):
        return encoder_flops(weights, height, width) + encoder_backward_flops(weights, height, width)

    @register_flop_formula(_ops.gated_conv2d)
    def _gated_conv2d_flop(input, weight, bias, gate, stride, padding, dilation, groups, mix_weight, mix_bias,
                           save_conv, *, out_shape=None):
        return gated_conv2d_flops(input, weight, stride, padding, dilation, mix_weight)

    @register_flop_formula(_ops.gated_conv2d_backward)
    def _gated_conv2d_backward_flop(grad_out, input, weight, bias, gate, conv_out, stride, padding, dilation,
                                    groups, mix_weight, mix_bias, output_mask, *, out_shape=None):
        return gated_conv2d_backward_flops(input, weight, conv_out, stride, padding, dilation, groups,
                                           mix_weight, output_mask)

    @register_flop_formula(_ops.mlp_gated_conv2d)
    def _mlp_gated_conv2d_flop(input, weight, bias, encoder_weights, encoder_biases, hidden_activation,
                               gate_activation, stride, padding, dilation, groups, mix_weight, mix_bias,
                               save_conv, *, out_shape=None):
        _, _, ho, wo = _conv_out_shape(input, weight, stride, padding, dilation)
        return (gated_conv2d_flops(input, weight, stride, padding, dilation, mix_weight)
                + encoder_flops(encoder_weights, ho, wo))

    @register_flop_formula(_ops.mlp_gated_conv2d_backward)
    def _mlp_gated_conv2d_backward_flop(grad_out, input, weight, bias, encoder_weights, encoder_biases,
                                        hidden_activation, gate_activation, conv_out, stride, padding,
                                        dilation, groups, mix_weight, mix_bias, output_mask, *,
                                        out_shape=None):
        _, _, ho, wo = _conv_out_shape(input, weight, stride, padding, dilation)
        # The gate is evaluated again whatever is asked: dy = dout * g needs it.
        flops = encoder_flops(encoder_weights, ho, wo)
        if output_mask[3]:
            flops += encoder_backward_flops(encoder_weights, ho, wo)
        return flops + gated_conv2d_backward_flops(input, weight, conv_out, stride, padding, dilation, groups,
                                                   mix_weight, output_mask)


def _triton_gated_conv2d_flop(input, weight, bias, gate, stride, padding, dilation, groups, save_conv, *,
                              out_shape=None):
    return gated_conv2d_flops(input, weight, stride, padding, dilation)


def _triton_gated_conv2d_backward_flop(grad_out, input, weight, bias, gate, conv_out, stride, padding, dilation,
                                       groups, output_mask, *, out_shape=None):
    return gated_conv2d_backward_flops(input, weight, conv_out, stride, padding, dilation, groups, None,
                                       [*output_mask, False, False])


def _triton_gated_conv2d_fused_flop(input, weight, bias, gate, encoder_weights, encoder_biases, hidden_activation,
                                    gate_activation, mix_weight, mix_bias, stride, padding, dilation, groups,
                                    save_conv, *, out_shape=None):
    flops = gated_conv2d_flops(input, weight, stride, padding, dilation, mix_weight)
    if gate is None:  # the encoder evaluated in the kernel
        _, _, ho, wo = _conv_out_shape(input, weight, stride, padding, dilation)
        flops += encoder_flops(encoder_weights, ho, wo)
    return flops


def _triton_gated_conv2d_fused_backward_flop(grad_out, input, weight, bias, gate, conv_out, mix_weight, stride,
                                             padding, dilation, groups, output_mask, *, out_shape=None):
    return gated_conv2d_backward_flops(input, weight, conv_out, stride, padding, dilation, groups, mix_weight,
                                       output_mask)


_TRITON_FORMULAS = {
    "gated_conv2d": _triton_gated_conv2d_flop,
    "gated_conv2d_backward": _triton_gated_conv2d_backward_flop,
    "gated_conv2d_fused": _triton_gated_conv2d_fused_flop,
    "gated_conv2d_fused_backward": _triton_gated_conv2d_fused_backward_flop,
}


def register_triton() -> None:
    """Registers the formulas of the coordgate_ext_triton ops, which exist once
    ops/triton_ops.py has been imported (it calls this). Idempotent."""
    namespace = torch.ops.coordgate_ext_triton
    for name, formula in _TRITON_FORMULAS.items():
        op = getattr(namespace, name)
        if op not in flop_registry:
            register_flop_formula(op)(formula)
