"""Triton kernels of coordgate_ext and their launchers (DESIGN.md sections 4 and 5).

kernels.py holds every @triton.jit function; gated_conv2d.py the launchers; configs.py the
tile configurations each launcher chooses from. CUDA tensors run the compiled kernels, CPU
tensors run them through the Triton interpreter when TRITON_INTERPRET=1 is set (tests).
Importing this package imports triton.
"""

from . import configs, gated_conv2d
from ._runtime import interpret_requested, kernels_for

__all__ = ["configs", "gated_conv2d", "interpret_requested", "kernels_for"]
