"""Which copy of the kernels runs a tensor: compiled for CUDA tensors, interpreted for CPU ones.

``triton.jit`` decides at decoration time whether a function is compiled or interpreted (from
TRITON_INTERPRET). To run CUDA tensors on compiled kernels and CPU tensors on the interpreter
in one process, the kernel module is imported under its own name with TRITON_INTERPRET=0 set
while it is executed (compiled), and a second time, under a private name, with
TRITON_INTERPRET=1 (interpreted): whatever the variable says when a kernel is first needed,
CUDA tensors never run the interpreter.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import threading
import types

import torch

_LOCK = threading.Lock()
_COMPILED_NAME = "coordgate_ext.triton.kernels"
_INTERPRETED_NAME = "coordgate_ext.triton._kernels_interpreted"


def interpret_requested() -> bool:
    """Whether TRITON_INTERPRET=1 is set now (the switch that lets CPU tensors run the kernels)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@contextlib.contextmanager
def _interpret_env(value: str):
    """TRITON_INTERPRET=value while the kernels' module is executed (triton.jit reads it)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def is_interpreted(module: types.ModuleType) -> bool:
    """Whether the module's Triton kernels are the interpreter's, not compiled ones."""
    from triton.runtime.interpreter import InterpretedFunction

    return any(isinstance(v, InterpretedFunction) for v in vars(module).values())


def _compiled() -> types.ModuleType:
    """The kernels compiled for the GPU, whatever TRITON_INTERPRET says when first asked."""
    with _LOCK:
        module = sys.modules.get(_COMPILED_NAME)
        if module is None:
            with _interpret_env("0"):
                module = importlib.import_module(_COMPILED_NAME)
    if is_interpreted(module):
        raise RuntimeError(
            "coordgate_ext: coordgate_ext.triton.kernels was imported with TRITON_INTERPRET=1, "
            "so its kernels are interpreted; CUDA tensors need the compiled ones (let "
            "coordgate_ext import it, or import it without TRITON_INTERPRET)"
        )
    return module


def _interpreted() -> types.ModuleType:
    with _LOCK:
        module = sys.modules.get(_INTERPRETED_NAME)
        if module is not None:
            return module
        spec = importlib.util.find_spec(_COMPILED_NAME)
        spec = importlib.util.spec_from_file_location(_INTERPRETED_NAME, spec.origin)
        module = importlib.util.module_from_spec(spec)
        with _interpret_env("1"):
            spec.loader.exec_module(module)
        sys.modules[_INTERPRETED_NAME] = module
        return module


def kernels_for(device: torch.device) -> tuple[types.ModuleType, bool]:
    """(kernel module, interpreted) for tensors on ``device``."""
    if device.type == "cuda":
        return _compiled(), False
    if device.type == "cpu":
        if not interpret_requested():
            raise RuntimeError(
                "coordgate_ext: the Triton kernels run CPU tensors only through the Triton "
                "interpreter; set TRITON_INTERPRET=1 (slow, for tests) or use CUDA tensors"
            )
        return _interpreted(), True
    raise RuntimeError(f"coordgate_ext: the Triton kernels run on CUDA (or interpreted CPU) tensors, got {device}")
