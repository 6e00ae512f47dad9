"""The paper's CoordGate module and a loader for the first author's trained weights."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..ops import dispatch
from .encoders import ENCODER_ALIASES, GateCache, make_encoder


class CoordGate(GateCache, nn.Module):
    """The first author's CoordGate: the gate on the module's input, then a 1x1 convolution,

        out = conv1x1(x * g[None]),   g = encoder(H, W)  (C = channels)

    Resolution independent: the gate is evaluated on each input's grid. The defaults
    reproduce the author's "pos" encoder exactly: ``encoder_layers`` linear layers of width
    ``channels`` with no hidden activation and a final ReLU, in PyTorch's initialisation
    (``gate_init="default"``; "one" starts the gate at one everywhere). ``encoder`` may be "mlp" (alias
    "pos"), "map" or "bilinear" (channels = 9).
    """

    def __init__(
        self,
        channels: int,
        out_channels: int,
        encoder: str = "mlp",
        *,
        encoder_layers: int = 2,
        encoder_hidden: int | None = None,
        hidden_activation: str = "none",
        gate_activation: str = "relu",
        gate_init: str = "default",
        map_size=(16, 16),
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.encoder_kind = ENCODER_ALIASES.get(encoder, encoder)
        self.encoder = make_encoder(
            encoder, channels, layers=encoder_layers,
            hidden=channels if encoder_hidden is None else encoder_hidden,
            hidden_activation=hidden_activation, gate_activation=gate_activation,
            map_size=map_size, gate_init=gate_init, device=device, dtype=dtype,
        )
        self.conv = nn.Conv2d(channels, out_channels, 1, device=device, dtype=dtype)
        self.backend = dispatch.check_backend(backend)

    def reset_parameters(self) -> None:
        """Re-initialises the encoder as gate_init says and the 1x1 convolution as nn.Conv2d."""
        self.encoder.reset_parameters()
        self.conv.reset_parameters()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() == 3:
            return self.forward(input.unsqueeze(0)).squeeze(0)
        if input.dim() != 4:
            raise ValueError(
                f"CoordGate: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got {input.dim()}-D of "
                f"shape {tuple(input.shape)}"
            )
        if input.shape[1] != self.encoder.out_channels:
            raise ValueError(
                f"CoordGate: expected {self.encoder.out_channels} input channels, got {input.shape[1]}"
            )
        gate = self._gate(input.shape[-2], input.shape[-1])
        return self.conv(input * gate[None])

    def load_author_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Loads a state dict saved from the first author's CoordGate class.

        "pos": ``encoder.linear{i}.weight/bias`` and ``conv.weight/bias`` (the ``pos`` buffer,
        the author's fixed coordinate grid, is not needed: the grid follows the input);
        "map": ``map`` (1, C, Hm, Wm); "bilinear": ``map`` (1, 2, Hm, Wm) holding (dx, dy).
        """
        def take(key: str) -> torch.Tensor:
            if key not in state_dict:
                raise ValueError(
                    f"the author's state dict has no {key!r} (it has {sorted(state_dict)}); it was "
                    f"saved from a CoordGate whose encoder differs from this {self.encoder_kind!r} "
                    "encoder or its encoder_layers"
                )
            return state_dict[key]

        ours = {"conv.weight": take("conv.weight"), "conv.bias": take("conv.bias")}
        if self.encoder_kind == "mlp":
            names = {f"encoder.linear{i}.{n}" for i in range(len(self.encoder.layers)) for n in ("weight", "bias")}
            for i in range(len(self.encoder.layers)):
                for name in ("weight", "bias"):
                    ours[f"encoder.layers.{i}.{name}"] = take(f"encoder.linear{i}.{name}")
            extra = {k for k in state_dict if k.startswith("encoder.linear")} - names
            if extra:
                raise ValueError(
                    f"the author's state dict has encoder entries this module lacks: {sorted(extra)}; "
                    "construct CoordGate with a matching encoder_layers"
                )
        else:
            author_map = take("map")
            if author_map.dim() != 4 or author_map.shape[0] != 1:
                raise ValueError(
                    f"the author's 'map' must have shape (1, C, Hm, Wm), got {tuple(author_map.shape)}"
                )
            key = "encoder.map" if self.encoder_kind == "map" else "encoder.displacement"
            ours[key] = author_map[0]
        self.load_state_dict(ours)
