"""coordgate_ext: fused CoordGate (coordinate-gated convolution) operators for PyTorch.

    import coordgate_ext as cg
    layer = cg.FusedCoordGateConv2d(32, 32, 3, padding=1)
    out = layer(x)
"""

from . import ops  # noqa: F401  (registers the operators)
from . import physics, reference
from .functional import coordgate_conv2d, mlp_gate
from .nn import CoordGate, FusedCoordGateBlock2d, FusedCoordGateConv1d, FusedCoordGateConv2d
from .ops._library import (
    build_info,
    cpu_band_bytes,
    cpu_cache_bytes,
    cpu_engine,
    cpu_stream_bytes,
    empty_cpu_cache,
    set_cpu_band_bytes,
    set_cpu_engine,
    set_cpu_stream_bytes,
)
from .ops.dispatch import BackendUnavailableError, available_backends

__all__ = [
    "FusedCoordGateConv2d",
    "FusedCoordGateBlock2d",
    "FusedCoordGateConv1d",
    "CoordGate",
    "physics",
    "coordgate_conv2d",
    "mlp_gate",
    "reference",
    "available_backends",
    "build_info",
    "BackendUnavailableError",
    "empty_cpu_cache",
    "cpu_cache_bytes",
    "set_cpu_engine",
    "cpu_engine",
    "set_cpu_band_bytes",
    "cpu_band_bytes",
    "set_cpu_stream_bytes",
    "cpu_stream_bytes",
]

__version__ = "0.1.0"
