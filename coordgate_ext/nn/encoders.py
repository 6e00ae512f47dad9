"""Coordinate encoders: each maps an output grid (height, width) to a (C, height, width) gate.

- MLPEncoder ("mlp", the paper's "pos"): linear layers 2 -> hidden -> ... -> C on the pixel
  coordinates, a hidden activation between layers and a gate activation at the end.
- MapEncoder ("map"): a learned (C, Hm, Wm) map through the gate activation, brought to the grid.
- BilinearEncoder ("bilinear"): a learned (2, Hm, Wm) displacement turned into the 9 bilinear
  weights of a 3x3 neighbourhood (C = 9).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import functional, reference

ENCODERS = ("mlp", "map", "bilinear")
#: The first author's names for the same encoders.
ENCODER_ALIASES = {"pos": "mlp"}


def _check_activation(name: str) -> str:
    if name not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(reference.ACTIVATIONS)}; got {name!r}")
    return name


class MLPEncoder(nn.Module):
    """layers nn.Linear: 2 -> hidden -> ... -> hidden -> out_channels (layers >= 1)."""

    def __init__(
        self,
        out_channels: int,
        layers: int = 2,
        hidden: int = 32,
        hidden_activation: str = "relu",
        gate_activation: str = "relu",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if layers < 1:
            raise ValueError(f"the MLP encoder needs at least one layer, got encoder_layers={layers}")
        widths = [2] + [hidden] * (layers - 1) + [out_channels]
        self.layers = nn.ModuleList(
            nn.Linear(a, b, device=device, dtype=dtype) for a, b in zip(widths[:-1], widths[1:])
        )
        self.hidden_activation = _check_activation(hidden_activation)
        self.gate_activation = _check_activation(gate_activation)

    @property
    def out_channels(self) -> int:
        return self.layers[-1].out_features

    def spec(self) -> functional.MLPGate:
        """The parameters, for ops that evaluate the gate themselves."""
        return functional.MLPGate(
            [layer.weight for layer in self.layers],
            [layer.bias for layer in self.layers],
            self.hidden_activation,
            self.gate_activation,
        )

    def forward(self, height: int, width: int, backend: str = "auto") -> torch.Tensor:
        return functional.mlp_gate(
            [layer.weight for layer in self.layers],
            [layer.bias for layer in self.layers],
            height,
            width,
            self.hidden_activation,
            self.gate_activation,
            backend=backend,
        )

    def extra_repr(self) -> str:
        return f"hidden_activation={self.hidden_activation!r}, gate_activation={self.gate_activation!r}"


class MapEncoder(nn.Module):
    """A learned (out_channels, Hm, Wm) map, initialised to ones."""

    def __init__(
        self, out_channels: int, map_size=(16, 16), gate_activation: str = "relu", device=None, dtype=None
    ):
        super().__init__()
        self.map = nn.Parameter(torch.ones(out_channels, *map_size, device=device, dtype=dtype))
        self.gate_activation = _check_activation(gate_activation)

    @property
    def out_channels(self) -> int:
        return self.map.shape[0]

    def forward(self, height: int, width: int, backend: str = "auto") -> torch.Tensor:
        return reference.map_gate(self.map, height, width, self.gate_activation)

    def extra_repr(self) -> str:
        return f"map_size={tuple(self.map.shape[1:])}, gate_activation={self.gate_activation!r}"


class BilinearEncoder(nn.Module):
    """A learned (2, Hm, Wm) displacement (dx, dy), initialised to zero (the identity shift)."""

    out_channels = 9

    def __init__(self, map_size=(16, 16), gate_activation: str = "relu", device=None, dtype=None):
        super().__init__()
        self.displacement = nn.Parameter(torch.zeros(2, *map_size, device=device, dtype=dtype))
        self.gate_activation = _check_activation(gate_activation)

    def forward(self, height: int, width: int, backend: str = "auto") -> torch.Tensor:
        return reference.bilinear_gate(self.displacement, height, width, self.gate_activation)

    def extra_repr(self) -> str:
        return f"map_size={tuple(self.displacement.shape[1:])}, gate_activation={self.gate_activation!r}"


def make_encoder(
    kind: str,
    out_channels: int,
    *,
    layers: int,
    hidden: int,
    hidden_activation: str,
    gate_activation: str,
    map_size,
    device=None,
    dtype=None,
) -> nn.Module:
    kind = ENCODER_ALIASES.get(kind, kind)
    if kind == "mlp":
        return MLPEncoder(out_channels, layers, hidden, hidden_activation, gate_activation, device, dtype)
    if kind == "map":
        return MapEncoder(out_channels, map_size, gate_activation, device, dtype)
    if kind == "bilinear":
        if out_channels != 9:
            raise ValueError(f"the bilinear encoder gates exactly 9 channels, got {out_channels}")
        return BilinearEncoder(map_size, gate_activation, device, dtype)
    raise ValueError(f"encoder must be one of {', '.join(ENCODERS)} (or 'pos'); got {kind!r}")


class GateCache:
    """Mixin: ``gate_map(height, width)`` that caches the gate in eval mode.

    The cached gate is reused while the module is in eval mode, no gradient can flow into the
    encoder (grad mode off, or its parameters frozen), the grid is the same and no encoder
    parameter has changed (in-place updates bump a tensor's version; replaced, moved or
    converted parameters change its storage, dtype or device).
    """

    encoder: nn.Module
    backend: str
    _gate_cache: tuple | None = None

    def _gate_cache_key(self, height: int, width: int) -> tuple:
        return (height, width) + tuple(
            (p.data_ptr(), p._version, p.dtype, p.device) for p in self.encoder.parameters()
        )

    def _gate_cacheable(self) -> bool:
        wants_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.encoder.parameters())
        return not (self.training or wants_grad or torch.compiler.is_compiling())

    def _forward_gate(self, height: int, width: int, pixel_major: bool = False):
        """What a forward passes as the gated convolution's ``gate``: the cached (or freshly
        computed) map, or, for an MLP encoder whose gate is not cacheable, its parameters, so
        that the op evaluates the gate itself in forward and again in backward.

        ``pixel_major``: a cached map is passed with (height, width, C) memory, the layout the
        CPU kernels read for a channels_last input (given a contiguous map they transpose it
        on every call). The pixel-major copy is made once and cached beside the map."""
        if isinstance(self.encoder, MLPEncoder) and not self._gate_cacheable():
            return self.encoder.spec()
        gate = GateCache.gate_map(self, height, width)
        if not pixel_major or self._gate_cache is None:
            return gate
        key, _, copy = self._gate_cache
        if copy is None:
            copy = gate.permute(1, 2, 0).contiguous().permute(2, 0, 1)
            self._gate_cache = (key, gate, copy)
        return copy

    def gate_map(self, height: int, width: int) -> torch.Tensor:
        """The (C, height, width) gate on an output grid of height x width."""
        if not self._gate_cacheable():
            self._gate_cache = None
            return self.encoder(height, width, backend=self.backend)
        key = self._gate_cache_key(height, width)
        if self._gate_cache is None or self._gate_cache[0] != key:
            with torch.no_grad():
                # (key, the contiguous map, its pixel-major copy once one is asked for)
                self._gate_cache = (key, self.encoder(height, width, backend=self.backend), None)
        return self._gate_cache[1]
