"""The Triton operators, namespace ``coordgate_ext_triton`` (torch.library.custom_op): fake
kernels and autograd for each, so torch.compile(fullgraph=True) traces them as single nodes.

    gated_conv2d / gated_conv2d_backward     the schema of coordgate_ext::gated_conv2d, run by
                                             the Triton kernels (gate as a (C, Ho, Wo) map)
    gated_conv2d_fused / ..._fused_backward  the general form: the gate as a map or evaluated
                                             in the kernel from the MLP encoder's layers, and
                                             an optional fused 1x1 mix

The encoder's gradients follow from the gate gradient through the reference encoder (it is
tiny); the mix's backward (dz = M^T dout, dM = sum dout z^T) runs as two ATen GEMMs before the
gated convolution's backward kernels. The namespace is separate from coordgate_ext (whose
schemas live in csrc/ops.cpp) so that importing triton stays optional; OPS lists it for the
opcheck meta-test of tests/triton.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import reference
from ..triton import configs as _configs
from ..triton import gated_conv2d as _launch
from .flops import register_triton as _register_flop_formulas
from .gated_conv2d import conv_output_size, output_memory_format
from .vmap import register as _register_torch_func

NAMESPACE = "coordgate_ext_triton"
OPS = ("gated_conv2d", "gated_conv2d_backward", "gated_conv2d_fused", "gated_conv2d_fused_backward")

__all__ = ["OPS", "NAMESPACE", "coordgate_conv2d", "coordgate_conv2d_encoder"]


def _out_shape(input, weight, stride, padding, dilation, channels=None):
    ho = conv_output_size(input.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    wo = conv_output_size(input.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return (input.shape[0], weight.shape[0] if channels is None else channels, ho, wo)


def _empty_like_out(input, shape):
    return input.new_empty(shape).contiguous(memory_format=output_memory_format(input))


# --- gated_conv2d: the schema of coordgate_ext::gated_conv2d -------------------------------

@torch.library.custom_op(f"{NAMESPACE}::gated_conv2d", mutates_args=())
def gated_conv2d(
    input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gate: torch.Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int, save_conv: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, conv): out = gate[None] * conv2d(input, weight, bias); conv = the ungated
    convolution when save_conv, else empty."""
    return _launch.forward(input, weight, bias, gate, stride, padding, dilation, groups, save_conv)


@gated_conv2d.register_fake
def _(input, weight, bias, gate, stride, padding, dilation, groups, save_conv):
    shape = _out_shape(input, weight, stride, padding, dilation)
    conv = _empty_like_out(input, shape) if save_conv else input.new_empty((0,))
    return _empty_like_out(input, shape), conv


@torch.library.custom_op(f"{NAMESPACE}::gated_conv2d_backward", mutates_args=())
def gated_conv2d_backward(
    grad_out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    gate: torch.Tensor, conv_out: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], groups: int, output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias, grad_gate), empty where output_mask is false; an
    empty conv_out means: recompute it."""
    return _launch.backward(grad_out.contiguous(memory_format=output_memory_format(grad_out)), input, weight,
                            bias, gate, conv_out, stride, padding, dilation, groups, output_mask)


def _backward_fakes(input, weight, bias, gate, mask):
    empty = lambda: input.new_empty((0,))  # noqa: E731
    return (
        _empty_like_out(input, input.shape) if mask[0] else empty(),
        weight.new_empty(weight.shape) if mask[1] else empty(),
        input.new_empty((weight.shape[0],)) if mask[2] and bias is not None else empty(),
        gate.new_empty(gate.shape) if mask[3] else empty(),
    )


@gated_conv2d_backward.register_fake
def _(grad_out, input, weight, bias, gate, conv_out, stride, padding, dilation, groups, output_mask):
    return _backward_fakes(input, weight, bias, gate, output_mask)


def _setup_plain(ctx, inputs, output):
    input, weight, bias, gate, stride, padding, dilation, groups, save_conv = inputs
    ctx.save_for_backward(input, weight, bias, gate, output[1])
    ctx.geometry = (stride, padding, dilation, groups)


def _backward_plain(ctx, grad_out, _grad_conv):
    input, weight, bias, gate, conv = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1], needs[2] and bias is not None, needs[3]]
    grads = gated_conv2d_backward(grad_out, input, weight, bias, gate, conv, *ctx.geometry, mask)
    return tuple(g if m else None for g, m in zip(grads, mask)) + (None,) * 5


# --- gated_conv2d_fused: in-kernel gate and / or fused mix ----------------------------------

@torch.library.custom_op(f"{NAMESPACE}::gated_conv2d_fused", mutates_args=())
def gated_conv2d_fused(
    input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    encoder_weights: list[torch.Tensor], encoder_biases: list[torch.Tensor],
    hidden_activation: str, gate_activation: str,
    mix_weight: Optional[torch.Tensor], mix_bias: Optional[torch.Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int, save_conv: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, conv). The gate is ``gate`` (C, Ho, Wo) when given, else the MLP encoder
    (encoder_weights / encoder_biases, nn.Linear layout) evaluated inside the kernel; with
    mix_weight (Cout, C, 1, 1) out = conv1x1(gated, mix_weight, mix_bias) is fused in the
    epilogue. conv = the ungated convolution when save_conv, else empty."""
    if gate is None:
        gate_arg = _launch.Encoder(encoder_weights, encoder_biases, hidden_activation, gate_activation)
    else:
        if encoder_weights:
            raise ValueError("gated_conv2d_fused: pass either a gate map or encoder layers, not both")
        gate_arg = gate
    return _launch.forward(input, weight, bias, gate_arg, stride, padding, dilation, groups, save_conv,
                           mix_weight, mix_bias)


@gated_conv2d_fused.register_fake
def _(input, weight, bias, gate, encoder_weights, encoder_biases, hidden_activation, gate_activation,
      mix_weight, mix_bias, stride, padding, dilation, groups, save_conv):
    shape = _out_shape(input, weight, stride, padding, dilation)
    conv = _empty_like_out(input, shape) if save_conv else input.new_empty((0,))
    channels = mix_weight.shape[0] if mix_weight is not None else None
    return _empty_like_out(input, _out_shape(input, weight, stride, padding, dilation, channels)), conv


@torch.library.custom_op(f"{NAMESPACE}::gated_conv2d_fused_backward", mutates_args=())
def gated_conv2d_fused_backward(
    grad_out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    gate: torch.Tensor, conv_out: torch.Tensor, mix_weight: Optional[torch.Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias, grad_gate, grad_mix_weight, grad_mix_bias) of
    gated_conv2d_fused, with the gate given as its (C, Ho, Wo) map; empty where output_mask
    is false. An empty conv_out means: recompute it."""
    need_input, need_weight, need_bias, need_gate, need_mix_w, need_mix_b = output_mask
    grad_mix_w, grad_mix_b = input.new_empty((0,)), input.new_empty((0,))
    fmt = output_memory_format(input)
    grad_out = grad_out.contiguous(memory_format=output_memory_format(grad_out))
    if mix_weight is None:
        dz = grad_out
    else:
        needs_y = need_gate or need_mix_w
        if needs_y and conv_out.numel() == 0:
            _, conv_out = _launch.forward(input, weight, bias, gate, stride, padding, dilation, groups, True)
        # dz[n, c] = sum_o M[o, c] dout[n, o]: the 1x1 mix's input gradient.
        dz = F.conv2d(grad_out, mix_weight.transpose(0, 1)).contiguous(memory_format=fmt)
        if need_mix_w:
            z = conv_out * gate[None]
            grad_mix_w = torch.einsum("nohw,nchw->oc", grad_out.float(), z.float()).to(mix_weight.dtype)[:, :, None, None]
        if need_mix_b:
            grad_mix_b = grad_out.float().sum((0, 2, 3)).to(grad_out.dtype)
    grads = _launch.backward(dz, input, weight, bias, gate, conv_out, stride, padding, dilation, groups,
                             [need_input, need_weight, need_bias, need_gate])
    return (*grads, grad_mix_w, grad_mix_b)


@gated_conv2d_fused_backward.register_fake
def _(grad_out, input, weight, bias, gate, conv_out, mix_weight, stride, padding, dilation, groups, output_mask):
    grads = _backward_fakes(input, weight, bias, gate, output_mask[:4])
    grad_mix_w = mix_weight.new_empty(mix_weight.shape) if output_mask[4] and mix_weight is not None \
        else input.new_empty((0,))
    grad_mix_b = input.new_empty((mix_weight.shape[0],)) if output_mask[5] and mix_weight is not None \
        else input.new_empty((0,))
    return (*grads, grad_mix_w, grad_mix_b)


def _setup_fused(ctx, inputs, output):
    (input, weight, bias, gate, enc_w, enc_b, hidden_act, gate_act, mix_weight, mix_bias,
     stride, padding, dilation, groups, save_conv) = inputs
    ctx.layers = len(enc_w)
    ctx.has_gate = gate is not None
    ctx.activations = (hidden_act, gate_act)
    ctx.has_mix_bias = mix_bias is not None
    ctx.save_for_backward(input, weight, bias, gate, mix_weight, output[1], *enc_w, *enc_b)
    ctx.geometry = (stride, padding, dilation, groups)


def _backward_fused(ctx, grad_out, _grad_conv):
    input, weight, bias, gate, mix_weight, conv, *encoder = ctx.saved_tensors
    enc_w, enc_b = encoder[: ctx.layers], encoder[ctx.layers:]
    needs = ctx.needs_input_grad
    # A list input's entry is a list of flags, one per tensor.
    need_encoder = any(needs[4]) or any(needs[5]) if ctx.layers else False
    ho, wo = grad_out.shape[2:]
    if ctx.has_gate:
        gate_map = gate
    else:
        # torch.func.vjp, not requires_grad_ and autograd.grad: under torch.func.grad this
        # backward runs inside the transform, where those raise.
        def encoder_gate(*params):
            return reference.mlp_gate(list(params[: ctx.layers]), list(params[ctx.layers:]), ho, wo,
                                      *ctx.activations)

        gate_map, gate_vjp = torch.func.vjp(encoder_gate, *(t.detach() for t in (*enc_w, *enc_b)))
    mask = [needs[0], needs[1], needs[2] and bias is not None, needs[3] or need_encoder,
            mix_weight is not None and needs[8], ctx.has_mix_bias and needs[9]]
    grads = gated_conv2d_fused_backward(
        grad_out, input, weight, bias, gate_map.detach().to(input.dtype), conv, mix_weight, *ctx.geometry, mask
    )
    gi, gw, gb, gg, gmw, gmb = (g if m else None for g, m in zip(grads, mask))
    grad_enc_w, grad_enc_b = [None] * ctx.layers, [None] * ctx.layers
    if need_encoder:
        enc_grads = gate_vjp(gg.to(gate_map.dtype))
        grad_enc_w, grad_enc_b = list(enc_grads[: ctx.layers]), list(enc_grads[ctx.layers:])
    return (gi, gw, gb, gg if ctx.has_gate and needs[3] else None, grad_enc_w, grad_enc_b, None, None,
            gmw, gmb, None, None, None, None, None)


_register_flop_formulas()


# --- entry points of the functional API ------------------------------------------------------

def _save_conv(recompute: bool, *tensors) -> bool:
    return torch.is_grad_enabled() and not recompute and any(
        t is not None and t.requires_grad for t in tensors
    )


def coordgate_conv2d(input, weight, bias, gate, stride, padding, dilation, groups,
                     mix_weight=None, mix_bias=None, recompute=False) -> torch.Tensor:
    """The Triton path of functional.coordgate_conv2d (zero, symmetric padding): the mix is
    fused when it has at most configs.MAX_MIX_CHANNELS outputs, else a separate conv1x1."""
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    if mix_weight is not None and mix_weight.shape[0] <= _configs.MAX_MIX_CHANNELS:
        save = _save_conv(recompute, gate, mix_weight)
        out, _ = gated_conv2d_fused(input, weight, bias, gate, [], [], "none", "none", mix_weight, mix_bias,
                                    stride, padding, dilation, groups, save)
        return out
    out, _ = gated_conv2d(input, weight, bias, gate, stride, padding, dilation, groups,
                          _save_conv(recompute, gate))
    if mix_weight is not None:
        out = F.conv2d(out, mix_weight, mix_bias)
    return out


def coordgate_conv2d_encoder(input, weight, bias, encoder_weights, encoder_biases, hidden_activation,
                             gate_activation, stride, padding, dilation, groups, mix_weight=None,
                             mix_bias=None, recompute=False, gate_mode="auto") -> torch.Tensor:
    """The gated convolution with the MLP encoder's gate: evaluated inside the kernel
    (gate_mode="kernel") or computed as a map first ("map"); "auto" asks
    triton.gated_conv2d.gate_mode (the documented heuristic). Zero, symmetric padding."""
    encoder_weights, encoder_biases = list(encoder_weights), list(encoder_biases)
    if gate_mode == "auto" and mix_weight is not None:
        gate_mode = "map"  # the mix kernel takes the gate as a map only
    if gate_mode == "auto":
        reduction = weight.shape[1] * weight.shape[2] * weight.shape[3]
        gate_mode = _launch.gate_mode(
            _launch.Encoder(encoder_weights, encoder_biases, hidden_activation, gate_activation),
            input.shape[0], reduction)
    if gate_mode == "map":
        ho, wo = _out_shape(input, weight, stride, padding, dilation)[2:]
        gate = reference.mlp_gate(encoder_weights, encoder_biases, ho, wo, hidden_activation,
                                  gate_activation).to(input.dtype)
        return coordgate_conv2d(input, weight, bias, gate, stride, padding, dilation, groups,
                                mix_weight, mix_bias, recompute)
    if gate_mode != "kernel":
        raise ValueError(f"gate_mode must be 'auto', 'kernel' or 'map'; got {gate_mode!r}")
    if mix_weight is not None:
        raise ValueError("gate_mode='kernel' is not available with a mix; use gate_mode='map' or 'auto'")
    save = _save_conv(recompute, *encoder_weights, *encoder_biases, mix_weight)
    out, _ = gated_conv2d_fused(input, weight, bias, None, encoder_weights, encoder_biases, hidden_activation,
                                gate_activation, mix_weight, mix_bias, list(stride), list(padding),
                                list(dilation), groups, save)
    return out


_register_torch_func(NAMESPACE, OPS, {"gated_conv2d": (_backward_plain, _setup_plain),
                                      "gated_conv2d_fused": (_backward_fused, _setup_fused)})
