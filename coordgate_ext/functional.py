"""The functional API: gate maps and the gated convolution, dispatched to a backend.

Every function takes ``backend=`` ("auto", "reference", "cpu", "triton", "cuda"); the choice
is made by coordgate_ext.ops.dispatch.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from . import reference
from .ops import dispatch
from .ops.gated_conv2d import conv_output_size, output_memory_format

__all__ = ["coordgate_conv2d", "mlp_gate", "MLPGate", "conv2d_output_size", "PADDING_MODES"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def is_int(value) -> bool:
    """An int, and not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _pair(value, name: str) -> tuple[int, int]:
    if is_int(value):
        return (value, value)
    pair = tuple(value) if isinstance(value, (tuple, list, torch.Size)) else None
    if pair is None or len(pair) != 2 or not all(is_int(v) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def _same_padding(kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding of padding='same' at stride 1: the extra pixel of an
    odd total goes to the bottom / right, as in nn.Conv2d."""
    total_h = dilation[0] * (kernel[0] - 1)
    total_w = dilation[1] * (kernel[1] - 1)
    return (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)


def _explicit_padding(padding, kernel, stride, dilation) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) for an int, pair, 'same' or 'valid' padding."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            return _same_padding(kernel, dilation)
        raise ValueError(f"padding must be 'same', 'valid', an int or a pair; got {padding!r}")
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return (ph, ph, pw, pw)


def conv2d_output_size(
    height: int, width: int, kernel_size, stride=1, padding=0, dilation=1
) -> tuple[int, int]:
    """(Ho, Wo) of nn.Conv2d with these arguments (padding may be 'same' or 'valid')."""
    kernel, stride, dilation = (_pair(kernel_size, "kernel_size"), _pair(stride, "stride"),
                                _pair(dilation, "dilation"))
    top, bottom, left, right = _explicit_padding(padding, kernel, stride, dilation)
    ho = (height + top + bottom - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (width + left + right - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return ho, wo


def mlp_gate(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    height: int,
    width: int,
    hidden_activation: str = "relu",
    gate_activation: str = "relu",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """(C, height, width) gate of an MLP coordinate encoder; see reference.mlp_gate."""
    for name in (hidden_activation, gate_activation):
        if name not in reference.ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {', '.join(reference.ACTIVATIONS)}; got {name!r}"
            )
    weights, biases = list(weights), list(biases)
    if not weights:
        # An empty tensor list cannot be dispatched to any kernel: say so here.
        raise ValueError("mlp_gate: expected at least one encoder layer, got none")
    # The Triton backend takes the gate as a map computed by PyTorch here (its kernels
    # evaluate the encoder themselves when given an MLPGate).
    if dispatch.resolve(backend, weights[0].device) in ("reference", "triton"):
        return reference.mlp_gate(weights, biases, height, width, hidden_activation, gate_activation)
    return torch.ops.coordgate_ext.mlp_gate(
        weights, biases, height, width, hidden_activation, gate_activation
    )


class MLPGate(NamedTuple):
    """An MLP encoder's parameters, passed as ``gate`` to have the gated convolution evaluate
    the gate itself on its output grid: in forward, and again in backward, so that nothing of
    the gate's size (C, Ho, Wo) is kept for backward."""

    weights: Sequence[torch.Tensor]
    biases: Sequence[torch.Tensor]
    hidden_activation: str = "relu"
    gate_activation: str = "relu"


def _autocast(*tensors):
    """Casts floating tensors to the autocast dtype when autocast is on for their device."""
    device_type = next(t for t in tensors if t is not None).device.type
    # Devices without autocast (meta) would make is_autocast_enabled raise.
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def coordgate_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gate: torch.Tensor | MLPGate,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    padding_mode: str = "zeros",
    mix_weight: torch.Tensor | None = None,
    mix_bias: torch.Tensor | None = None,
    recompute: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Gated convolution: ``gate[None] * conv2d(input, weight, bias)``, then optionally a 1x1
    channel mix ``conv2d(., mix_weight (Cout, C, 1, 1), mix_bias)``.

    input (N, Cin, H, W); weight (C, Cin/groups, kh, kw); bias (C) or None; gate (C, Ho, Wo)
    on the convolution's output grid, or an MLPGate whose gate the op evaluates itself.
    stride / padding / dilation / groups / padding_mode mean what they mean for nn.Conv2d
    (padding may be 'same' or 'valid'). ``recompute=True`` keeps
    only the input for backward and recomputes the convolution there. Returns (N, C, Ho, Wo),
    or (N, Cout, Ho, Wo) with a mix.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {', '.join(PADDING_MODES)}; got {padding_mode!r}")
    if input.dim() != 4:
        raise ValueError(f"coordgate_conv2d: expected a 4-D input (N, Cin, H, W), got {input.dim()}-D")
    if weight.dim() != 4:
        raise ValueError(
            f"coordgate_conv2d: expected a 4-D weight (C, Cin/groups, kh, kw), got {weight.dim()}-D"
        )
    if weight.shape[1] == 0:
        # The specification cannot gate it either: F.conv2d returns no output channels.
        raise ValueError(f"coordgate_conv2d: expected at least one input channel per group, got a weight of "
                         f"shape {list(weight.shape)}")
    gate_tensors = gate if isinstance(gate, torch.Tensor) else gate.weights[0]
    for name, t in (("weight", weight), ("bias", bias), ("gate", gate_tensors), ("mix_weight", mix_weight),
                    ("mix_bias", mix_bias)):
        if t is not None and t.device != input.device:
            raise ValueError(
                f"coordgate_conv2d: every tensor must be on the input's device ({input.device}); "
                f"{name} is on {t.device}"
            )
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    top, bottom, left, right = _explicit_padding(padding, tuple(weight.shape[2:]), stride, dilation)
    if padding_mode != "zeros" or top != bottom or left != right:
        mode = "constant" if padding_mode == "zeros" else padding_mode
        channels_last = output_memory_format(input) == torch.channels_last
        input = F.pad(input, (left, right, top, bottom), mode=mode)
        # Some padding modes return NCHW whatever the input: channels_last in, channels_last out
        # (by a permuted copy: vmap cannot run .contiguous(memory_format=torch.channels_last)).
        input = input.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) if channels_last else input.contiguous()
        top = left = 0
    if isinstance(gate, torch.Tensor):
        input, weight, bias, gate, mix_weight, mix_bias = _autocast(
            input, weight, bias, gate, mix_weight, mix_bias
        )
        gate_needs_grad = gate.requires_grad
    else:
        # The encoder's parameters keep their dtype: the gate's maths is done in it.
        input, weight, bias, mix_weight, mix_bias = _autocast(input, weight, bias, mix_weight, mix_bias)
        gate_needs_grad = any(t.requires_grad for t in (*gate.weights, *gate.biases))
    pad = (top, left)
    # The ungated convolution is what the gate's and the mix weight's gradients need.
    mix_needs_grad = mix_weight is not None and mix_weight.requires_grad
    save_conv = torch.is_grad_enabled() and (gate_needs_grad or mix_needs_grad) and not recompute
    backend = dispatch.resolve(backend, input.device, input.dtype)
    if backend == "triton":
        from .ops import triton_ops  # imports triton: only when this backend runs

        if isinstance(gate, MLPGate):
            return triton_ops.coordgate_conv2d_encoder(
                input, weight, bias, gate.weights, gate.biases, gate.hidden_activation,
                gate.gate_activation, stride, pad, dilation, groups, mix_weight, mix_bias, recompute
            )
        return triton_ops.coordgate_conv2d(input, weight, bias, gate, stride, pad, dilation, groups,
                                           mix_weight, mix_bias, recompute)
    if backend == "reference":
        if isinstance(gate, MLPGate):
            out_h = conv_output_size(input.shape[2], weight.shape[2], stride[0], top, dilation[0])
            out_w = conv_output_size(input.shape[3], weight.shape[3], stride[1], left, dilation[1])
            gate = reference.mlp_gate(list(gate.weights), list(gate.biases), out_h, out_w,
                                      gate.hidden_activation, gate.gate_activation).to(input.dtype)
        out = reference.gated_conv2d(input, weight, bias, gate, stride, pad, dilation, groups)
        return out if mix_weight is None else F.conv2d(out, mix_weight, mix_bias)
    if isinstance(gate, MLPGate):
        out, _ = torch.ops.coordgate_ext.mlp_gated_conv2d(
            input, weight, bias, list(gate.weights), list(gate.biases), gate.hidden_activation,
            gate.gate_activation, stride, pad, dilation, groups, mix_weight, mix_bias, save_conv
        )
        return out
    out, _ = torch.ops.coordgate_ext.gated_conv2d(
        input, weight, bias, gate, stride, pad, dilation, groups, mix_weight, mix_bias, save_conv
    )
    return out
