"""Fake kernels and autograd formulas of coordgate_ext::gated_conv2d (ops/vmap.py registers
the formulas and the vmap rule)."""

from __future__ import annotations

import torch

from ._library import loaded


def output_memory_format(input: torch.Tensor) -> torch.memory_format:
    """The rule of csrc/ops.cpp: channels_last out when the input is channels_last (and not
    also plain contiguous). Read from the sizes and strides, which a vmap BatchedTensor
    gives per sample, where is_contiguous(memory_format=...) raises."""

    def dense(order) -> bool:
        # TensorImpl's is_contiguous for dims ``order``, innermost first: size-1 dims ignored.
        expected = 1
        for d in order:
            if input.shape[d] != 1:
                if input.stride(d) != expected:
                    return False
                expected *= input.shape[d]
        return True

    if input.dim() != 4 or input.numel() == 0 or dense((3, 2, 1, 0)):
        return torch.contiguous_format
    return torch.channels_last if dense((1, 3, 2, 0)) else torch.contiguous_format


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def fake_gated_outputs(input, weight, stride, padding, dilation, mix_weight, save_conv):
    """(out, conv) as the gated convolution ops return them, for their fake kernels."""
    torch._check(input.dim() == 4, lambda: "gated_conv2d: expected a 4-D input")
    ho = conv_output_size(input.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    wo = conv_output_size(input.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    shape = (input.shape[0], weight.shape[0], ho, wo)
    out_channels = weight.shape[0] if mix_weight is None else mix_weight.shape[0]
    fmt = output_memory_format(input)
    out = input.new_empty((input.shape[0], out_channels, ho, wo)).contiguous(memory_format=fmt)
    conv = input.new_empty(shape).contiguous(memory_format=fmt) if save_conv else input.new_empty((0,))
    return out, conv


def fake_gated_grads(input, weight, bias, mix_weight, mix_bias, output_mask):
    """(grad_input, grad_weight, grad_bias, grad_mix_weight, grad_mix_bias) of the backward
    ops' fake kernels; empty where the mask says not needed."""
    need_input, need_weight, need_bias, _, need_mix_weight, need_mix_bias = output_mask
    fmt = output_memory_format(input)
    empty = lambda: input.new_empty((0,))  # noqa: E731
    return (
        input.new_empty(input.shape).contiguous(memory_format=fmt) if need_input else empty(),
        weight.new_empty(weight.shape) if need_weight else empty(),
        input.new_empty((weight.shape[0],)) if need_bias and bias is not None else empty(),
        mix_weight.new_empty(mix_weight.shape) if need_mix_weight else empty(),
        input.new_empty((mix_weight.shape[0],)) if need_mix_bias and mix_bias is not None else empty(),
    )


if loaded():

    @torch.library.register_fake("coordgate_ext::gated_conv2d")
    def _gated_conv2d_fake(input, weight, bias, gate, stride, padding, dilation, groups, mix_weight,
                           mix_bias, save_conv):
        return fake_gated_outputs(input, weight, stride, padding, dilation, mix_weight, save_conv)

    @torch.library.register_fake("coordgate_ext::gated_conv2d_backward")
    def _gated_conv2d_backward_fake(grad_out, input, weight, bias, gate, conv_out, stride, padding, dilation,
                                    groups, mix_weight, mix_bias, output_mask):
        grad_input, grad_weight, grad_bias, grad_mix_weight, grad_mix_bias = fake_gated_grads(
            input, weight, bias, mix_weight, mix_bias, output_mask
        )
        grad_gate = gate.new_empty(gate.shape) if output_mask[3] else input.new_empty((0,))
        return grad_input, grad_weight, grad_bias, grad_gate, grad_mix_weight, grad_mix_bias

    def _setup_context(ctx, inputs, output):
        input, weight, bias, gate, stride, padding, dilation, groups, mix_weight, mix_bias, save_conv = inputs
        _, conv = output
        # The second output (the saved convolution) never receives a gradient: do not let
        # autograd fill a zero tensor of the output's size for it.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input, weight, bias, gate, conv, mix_weight, mix_bias)
        ctx.geometry = (stride, padding, dilation, groups)

    def _backward(ctx, grad_out, _grad_conv):
        if grad_out is None:  # only the saved convolution was used: no gradient flows back
            return (None,) * 11
        input, weight, bias, gate, conv, mix_weight, mix_bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], needs[2] and bias is not None, needs[3],
                needs[8] and mix_weight is not None, needs[9] and mix_bias is not None]
        grads = torch.ops.coordgate_ext.gated_conv2d_backward(
            grad_out, input, weight, bias, gate, conv, *ctx.geometry, mix_weight, mix_bias, mask
        )
        grad_input, grad_weight, grad_bias, grad_gate, grad_mix_weight, grad_mix_bias = (
            g if m else None for g, m in zip(grads, mask)
        )
        return (grad_input, grad_weight, grad_bias, grad_gate, None, None, None, None, grad_mix_weight,
                grad_mix_bias, None)
