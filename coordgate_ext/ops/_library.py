"""Loading of the compiled extension, with the reason when it cannot be loaded."""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import torch

NAMESPACE = "coordgate_ext"
#: Every operator of the namespace, forward and backward (the tests check each has an
#: opcheck case).
OPS = (
    "mlp_gate",
    "mlp_gate_backward",
    "gated_conv2d",
    "gated_conv2d_backward",
    "mlp_gated_conv2d",
    "mlp_gated_conv2d_backward",
)


def _read_build_info() -> dict | None:
    """The record setup.py wrote beside the extension (build_config.build_info), or None."""
    path = Path(__file__).resolve().parent.parent / "_build_info.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _load():
    """(the extension module or None, the reason it is not loaded or None)."""
    if BUILD_INFO is not None and BUILD_INFO["torch"] != torch.__version__:
        # Loading it could fail on a missing symbol or, worse, load and misbehave.
        return None, (
            f"the C++ extension coordgate_ext._C was built against torch {BUILD_INFO['torch']} "
            f"but torch {torch.__version__} is running; rebuild it against this torch with "
            "`pip install --no-build-isolation .` (or `make build`)"
        )
    try:
        # By its full name: `from .. import _C` reports a missing module as "cannot import name
        # '_C' from partially initialized module (most likely due to a circular import)".
        return importlib.import_module("coordgate_ext._C"), None  # registers the ops
    except ImportError as exc:  # not built, or built against another torch
        return None, (
            f"the C++ extension coordgate_ext._C could not be imported ({type(exc).__name__}: "
            f"{exc}); build it with `make build` (or `pip install .`), with the torch it will "
            "run with"
        )


BUILD_INFO = _read_build_info()
_C, LOAD_ERROR = _load()
if LOAD_ERROR is not None:
    warnings.warn(
        f"coordgate_ext: {LOAD_ERROR}. Only the 'reference' and 'triton' backends can run; "
        "backend='auto' uses the reference on CPU tensors.",
        RuntimeWarning,
        stacklevel=2,
    )


def build_info() -> dict:
    """What the installed extension was built with, and whether it is loaded.

    Keys: "torch" (the version it was compiled against; it loads only with that one),
    "cpu_kernels", "cuda_kernels" (bools), "cuda_arch_list" (TORCH_CUDA_ARCH_LIST of the
    build), "cuda_toolkit", "cuda_reason" (why there are no CUDA kernels), "loaded" (bool) and
    "load_error" (why not, or None). Only "loaded" and "load_error" where no build is found.
    """
    return {**(BUILD_INFO or {}), "loaded": LOAD_ERROR is None, "load_error": LOAD_ERROR}


def loaded() -> bool:
    return LOAD_ERROR is None


def _extension():
    """The compiled module, or the reason it could not be loaded as a RuntimeError."""
    if not loaded():
        raise RuntimeError(LOAD_ERROR)
    return _C


def empty_cpu_cache() -> None:
    """Frees the host buffers that the CPU kernels keep for reuse (see csrc/cpu/output_cache.h)."""
    if loaded():
        _C.empty_cpu_cache()


def cpu_cache_bytes() -> int:
    """Bytes held in freed host buffers kept for the CPU kernels' next large outputs."""
    return _C.cpu_cache_bytes() if loaded() else 0


CPU_ENGINES = ("auto", "aten", "implicit_gemm")


def set_cpu_engine(engine: str) -> None:
    """How the CPU kernels convolve: "aten" (oneDNN, the fast path), "implicit_gemm" (the
    decomposition and per-element maths of the CUDA kernels, run on the host) or "auto"
    (the implicit GEMM for float64, which oneDNN lacks; ATen otherwise). Process-wide."""
    if engine not in CPU_ENGINES:
        raise ValueError(f"cpu engine must be one of {', '.join(CPU_ENGINES)}; got {engine!r}")
    _extension().set_cpu_engine(engine)


def cpu_engine() -> str:
    """The CPU kernels' convolution engine (see set_cpu_engine)."""
    return _extension().cpu_engine()


def _check_bytes(nbytes, what: str, minimum: int) -> None:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"{what} must be an int, got {type(nbytes).__name__}")
    if nbytes < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {nbytes}")


def set_cpu_band_bytes(nbytes: int) -> None:
    """Output bytes per band of the "aten" engine: it calls ATen's convolution on a few samples
    or a few output rows at a time and gates each band while it is in cache (default 2 MiB,
    measured best here under glibc's default allocator, where bigger bands fault in fresh
    pages; under a heap allocator such as jemalloc, bigger bands made the forward a little
    faster: see docs/cpu_performance.md; 1 makes every band one output row). Process-wide."""
    _check_bytes(nbytes, "cpu band bytes", 1)
    _extension().set_cpu_band_bytes(nbytes)


def cpu_band_bytes() -> int:
    """Output bytes per band of the "aten" engine's banded convolution (see set_cpu_band_bytes)."""
    return _extension().cpu_band_bytes()


def set_cpu_stream_bytes(nbytes: int) -> None:
    """Output bytes (the gated output, plus the ungated one when it is saved for backward)
    from which the "aten" engine's forward writes float32 outputs with non-temporal stores,
    straight to memory instead of through the cache (default 128 MiB: faster where the
    outputs are far larger than the cache, slower where the next operation still finds them
    there; see docs/cpu_performance.md; 0 streams every output). Not with a 1x1 mix, nor for float16 /
    bfloat16 inputs: their float32 outputs are read again at once. Process-wide."""
    _check_bytes(nbytes, "cpu stream bytes", 0)
    _extension().set_cpu_stream_bytes(nbytes)


def cpu_stream_bytes() -> int:
    """Output bytes from which the "aten" engine's forward streams its outputs (see
    set_cpu_stream_bytes)."""
    return _extension().cpu_stream_bytes()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether coordgate_ext::op has a kernel registered for dispatch_key ("CPU", "CUDA")."""
    if not loaded():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", dispatch_key)


def _double_backward_unsupported():
    """Autograd of a backward op: differentiating through it is not supported, and says so
    instead of silently returning no gradient."""

    def backward(ctx, *grads):
        raise RuntimeError(
            "coordgate_ext: double backward (create_graph=True through a coordgate_ext op) is "
            "not supported"
        )

    return backward
