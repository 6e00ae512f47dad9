"""Modules: the fused gated convolution layers and the paper's CoordGate."""

from .conv import FusedCoordGateBlock2d, FusedCoordGateConv2d
from .conv1d import FusedCoordGateConv1d
from .coordgate import CoordGate
from .encoders import BilinearEncoder, MapEncoder, MLPEncoder
from .models import MultiWienerNet, SignalNet, UNet

__all__ = [
    "FusedCoordGateConv2d",
    "FusedCoordGateBlock2d",
    "FusedCoordGateConv1d",
    "CoordGate",
    "MLPEncoder",
    "MapEncoder",
    "BilinearEncoder",
    "UNet",
    "MultiWienerNet",
    "SignalNet",
]
