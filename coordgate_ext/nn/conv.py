"""FusedCoordGateConv2d (the gated convolution) and FusedCoordGateBlock2d (gated convolution
followed by a 1x1 channel mix, the first author's CG_convolution_layer)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import functional
from ..ops import dispatch
from ..ops.gated_conv2d import output_memory_format
from .encoders import GateCache, make_encoder


def check_conv_arguments(name: str, dims: int, kernel_size, stride, padding, dilation) -> None:
    """nn.Conv1d / nn.Conv2d take any value and fail later ("'float' object is not iterable"
    at the first forward): this says at construction which argument is wrong, what was
    expected and what was got."""

    def entries(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims

    for arg, value in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
        if not (len(entries(value)) == dims and all(functional.is_int(v) and v >= 1 for v in entries(value))):
            raise ValueError(f"{name}: {arg} must be a positive int or a tuple of {dims} positive ints, "
                             f"got {value!r}")
    if isinstance(padding, str):
        return  # nn.Conv2d checks the strings
    if not (len(entries(padding)) == dims and all(functional.is_int(v) and v >= 0 for v in entries(padding))):
        raise ValueError(f"{name}: padding must be 'same', 'valid', a non-negative int or a tuple of "
                         f"{dims} of them, got {padding!r}")


class FusedCoordGateConv2d(GateCache, nn.Conv2d):
    """A drop-in nn.Conv2d whose output is gated pixel by pixel by a coordinate encoder:

        out[n, c, i, j] = g[c, i, j] * conv2d(x)[n, c, i, j],   g = encoder(Ho, Wo)

    Every nn.Conv2d argument keeps its meaning (``padding='same'|'valid'`` and every
    ``padding_mode`` included) and any input size works: the gate is evaluated on the output
    grid of each call. Encoder options: ``encoder`` "mlp" (``encoder_layers`` linear layers of
    width ``encoder_hidden``, ``hidden_activation`` between them, ``gate_activation`` at the
    end), "map" or "bilinear" (a learned map of ``map_size``). ``recompute=True`` saves only the
    input for backward. ``backend`` is "auto", "reference", "cpu", "triton" or "cuda".
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        encoder: str = "mlp",
        encoder_layers: int = 2,
        encoder_hidden: int = 32,
        hidden_activation: str = "relu",
        gate_activation: str = "relu",
        gate_init: str = "one",
        map_size=(16, 16),
        recompute: bool = False,
        backend: str = "auto",
    ):
        check_conv_arguments(type(self).__name__, 2, kernel_size, stride, padding, dilation)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype,
        )
        self.encoder = make_encoder(
            encoder, out_channels, layers=encoder_layers, hidden=encoder_hidden,
            hidden_activation=hidden_activation, gate_activation=gate_activation,
            map_size=map_size, gate_init=gate_init, device=device, dtype=dtype,
        )
        self.recompute = recompute
        self.backend = dispatch.check_backend(backend)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return functional.conv2d_output_size(
            height, width, self.kernel_size, self.stride, self.padding, self.dilation
        )

    def _gated(self, input: torch.Tensor, mix_weight=None, mix_bias=None) -> torch.Tensor:
        if input.dim() == 3:
            return self._gated(input.unsqueeze(0), mix_weight, mix_bias).squeeze(0)
        if input.dim() != 4:
            raise ValueError(
                f"{type(self).__name__}: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got "
                f"{input.dim()}-D of shape {tuple(input.shape)}"
            )
        out_h, out_w = self.output_size(input.shape[-2], input.shape[-1])
        if out_h <= 0 or out_w <= 0:
            raise ValueError(
                f"{type(self).__name__}: the output would be empty ({out_h}x{out_w}) for an input of "
                f"{input.shape[-2]}x{input.shape[-1]} and kernel {self.kernel_size}"
            )
        # A channels_last input on the CPU reads a cached gate pixel-major (see _forward_gate).
        pixel_major = input.device.type == "cpu" and output_memory_format(input) == torch.channels_last
        gate = self._forward_gate(out_h, out_w, pixel_major)
        return functional.coordgate_conv2d(
            input, self.weight, self.bias, gate, self.stride, self.padding, self.dilation,
            self.groups, padding_mode=self.padding_mode, mix_weight=mix_weight,
            mix_bias=mix_bias, recompute=self.recompute, backend=self.backend,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._gated(input)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", recompute={self.recompute}, backend={self.backend!r}"


class FusedCoordGateBlock2d(FusedCoordGateConv2d):
    """conv k x k (in_channels -> gated_channels) -> coordinate gate -> 1x1 mix
    (gated_channels -> out_channels), one op: a rank-``gated_channels`` spatially varying
    convolution whose per-pixel kernel is K_o(p) = sum_c M[o, c] g[c, p] W[c]. The other
    arguments are those of FusedCoordGateConv2d; ``mix_bias`` adds a bias to the mix."""

    def __init__(
        self,
        in_channels: int,
        gated_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        mix_bias: bool = True,
        **gate_options,
    ):
        super().__init__(
            in_channels, gated_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype, **gate_options,
        )
        self.mix_out_channels = out_channels
        self.mix_weight = nn.Parameter(torch.empty(out_channels, gated_channels, 1, 1, device=device, dtype=dtype))
        self.mix_bias = (
            nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if mix_bias else None
        )
        self._reset_mix()

    def reset_parameters(self) -> None:
        """Re-initialises the convolution and the encoder as FusedCoordGateConv2d does, and the
        mix as nn.Conv2d initialises a 1x1 convolution."""
        super().reset_parameters()
        # The constructors above this class call this before the mix exists.
        if getattr(self, "mix_weight", None) is not None:
            self._reset_mix()

    def _reset_mix(self) -> None:
        nn.init.kaiming_uniform_(self.mix_weight, a=math.sqrt(5))
        if self.mix_bias is not None:
            bound = 1 / math.sqrt(self.mix_weight.shape[1])
            nn.init.uniform_(self.mix_bias, -bound, bound)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._gated(input, self.mix_weight, self.mix_bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mix_out_channels={self.mix_out_channels}"
