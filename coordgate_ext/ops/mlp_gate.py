"""Fake kernel and autograd formula of coordgate_ext::mlp_gate (the MLP encoder's gate map;
ops/vmap.py registers the formula and the vmap rule)."""

from __future__ import annotations

import torch

from ._library import loaded

if loaded():

    @torch.library.register_fake("coordgate_ext::mlp_gate")
    def _mlp_gate_fake(weights, biases, height, width, hidden_activation, gate_activation):
        return weights[-1].new_empty((weights[-1].shape[0], height, width))

    @torch.library.register_fake("coordgate_ext::mlp_gate_backward")
    def _mlp_gate_backward_fake(
        grad_gate, weights, biases, height, width, hidden_activation, gate_activation
    ):
        return [torch.empty_like(w) for w in weights], [torch.empty_like(b) for b in biases]

    def _setup_context(ctx, inputs, output):
        weights, biases, height, width, hidden_activation, gate_activation = inputs
        ctx.save_for_backward(*weights, *biases)
        ctx.layers = len(weights)
        ctx.args = (height, width, hidden_activation, gate_activation)

    def _backward(ctx, grad_gate):
        saved = ctx.saved_tensors
        weights, biases = list(saved[: ctx.layers]), list(saved[ctx.layers :])
        grad_w, grad_b = torch.ops.coordgate_ext.mlp_gate_backward(
            grad_gate, weights, biases, *ctx.args
        )
        return list(grad_w), list(grad_b), None, None, None, None
