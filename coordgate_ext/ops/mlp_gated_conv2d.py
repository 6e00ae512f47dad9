"""Fake kernels and autograd of coordgate_ext::mlp_gated_conv2d: the gated convolution with
the MLP encoder evaluated inside the op (and again in backward)."""

from __future__ import annotations

import torch

from ._library import loaded
from .gated_conv2d import fake_gated_grads, fake_gated_outputs

if loaded():

    @torch.library.register_fake("coordgate_ext::mlp_gated_conv2d")
    def _mlp_gated_conv2d_fake(input, weight, bias, encoder_weights, encoder_biases, hidden_activation,
                               gate_activation, stride, padding, dilation, groups, mix_weight, mix_bias,
                               save_conv):
        return fake_gated_outputs(input, weight, stride, padding, dilation, mix_weight, save_conv)

    @torch.library.register_fake("coordgate_ext::mlp_gated_conv2d_backward")
    def _mlp_gated_conv2d_backward_fake(grad_out, input, weight, bias, encoder_weights, encoder_biases,
                                        hidden_activation, gate_activation, conv_out, stride, padding,
                                        dilation, groups, mix_weight, mix_bias, output_mask):
        grad_input, grad_weight, grad_bias, grad_mix_weight, grad_mix_bias = fake_gated_grads(
            input, weight, bias, mix_weight, mix_bias, output_mask
        )
        need_encoder = output_mask[3]
        grad_w = [torch.empty_like(w) if need_encoder else w.new_empty((0,)) for w in encoder_weights]
        grad_b = [torch.empty_like(b) if need_encoder else b.new_empty((0,)) for b in encoder_biases]
        return grad_input, grad_weight, grad_bias, grad_w, grad_b, grad_mix_weight, grad_mix_bias

    def _setup_context(ctx, inputs, output):
        (input, weight, bias, enc_w, enc_b, hidden_activation, gate_activation, stride, padding,
         dilation, groups, mix_weight, mix_bias, save_conv) = inputs
        _, conv = output
        # The second output (the saved convolution) never receives a gradient: do not let
        # autograd fill a zero tensor of the output's size for it.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input, weight, bias, conv, mix_weight, mix_bias, *enc_w, *enc_b)
        ctx.layers = len(enc_w)
        ctx.activations = (hidden_activation, gate_activation)
        ctx.geometry = (stride, padding, dilation, groups)

    def _backward(ctx, grad_out, _grad_conv):
        if grad_out is None:  # only the saved convolution was used: no gradient flows back
            return (None, None, None, [None] * ctx.layers, [None] * ctx.layers) + (None,) * 9
        input, weight, bias, conv, mix_weight, mix_bias, *encoder = ctx.saved_tensors
        enc_w, enc_b = encoder[: ctx.layers], encoder[ctx.layers :]
        needs = ctx.needs_input_grad
        # needs_input_grad holds one flag per tensor of a Tensor[] argument.
        mask = [needs[0], needs[1], needs[2] and bias is not None, any(needs[3]) or any(needs[4]),
                needs[11] and mix_weight is not None, needs[12] and mix_bias is not None]
        grad_input, grad_weight, grad_bias, grad_w, grad_b, grad_mix_weight, grad_mix_bias = (
            torch.ops.coordgate_ext.mlp_gated_conv2d_backward(
                grad_out, input, weight, bias, enc_w, enc_b, *ctx.activations, conv, *ctx.geometry,
                mix_weight, mix_bias, mask,
            )
        )
        # A Tensor[] argument takes a list of the same length back, even when none of its
        # tensors needs a gradient.
        no_grads = [None] * ctx.layers
        return (
            grad_input if mask[0] else None,
            grad_weight if mask[1] else None,
            grad_bias if mask[2] else None,
            [g if n else None for g, n in zip(grad_w, needs[3])] if mask[3] else no_grads,
            [g if n else None for g, n in zip(grad_b, needs[4])] if mask[3] else no_grads,
        ) + (None,) * 6 + (
            grad_mix_weight if mask[4] else None,
            grad_mix_bias if mask[5] else None,
            None,
        )
