"""Operator registration: loads coordgate_ext._C (the schemas and the C++ kernels) and
registers, in Python, the fake kernels and the autograd formulas of every op."""

from . import _library
from . import gated_conv2d, mlp_gate, mlp_gated_conv2d  # noqa: F401  (registration side effects)

__all__ = ["_library"]
