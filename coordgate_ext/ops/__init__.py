"""Operator registration: loads coordgate_ext._C (the schemas and the C++ kernels) and
registers, in Python, the fake kernels and the autograd formulas of every op."""

from . import _library
from . import gated_conv2d, mlp_gate, mlp_gated_conv2d  # noqa: F401  (registration side effects)
from . import flops  # noqa: F401  (FlopCounterMode formulas of the ops)
from . import vmap  # noqa: F401  (torch.func: vmap rules, autograd that functorch can run)

__all__ = ["_library"]
