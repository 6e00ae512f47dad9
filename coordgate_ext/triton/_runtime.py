"""Which copy of the kernels runs a tensor: compiled for CUDA tensors, interpreted for CPU ones.

``triton.jit`` decides at decoration time whether a function is compiled or interpreted (from
TRITON_INTERPRET). To run CUDA tensors on compiled kernels and CPU tensors on the interpreter
in one process, the kernel module is imported normally (compiled) and a second time, under a
private name, with TRITON_INTERPRET=1 set only while it is executed (interpreted).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import types

import torch

_LOCK = threading.Lock()
_INTERPRETED_NAME = "coordgate_ext.triton._kernels_interpreted"


def interpret_requested() -> bool:
    """Whether TRITON_INTERPRET=1 is set now (the switch that lets CPU tensors run the kernels)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _interpreted() -> types.ModuleType:
    with _LOCK:
        module = sys.modules.get(_INTERPRETED_NAME)
        if module is not None:
            return module
        from . import kernels

        spec = importlib.util.spec_from_file_location(_INTERPRETED_NAME, kernels.__file__)
        module = importlib.util.module_from_spec(spec)
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            spec.loader.exec_module(module)
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous
        sys.modules[_INTERPRETED_NAME] = module
        return module


def kernels_for(device: torch.device) -> tuple[types.ModuleType, bool]:
    """(kernel module, interpreted) for tensors on ``device``."""
    if device.type == "cuda":
        from . import kernels

        return kernels, False
    if device.type == "cpu":
        if not interpret_requested():
            raise RuntimeError(
                "coordgate_ext: the Triton kernels run CPU tensors only through the Triton "
                "interpreter; set TRITON_INTERPRET=1 (slow, for tests) or use CUDA tensors"
            )
        return _interpreted(), True
    raise RuntimeError(f"coordgate_ext: the Triton kernels run on CUDA (or interpreted CPU) tensors, got {device}")
