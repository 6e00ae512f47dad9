"""Fake kernels and autograd of coordgate_ext::mlp_gated_conv2d: the gated convolution with
the MLP encoder evaluated inside the op (and again in backward)."""

from __future__ import annotations

import torch

from ._library import _double_backward_unsupported, loaded
from .gated_conv2d import fake_gated_outputs, output_memory_format

if loaded():

    @torch.library.register_fake("coordgate_ext::mlp_gated_conv2d")
    def _mlp_gated_conv2d_fake(input, weight, bias, encoder_weights, encoder_biases, hidden_activation,
                               gate_activation, stride, padding, dilation, groups, save_conv):
        return fake_gated_outputs(input, weight, stride, padding, dilation, save_conv)

    @torch.library.register_fake("coordgate_ext::mlp_gated_conv2d_backward")
    def _mlp_gated_conv2d_backward_fake(grad_out, input, weight, bias, encoder_weights, encoder_biases,
                                        hidden_activation, gate_activation, conv_out, stride, padding,
                                        dilation, groups, output_mask):
        need_input, need_weight, need_bias, need_encoder = output_mask
        fmt = output_memory_format(input)
        empty = lambda like: like.new_empty((0,))  # noqa: E731
        grad_input = input.new_empty(input.shape).contiguous(memory_format=fmt) if need_input else empty(input)
        grad_weight = weight.new_empty(weight.shape) if need_weight else empty(input)
        grad_bias = input.new_empty((weight.shape[0],)) if need_bias and bias is not None else empty(input)
        grad_w = [torch.empty_like(w) if need_encoder else empty(w) for w in encoder_weights]
        grad_b = [torch.empty_like(b) if need_encoder else empty(b) for b in encoder_biases]
        return grad_input, grad_weight, grad_bias, grad_w, grad_b

    def _setup_context(ctx, inputs, output):
        (input, weight, bias, enc_w, enc_b, hidden_activation, gate_activation, stride, padding,
         dilation, groups, save_conv) = inputs
        _, conv = output
        ctx.save_for_backward(input, weight, bias, conv, *enc_w, *enc_b)
        ctx.layers = len(enc_w)
        ctx.activations = (hidden_activation, gate_activation)
        ctx.geometry = (stride, padding, dilation, groups)

    def _backward(ctx, grad_out, _grad_conv):
        input, weight, bias, conv, *encoder = ctx.saved_tensors
        enc_w, enc_b = encoder[: ctx.layers], encoder[ctx.layers :]
        needs = ctx.needs_input_grad
        # needs_input_grad holds one flag per tensor of a Tensor[] argument.
        mask = [needs[0], needs[1], needs[2] and bias is not None, any(needs[3]) or any(needs[4])]
        grad_input, grad_weight, grad_bias, grad_w, grad_b = torch.ops.coordgate_ext.mlp_gated_conv2d_backward(
            grad_out, input, weight, bias, enc_w, enc_b, *ctx.activations, conv, *ctx.geometry, mask
        )
        return (
            grad_input if mask[0] else None,
            grad_weight if mask[1] else None,
            grad_bias if mask[2] else None,
            list(grad_w) if mask[3] else None,
            list(grad_b) if mask[3] else None,
        ) + (None,) * 7

    torch.library.register_autograd(
        "coordgate_ext::mlp_gated_conv2d", _backward, setup_context=_setup_context
    )
    torch.library.register_autograd(
        "coordgate_ext::mlp_gated_conv2d_backward",
        _double_backward_unsupported(),
        setup_context=lambda ctx, inputs, output: None,
    )
