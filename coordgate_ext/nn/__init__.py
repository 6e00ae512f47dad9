"""Modules: the fused gated convolution layers and the paper's CoordGate."""

from .conv import FusedCoordGateBlock2d, FusedCoordGateConv2d
from .coordgate import CoordGate
from .encoders import BilinearEncoder, MapEncoder, MLPEncoder

__all__ = [
    "FusedCoordGateConv2d",
    "FusedCoordGateBlock2d",
    "CoordGate",
    "MLPEncoder",
    "MapEncoder",
    "BilinearEncoder",
]
