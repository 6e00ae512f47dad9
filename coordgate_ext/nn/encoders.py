"""Coordinate encoders: each maps an output grid (height, width) to a (C, height, width) gate.

- MLPEncoder ("mlp", the paper's "pos"): linear layers 2 -> hidden -> ... -> C on the pixel
  coordinates, a hidden activation between layers and a gate activation at the end.
- MapEncoder ("map"): a learned (C, Hm, Wm) map through the gate activation, brought to the grid.
- BilinearEncoder ("bilinear"): a learned (2, Hm, Wm) displacement turned into the 9 bilinear
  weights of a 3x3 neighbourhood (C = 9).
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from .. import functional, reference

ENCODERS = ("mlp", "map", "bilinear")
#: The first author's names for the same encoders.
ENCODER_ALIASES = {"pos": "mlp"}
#: gate_init: "one" starts every gate near one, so that a fresh layer computes what its plain
#: convolution computes; "default" is PyTorch's initialisation of each layer (the first
#: author's, whose relu gate starts at zero on about half of the pixels).
GATE_INITS = ("one", "default")
#: Where psi reaches no 1 (sigmoid, tanh), gate_init="one" starts the gate at psi(3): 0.953
#: for sigmoid, 0.995 for tanh, where psi still has a usable slope.
_BOUNDED_GATE_PREACTIVATION = 3.0


def _check_activation(name: str) -> str:
    if name not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(reference.ACTIVATIONS)}; got {name!r}")
    return name


def _check_gate_init(gate_init: str) -> str:
    if gate_init not in GATE_INITS:
        raise ValueError(f"gate_init must be one of {', '.join(GATE_INITS)}; got {gate_init!r}")
    return gate_init


def _check_map_size(map_size, dims: int = 2) -> tuple[int, ...]:
    try:
        size = tuple(map_size)
    except TypeError:
        size = None
    if size is None or len(size) != dims or not all(
        functional.is_int(v) and v > 0 for v in size
    ):
        raise ValueError(f"map_size must be {dims} positive ints, got {map_size!r}")
    return size


def gate_one_preactivation(gate_activation: str) -> float:
    """The pre-activation b with psi(b) = 1 (psi(3) where psi stays below 1): the bias that
    gate_init="one" gives the encoder's last layer, whose weights start at zero."""
    if gate_activation in ("sigmoid", "tanh"):
        return _BOUNDED_GATE_PREACTIVATION
    psi = lambda b: reference.activation(gate_activation, torch.tensor(b, dtype=torch.float64)).item()  # noqa: E731
    lo, hi = 0.0, 4.0  # psi is increasing there and psi(0) < 1 <= psi(4) for every psi
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if psi(mid) < 1.0 else (lo, mid)
    return hi


class MLPEncoder(nn.Module):
    """layers nn.Linear: 2 -> hidden -> ... -> hidden -> out_channels (layers >= 1).

    gate_init="one": the last layer's weight starts at zero and its bias at
    gate_one_preactivation(gate_activation), so the gate starts at one on every pixel (the
    other layers keep nn.Linear's initialisation and start learning from the second step);
    "default": nn.Linear's initialisation everywhere."""

    def __init__(
        self,
        out_channels: int,
        layers: int = 2,
        hidden: int = 32,
        hidden_activation: str = "relu",
        gate_activation: str = "relu",
        device=None,
        dtype=None,
        gate_init: str = "one",
    ):
        super().__init__()
        if not functional.is_int(layers) or layers < 1:
            raise ValueError(f"the MLP encoder needs at least one layer, got encoder_layers={layers!r}")
        if layers > 1 and (not functional.is_int(hidden) or hidden < 1):
            raise ValueError(f"encoder_hidden must be a positive int, got {hidden!r}")
        widths = [2] + [hidden] * (layers - 1) + [out_channels]
        self.layers = nn.ModuleList(
            nn.Linear(a, b, device=device, dtype=dtype) for a, b in zip(widths[:-1], widths[1:])
        )
        self.hidden_activation = _check_activation(hidden_activation)
        self.gate_activation = _check_activation(gate_activation)
        self.gate_init = _check_gate_init(gate_init)
        self._init_gate()

    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()
        self._init_gate()

    def _init_gate(self) -> None:
        if self.gate_init == "one":
            with torch.no_grad():
                self.layers[-1].weight.zero_()
                self.layers[-1].bias.fill_(gate_one_preactivation(self.gate_activation))

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
        return (f"hidden_activation={self.hidden_activation!r}, gate_activation={self.gate_activation!r}, "
                f"gate_init={self.gate_init!r}")


class MapEncoder(nn.Module):
    """A learned (out_channels, Hm, Wm) map, the gate psi(map) brought to the grid. It starts
    where psi is one (gate_init="one"; psi(3) for sigmoid and tanh) or at ones ("default",
    the first author's start)."""

    def __init__(
        self, out_channels: int, map_size=(16, 16), gate_activation: str = "relu", device=None, dtype=None,
        gate_init: str = "one",
    ):
        super().__init__()
        self.map = nn.Parameter(torch.empty(out_channels, *_check_map_size(map_size), device=device, dtype=dtype))
        self.gate_activation = _check_activation(gate_activation)
        self.gate_init = _check_gate_init(gate_init)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        start = gate_one_preactivation(self.gate_activation) if self.gate_init == "one" else 1.0
        with torch.no_grad():
            self.map.fill_(start)

    @property
    def out_channels(self) -> int:
        return self.map.shape[0]

    def forward(self, height: int, width: int, backend: str = "auto") -> torch.Tensor:
        return reference.map_gate(self.map, height, width, self.gate_activation)

    def extra_repr(self) -> str:
        return (f"map_size={tuple(self.map.shape[1:])}, gate_activation={self.gate_activation!r}, "
                f"gate_init={self.gate_init!r}")


class BilinearEncoder(nn.Module):
    """A learned (2, Hm, Wm) displacement (dx, dy), initialised to zero (the identity shift,
    whatever gate_init: its nine channels are interpolation weights, not gates)."""

    out_channels = 9

    def __init__(self, map_size=(16, 16), gate_activation: str = "relu", device=None, dtype=None):
        super().__init__()
        self.displacement = nn.Parameter(torch.empty(2, *_check_map_size(map_size), device=device, dtype=dtype))
        self.gate_activation = _check_activation(gate_activation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.displacement.zero_()

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
    gate_init: str = "one",
    device=None,
    dtype=None,
) -> nn.Module:
    kind = ENCODER_ALIASES.get(kind, kind)
    _check_gate_init(gate_init)
    if kind == "mlp":
        return MLPEncoder(out_channels, layers, hidden, hidden_activation, gate_activation, device, dtype,
                          gate_init)
    if kind == "map":
        return MapEncoder(out_channels, map_size, gate_activation, device, dtype, gate_init)
    if kind == "bilinear":
        if out_channels != 9:
            raise ValueError(f"the bilinear encoder gates exactly 9 channels, got {out_channels}")
        return BilinearEncoder(map_size, gate_activation, device, dtype)
    raise ValueError(f"encoder must be one of {', '.join(ENCODERS)} (or 'pos'); got {kind!r}")


#: Serialises the replacement of every module's table of cached gates (a lock per module could
#: not be deep-copied or pickled with it); never held while a gate is computed.
_GATE_CACHE_LOCK = threading.Lock()
#: Grids whose gates one module keeps at a time.
GATE_CACHE_ENTRIES = 4


class GateCache:
    """Mixin: ``gate_map(height, width)``, and the gate a forward passes to its op, cached in
    eval mode.

    A cached gate is reused only when it is provably the gate of the current parameters: the
    module is in eval mode, no gradient can flow into the encoder (grad mode off, or its
    parameters frozen), nothing is being traced, the encoder's parameters are CPU tensors and
    equal, value for value, the copy taken when the gate was computed. Comparing values (a few
    thousand numbers next to the gate's C * Ho * Wo) catches every way a parameter can change:
    optimizers that do not bump a tensor's version (the fused ones), ``p.data`` and NumPy
    edits, replaced or converted parameters. On other devices the comparison would wait for
    the device, so the gate (one small kernel) is computed on every call. Thread-safe: calls
    at different grids keep up to GATE_CACHE_ENTRIES gates side by side.
    """

    encoder: nn.Module
    backend: str

    def reset_parameters(self) -> None:
        """Re-initialises the layer as its torch.nn base class does and the encoder as
        gate_init says (layers whose base has no reset_parameters define their own)."""
        super().reset_parameters()
        # nn.Conv1d / nn.Conv2d.__init__ call this before the encoder exists.
        encoder = getattr(self, "encoder", None)
        if encoder is not None:
            encoder.reset_parameters()

    def _gate_cacheable(self) -> bool:
        if self.training or torch.compiler.is_compiling():
            return False
        params = list(self.encoder.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return False
        return all(
            p.device.type == "cpu" and not torch._C._functorch.is_functorch_wrapped_tensor(p)
            and not isinstance(p, torch._subclasses.FakeTensor) for p in params
        )

    def _cached_gate(self, height: int, width: int, pixel_major: bool) -> torch.Tensor:
        """The (C, height, width) gate of the current parameters, from the cache when it holds
        it (see the class); ``pixel_major``: with (height, width, C) memory."""
        params = [p.detach() for p in self.encoder.parameters()]
        key = (height, width)
        entry = self.__dict__.get("_gate_entries", {}).get(key)
        if entry is not None:
            snapshot, gate, copy = entry
            fresh = len(snapshot) == len(params) and all(
                s.dtype == p.dtype and s.shape == p.shape and torch.equal(s, p) for s, p in zip(snapshot, params)
            )
            if not fresh:
                entry = None
        if entry is None:
            with torch.no_grad():
                gate = self.encoder(height, width, backend=self.backend)
            snapshot, copy = [p.clone() for p in params], None
        if pixel_major and copy is None:
            copy = gate.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        # Copy on write: a table is never changed once published, so readers (and a deepcopy
        # of the module in another thread) need no lock.
        with _GATE_CACHE_LOCK:
            entries = {k: v for k, v in self.__dict__.get("_gate_entries", {}).items() if k != key}
            while len(entries) >= GATE_CACHE_ENTRIES:
                entries.pop(next(iter(entries)))
            entries[key] = (snapshot, gate, copy)
            self.__dict__["_gate_entries"] = entries
        return copy if pixel_major else gate

    def _forward_gate(self, height: int, width: int, pixel_major: bool = False):
        """What a forward passes as the gated convolution's ``gate``: the cached (or freshly
        computed) map, or, for an MLP encoder whose gate is not cacheable, its parameters, so
        that the op evaluates the gate itself in forward and again in backward.

        ``pixel_major``: a cached map is passed with (height, width, C) memory, the layout the
        CPU kernels read for a channels_last input (given a contiguous map they transpose it
        on every call). The pixel-major copy is made once and cached beside the map."""
        if isinstance(self.encoder, MLPEncoder) and not self._gate_cacheable():
            return self.encoder.spec()
        return self._gate(height, width, pixel_major)

    def _gate(self, height: int, width: int, pixel_major: bool = False) -> torch.Tensor:
        """The (C, height, width) gate, cached where it can be (the cache's own tensor)."""
        if not self._gate_cacheable():
            return self.encoder(height, width, backend=self.backend)
        return self._cached_gate(height, width, pixel_major)

    def gate_map(self, height: int, width: int) -> torch.Tensor:
        """The (C, height, width) gate on an output grid of height x width: a tensor of the
        caller's own (editing it changes no later output)."""
        if not self._gate_cacheable():
            return self.encoder(height, width, backend=self.backend)
        return self._cached_gate(height, width, False).clone()

    def clear_gate_cache(self) -> None:
        """Drops the cached gates (they are also dropped when their grid falls out of use)."""
        with _GATE_CACHE_LOCK:
            self.__dict__.pop("_gate_entries", None)
