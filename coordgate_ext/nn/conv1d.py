"""FusedCoordGateConv1d: the gated convolution for signals, on the 2-D kernels with H = 1."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional
from ..ops import dispatch
from .conv import check_conv_arguments
from .encoders import GateCache, make_encoder


def _as_2d(value) -> tuple[int, int]:
    """nn.Conv1d's (v,) -> (1, v) for the kernel, stride and dilation."""
    return (1, value[0])


class FusedCoordGateConv1d(GateCache, nn.Conv1d):
    """A drop-in nn.Conv1d whose output is gated position by position by a coordinate encoder:

        out[n, c, j] = g[c, j] * conv1d(x)[n, c, j],    x (N, Cin, L), out (N, C, Lo),

    computed by the 2-D gated-convolution op on (N, Cin, 1, L) with a (1, k) kernel, so it
    runs on the same kernels. The gate is the 2-D encoder's on a 1 x Lo grid: its row
    coordinate is linspace(-1, 1, 1) = -1 everywhere (a constant, which the first layer's bias
    absorbs exactly), its column coordinate t_j = linspace(-1, 1, Lo)[j]; so g[c, j] =
    psi(E(-1, t_j))[c] depends on the position along the signal only.

    The arguments are nn.Conv1d's (``padding='same'|'valid'`` and every ``padding_mode``
    included) and FusedCoordGateConv2d's encoder options: ``encoder`` "mlp" or "map" (a learned
    (C, m) map, ``map_size`` m or (m,)), ``encoder_layers``, ``encoder_hidden``,
    ``hidden_activation``, ``gate_activation``, ``gate_init``, ``recompute`` and ``backend``.
    Input (N, Cin, L) or unbatched (Cin, L), as for nn.Conv1d. The "bilinear"
    encoder is refused: it weights a 3 x 3 two-dimensional neighbourhood, which a signal has not.
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
        map_size=16,
        recompute: bool = False,
        backend: str = "auto",
    ):
        check_conv_arguments("FusedCoordGateConv1d", 1, kernel_size, stride, padding, dilation)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype,
        )
        if encoder == "bilinear":
            raise ValueError(
                "FusedCoordGateConv1d: the 'bilinear' encoder weights a 3x3 two-dimensional "
                "neighbourhood and has no 1-D form; use encoder='mlp' or 'map'"
            )
        if isinstance(map_size, int):
            map_size = (map_size,)
        if not hasattr(map_size, "__len__") or len(map_size) != 1:
            raise ValueError(f"FusedCoordGateConv1d: map_size must be an int or (m,), got {map_size!r}")
        self.encoder = make_encoder(
            encoder, out_channels, layers=encoder_layers, hidden=encoder_hidden,
            hidden_activation=hidden_activation, gate_activation=gate_activation,
            map_size=(1, *map_size), gate_init=gate_init, device=device, dtype=dtype,
        )
        self.recompute = recompute
        self.backend = dispatch.check_backend(backend)

    def _padding_2d(self):
        return self.padding if isinstance(self.padding, str) else (0, self.padding[0])

    def output_size(self, length: int) -> int:
        """Lo of nn.Conv1d with these arguments for an input of ``length``."""
        return functional.conv2d_output_size(
            1, length, _as_2d(self.kernel_size), _as_2d(self.stride), self._padding_2d(),
            _as_2d(self.dilation),
        )[1]

    def gate_map(self, length: int) -> torch.Tensor:
        """The (C, length) gate on an output of ``length`` positions (cached in eval mode)."""
        return GateCache.gate_map(self, 1, length)[:, 0]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() == 2:
            return self.forward(input.unsqueeze(0)).squeeze(0)
        if input.dim() != 3:
            raise ValueError(
                f"FusedCoordGateConv1d: expected a 2-D (C, L) or 3-D (N, C, L) input, got {input.dim()}-D "
                f"of shape {tuple(input.shape)}"
            )
        out_len = self.output_size(input.shape[-1])
        if out_len <= 0:
            raise ValueError(
                f"FusedCoordGateConv1d: the output would be empty ({out_len}) for an input of length "
                f"{input.shape[-1]} and kernel {self.kernel_size[0]}"
            )
        out = functional.coordgate_conv2d(
            input.unsqueeze(2), self.weight.unsqueeze(2), self.bias, self._forward_gate(1, out_len), _as_2d(self.stride),
            self._padding_2d(), _as_2d(self.dilation), self.groups, padding_mode=self.padding_mode,
            recompute=self.recompute, backend=self.backend,
        )
        return out.squeeze(2)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", recompute={self.recompute}, backend={self.backend!r}"
