"""Launchers of the gated-convolution Triton kernels (kernels.py), forward and backward.

The launchers take the arguments of coordgate_ext.reference.gated_conv2d (zero padding,
symmetric ``padding`` = (ph, pw)) and allocate the outputs; the operator registration,
fake kernels and autograd live in coordgate_ext.ops.triton_ops.

Gate modes (DESIGN.md section 4): ``gate`` is either a (C, Ho, Wo) map that the kernels load,
or an ``Encoder`` (the MLP's layers) that the forward kernels evaluate per tile. ``gate_mode``
is the documented heuristic that picks one when both are possible.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from .. import reference
from ..ops.gated_conv2d import conv_output_size, output_memory_format
from . import configs as _configs
from ._runtime import kernels_for
from .configs import TileConfig, choose

__all__ = ["Encoder", "gate_mode", "forward", "backward", "MAX_ENCODER_WIDTH"]

#: The in-kernel encoder keeps a (BLOCK_M, E) hidden activation per layer in registers.
MAX_ENCODER_WIDTH = 64


@dataclasses.dataclass
class Encoder:
    """An MLP coordinate encoder, layers in nn.Linear's layout (see reference.mlp_gate)."""

    weights: Sequence[torch.Tensor]
    biases: Sequence[torch.Tensor]
    hidden_activation: str
    gate_activation: str

    def gate_map(self, height: int, width: int) -> torch.Tensor:
        return reference.mlp_gate(self.weights, self.biases, height, width,
                                  self.hidden_activation, self.gate_activation)


def gate_mode(encoder: Encoder, batch: int, conv_reduction: int) -> str:
    """"kernel" (evaluate the encoder in the forward kernel) or "map" (compute the (C, Ho, Wo)
    map once with PyTorch and load it).

    The in-kernel encoder costs, per pixel and per output channel, about
    2 + (L-2) * E^2 / C + E multiply-adds, paid once per tile (the batch loop reuses it), where
    the convolution costs batch * Cin_g * KH * KW; the map costs a write and a read of C
    values per pixel plus its own launches. The in-kernel gate is taken when the encoder's
    work is at most a quarter of the convolution's and the hidden width fits the registers
    (E <= MAX_ENCODER_WIDTH); otherwise the map."""
    layers = len(encoder.weights)
    if layers == 1:
        return "kernel"
    width = encoder.weights[0].shape[0]
    channels = encoder.weights[-1].shape[0]
    if width > MAX_ENCODER_WIDTH:
        return "map"
    encoder_work = 2 + (layers - 2) * width * width / channels + width
    return "kernel" if 4 * encoder_work <= batch * conv_reduction else "map"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _allow_tf32(dtype: torch.dtype, interpreted: bool) -> bool:
    return dtype == torch.float32 and not interpreted and torch.backends.cuda.matmul.allow_tf32


_ACTIVATION_CODES = {name: i for i, name in enumerate(reference.ACTIVATIONS)}


def _encoder_args(encoder: Encoder | None, dummy: torch.Tensor, height: int, width: int):
    """(pointer tensors w0, b0, wh, bh, wl, bl), runtime args (E, scale_r, scale_q) and
    constexprs of the in-kernel gate (GATE_MODE 1), or those of GATE_MODE 0."""
    scale_r = 2.0 / (height - 1) if height > 1 else 0.0
    scale_q = 2.0 / (width - 1) if width > 1 else 0.0
    if encoder is None:
        constexprs = dict(GATE_MODE=0, N_LAYERS=1, BLOCK_E=16, HIDDEN_ACT=0, GATE_ACT=0)
        return (dummy,) * 6, (1, scale_r, scale_q), constexprs
    weights = [w.detach().contiguous() for w in encoder.weights]
    biases = [b.detach().contiguous() for b in encoder.biases]
    layers = len(weights)
    width_e = weights[0].shape[0] if layers > 1 else 1
    if layers > 2:
        wh = torch.stack(weights[1:-1])
        bh = torch.stack(biases[1:-1])
    else:
        wh, bh = dummy, dummy
    w0, b0 = (weights[0], biases[0]) if layers > 1 else (dummy, dummy)
    constexprs = dict(
        GATE_MODE=1, N_LAYERS=layers, BLOCK_E=max(16, _next_pow2(width_e)),
        HIDDEN_ACT=_ACTIVATION_CODES[encoder.hidden_activation],
        GATE_ACT=_ACTIVATION_CODES[encoder.gate_activation],
    )
    return (w0, b0, wh, bh, weights[-1], biases[-1]), (width_e, scale_r, scale_q), constexprs


def _check_encoder(encoder: Encoder, channels: int) -> None:
    weights, biases = list(encoder.weights), list(encoder.biases)
    if not weights or len(weights) != len(biases):
        raise ValueError("gated_conv2d (triton): the encoder needs one bias per weight and at least one layer")
    for name in (encoder.hidden_activation, encoder.gate_activation):
        if name not in _ACTIVATION_CODES:
            raise ValueError(f"activation must be one of {', '.join(reference.ACTIVATIONS)}; got {name!r}")
    if weights[0].shape[1] != 2 or weights[-1].shape[0] != channels:
        raise ValueError(
            f"gated_conv2d (triton): the encoder must map 2 coordinates to {channels} channels, got "
            f"layers {[tuple(w.shape) for w in weights]}"
        )
    width = weights[0].shape[0]
    if len(weights) > 1 and width > MAX_ENCODER_WIDTH:
        raise ValueError(
            f"gated_conv2d (triton): the in-kernel gate supports encoder widths up to "
            f"{MAX_ENCODER_WIDTH}, got {width}; pass the gate as a map instead"
        )
    for w in weights[1:-1]:
        if tuple(w.shape) != (width, width):
            raise ValueError("gated_conv2d (triton): the in-kernel gate needs equal hidden widths")


def _launch_kwargs(cfg: TileConfig) -> dict:
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


#: What the Triton kernels compute (float32 accumulation). float64 is refused rather than
#: computed in float32: a user who asks for float64 wants its precision.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype(input: torch.Tensor) -> None:
    if input.dtype not in DTYPES:
        raise TypeError(
            f"gated_conv2d (triton): the Triton backend computes float32, float16 and bfloat16, got "
            f"{input.dtype}; run it with backend='cpu' (CPU tensors), 'cuda' or 'reference'"
        )


def forward(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gate: torch.Tensor | Encoder,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    save_conv: bool,
    mix_weight: torch.Tensor | None = None,
    mix_bias: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, y): out = g * (conv2d(input, weight, bias)) (N, C, Ho, Wo), or with ``mix_weight``
    (Cout, C, 1, 1) the fused block conv1x1(out, mix_weight, mix_bias) (N, Cout, Ho, Wo);
    y = conv2d(input, weight, bias) (N, C, Ho, Wo) when save_conv, else an empty tensor.
    ``gate`` is a (C, Ho, Wo) map or an Encoder evaluated in the kernel. Channels_last in,
    channels_last out."""
    check_dtype(input)
    module, interpreted = kernels_for(input.device)
    n, cin, h, w = input.shape
    c, cin_g, kh, kw = weight.shape
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    ho, wo = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    if cin != cin_g * groups or c % groups:
        raise ValueError(f"gated_conv2d (triton): weight {tuple(weight.shape)} does not fit input "
                         f"{tuple(input.shape)} with groups={groups}")
    if cin_g == 0:
        raise ValueError(f"gated_conv2d (triton): expected at least one input channel per group, got a weight "
                         f"of shape {tuple(weight.shape)}")
    if ho <= 0 or wo <= 0:
        raise ValueError(f"gated_conv2d (triton): the output would be empty ({ho}x{wo})")
    cg = c // groups
    if ho * wo >= 2**31 or h * w >= 2**31:
        raise ValueError("gated_conv2d (triton): an image plane must hold fewer than 2^31 pixels")
    fmt = output_memory_format(input)
    encoder = gate if isinstance(gate, Encoder) else None
    if encoder is not None:
        _check_encoder(encoder, c)
        g = input
    else:
        g = gate
        if tuple(g.shape) != (c, ho, wo):
            raise ValueError(f"gated_conv2d (triton): expected a gate of shape {(c, ho, wo)}, got {tuple(g.shape)}")
    y = torch.empty((n, c, ho, wo), dtype=input.dtype, device=input.device, memory_format=fmt) if save_conv \
        else input.new_empty((0,))
    y_strides = y.stride() if save_conv else (0, 0, 0, 0)
    enc_ptrs, enc_args, enc_constexprs = _encoder_args(encoder, input, ho, wo)
    gstrides = g.stride() if encoder is None else (0, 0, 0)
    common = dict(UPCAST=interpreted, ALLOW_TF32=_allow_tf32(input.dtype, interpreted), **enc_constexprs)
    b = bias if bias is not None else input
    if mix_weight is None:
        out = torch.empty((n, c, ho, wo), dtype=input.dtype, device=input.device, memory_format=fmt)
        assert not save_conv or y.stride() == out.stride()
        cfg = config or choose(_configs.FWD_CONFIGS, ho * wo, cg)
        grid = (triton_cdiv(ho * wo, cfg.block_m), groups * triton_cdiv(cg, cfg.block_n))
        if n > 0:
            module._gated_conv2d_fwd_kernel[grid](
                input, weight, b, g, *enc_ptrs, out, y if save_conv else input,
                n, h, w, cin_g, cg, ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, *enc_args,
                *input.stride(), *weight.stride(), *gstrides, *out.stride(),
                HAS_BIAS=bias is not None, SAVE_Y=save_conv,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **common,
                **_launch_kwargs(cfg),
            )
        return out, y
    if encoder is not None:
        raise ValueError(
            "gated_conv2d (triton): the in-kernel gate is not combined with the fused mix (with "
            "both accumulators live its registers spill); pass the gate as a map"
        )
    cout = mix_weight.shape[0]
    if tuple(mix_weight.shape) != (cout, c, 1, 1):
        raise ValueError(f"gated_conv2d (triton): expected a mix weight of shape (Cout, {c}, 1, 1), got "
                         f"{tuple(mix_weight.shape)}")
    if cout > _configs.MAX_MIX_CHANNELS:
        raise ValueError(f"gated_conv2d (triton): the fused mix supports at most "
                         f"{_configs.MAX_MIX_CHANNELS} output channels, got {cout}")
    out = torch.empty((n, cout, ho, wo), dtype=input.dtype, device=input.device, memory_format=fmt)
    cfg = config or choose(_configs.MIX_CONFIGS, ho * wo, cg)
    grid = (triton_cdiv(ho * wo, cfg.block_m),)
    mb = mix_bias if mix_bias is not None else input
    if n > 0:
        module._gated_conv2d_mix_fwd_kernel[grid](
            input, weight, b, g, *enc_ptrs, mix_weight, mb, out, y if save_conv else input,
            n, h, w, cin_g, cg, groups, cout, ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, *enc_args,
            *input.stride(), *weight.stride(), *gstrides, mix_weight.stride(0), mix_weight.stride(1),
            *out.stride(), *y_strides,
            HAS_BIAS=bias is not None, HAS_MIX_BIAS=mix_bias is not None, SAVE_Y=save_conv,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            BLOCK_O=max(16, _next_pow2(cout)), **common, **_launch_kwargs(cfg),
        )
    return out, y


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split_k(device: torch.device, programs: int, steps: int) -> int:
    """Split-K factor of the weight-gradient kernel: enough programs to fill a GPU (two waves
    of its multiprocessors), each keeping at least eight reduction steps; 1 on the
    interpreter, where programs run one after another anyway."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton_cdiv(target, programs), steps // 8))


def backward(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gate: torch.Tensor,
    conv: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
    configs: dict | None = None,
    split_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias, grad_gate) of out = g * conv2d(input, weight, bias),
    an empty tensor where output_mask is false. ``conv`` is the saved y, or empty: then the
    gate-gradient kernel recomputes y. ``configs`` maps "bwd_gate" / "bwd_input" /
    "bwd_weight" to a TileConfig (the tests' override); ``split_k`` forces the split of the
    weight gradient's reduction."""
    check_dtype(input)
    module, interpreted = kernels_for(input.device)
    configs = configs or {}
    need_input, need_weight, need_bias, need_gate = output_mask
    need_bias = need_bias and bias is not None
    n, cin, h, w = input.shape
    c, cin_g, kh, kw = weight.shape
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    ho, wo = grad_out.shape[2:]
    cg = c // groups
    gate = gate.contiguous()
    common = dict(UPCAST=interpreted, ALLOW_TF32=_allow_tf32(input.dtype, interpreted))
    # Distinct empty tensors: outputs of an operator may not alias each other.
    grad_input, grad_weight, grad_bias, grad_gate = (input.new_empty((0,)) for _ in range(4))

    if need_gate or need_bias:
        cfg = configs.get("bwd_gate") or choose(_configs.BWD_GATE_CONFIGS, ho * wo, cg)
        tiles = triton_cdiv(ho * wo, cfg.block_m)
        grad_gate = torch.empty_like(gate) if need_gate else grad_gate
        db_part = torch.zeros((tiles, c), dtype=torch.float32, device=input.device) if need_bias else input
        recompute = need_gate and conv.numel() == 0
        y = conv if conv.numel() else input
        y_strides = conv.stride() if conv.numel() else (0, 0, 0, 0)
        grid = (tiles, groups * triton_cdiv(cg, cfg.block_n))
        module._gated_conv2d_bwd_gate_kernel[grid](
            grad_out, input, weight, bias if bias is not None else input, gate, y,
            grad_gate if need_gate else input, db_part if need_bias else input,
            n, h, w, cin_g, cg, c, ho, wo, kh, kw, sh, sw, ph, pw, dh, dw,
            *grad_out.stride(), *input.stride(), *weight.stride(), *gate.stride(), *y_strides,
            HAS_BIAS=bias is not None, NEED_DG=need_gate, NEED_DB=need_bias, RECOMPUTE=recompute,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **common,
            **_launch_kwargs(cfg),
        )
        if need_bias:
            grad_bias = db_part.sum(0).to(bias.dtype)

    if need_input:
        grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device,
                                 memory_format=output_memory_format(input))
        cfg = configs.get("bwd_input") or choose(_configs.BWD_INPUT_CONFIGS, h * w, cin_g)
        grid = (triton_cdiv(h * w, cfg.block_m), groups * triton_cdiv(cin_g, cfg.block_n), n)
        if n > 0:
            module._gated_conv2d_bwd_input_kernel[grid](
                grad_out, weight, gate, grad_input,
                h, w, cin_g, cg, ho, wo, kh, kw, sh, sw, ph, pw, dh, dw,
                *grad_out.stride(), *weight.stride(), *gate.stride(), *grad_input.stride(),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **common,
                **_launch_kwargs(cfg),
            )

    if need_weight:
        cfg = configs.get("bwd_weight") or choose(_configs.BWD_WEIGHT_CONFIGS, cg, cin_g)
        steps = n * triton_cdiv(ho * wo, cfg.block_k)
        programs = groups * triton_cdiv(cg, cfg.block_m) * kh * kw * triton_cdiv(cin_g, cfg.block_n)
        splits = split_k or _split_k(input.device, programs, steps)
        per_split = max(1, triton_cdiv(steps, splits))
        splits = max(1, triton_cdiv(steps, per_split))
        part = torch.zeros((splits, c, cin_g * kh * kw), dtype=torch.float32, device=input.device)
        grid = (groups * triton_cdiv(cg, cfg.block_m), kh * kw * triton_cdiv(cin_g, cfg.block_n), splits)
        module._gated_conv2d_bwd_weight_kernel[grid](
            grad_out, input, gate, part,
            n, h, w, cin_g, cg, ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, per_split,
            *grad_out.stride(), *input.stride(), *gate.stride(), part.stride(0), part.stride(1),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **common,
            **_launch_kwargs(cfg),
        )
        grad_weight = part.sum(0).reshape(weight.shape).to(weight.dtype)
    return grad_input, grad_weight, grad_bias, grad_gate
