"""Backend choice, in one place.

``backend`` is one of "auto", "reference", "cpu", "triton", "cuda". "auto" takes the first
available of the device's preference list; an explicit backend that cannot run raises
BackendUnavailableError saying why and how to get it.

While torch.onnx.export traces a model, every backend resolves to "reference": an ONNX graph
cannot hold the coordgate_ext operators, and the reference is made of standard operators
(Conv, MatMul, Mul, the activations) that any ONNX runtime executes.
"""

from __future__ import annotations

import os
import sys

import torch

from . import _library

BACKENDS = ("reference", "cpu", "triton", "cuda")
#: "auto" takes the first available, per device type.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that this install cannot run."""


def _triton_interpret() -> bool:
    """TRITON_INTERPRET=1: the Triton backend may run CPU tensors through the interpreter
    (read at call time; "auto" never picks it for CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def exporting_onnx() -> bool:
    """True while torch.onnx.export (either exporter) traces a model."""
    # torch.onnx.export imports torch.onnx: without it no export is running, and importing it
    # here would add its import time to every process.
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def _unavailable_reason(backend: str) -> str | None:
    """None when the backend can run in this install, else why not and the fix."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if not _library.loaded():
            return _library.LOAD_ERROR
        return None
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return f"triton could not be imported ({exc}); install it (`pip install triton`)"
        if not torch.cuda.is_available() and not _triton_interpret():
            return (
                "no CUDA device is visible to torch; the Triton kernels run on CUDA tensors, or on "
                "CPU tensors through the Triton interpreter with TRITON_INTERPRET=1 (slow, for tests)"
            )
        return None
    if backend == "cuda":
        if not _library.loaded():
            return _library.LOAD_ERROR
        if not _library.has_kernel("gated_conv2d", "CUDA"):
            return (
                "coordgate_ext._C was built without CUDA kernels (no CUDA toolkit or no CUDA build "
                "of torch at build time, or COORDGATE_CUDA=0); rebuild with a toolkit (`make build`) "
                "or use backend='triton' or 'reference' on CUDA tensors"
            )
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
        return None
    raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")


def available_backends() -> dict[str, str | None]:
    """{backend: None if it can run here, else the reason it cannot and how to fix it}."""
    return {name: _unavailable_reason(name) for name in BACKENDS}


def check_backend(backend: str) -> str:
    """``backend`` if it is "auto" or one of BACKENDS, else a ValueError naming them."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")
    return backend


#: Backends whose kernels refuse some dtypes (the Triton kernels compute at most float32):
#: "auto" passes over them for those dtypes.
UNSUPPORTED_DTYPES = {"triton": (torch.float64,)}


def resolve(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend that runs tensors on ``device`` for the requested ``backend``
    ("reference" for every backend while an ONNX export traces the model). ``dtype``: the
    tensors' dtype, for "auto" to pass over a backend that does not compute it."""
    check_backend(backend)
    if exporting_onnx():
        return "reference"
    if backend == "auto":
        order = AUTO_ORDER.get(device.type, ("reference",))
        return next(name for name in order
                    if _unavailable_reason(name) is None and dtype not in UNSUPPORTED_DTYPES.get(name, ()))
    reason = _unavailable_reason(backend)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} is not available: {reason}")
    if backend == "cpu" and device.type != "cpu":
        raise BackendUnavailableError(
            f"backend 'cpu' runs on CPU tensors, got tensors on {device}; use backend='auto'"
        )
    if backend == "triton" and device.type == "cpu" and _triton_interpret():
        return backend
    if backend in ("triton", "cuda") and device.type != "cuda":
        raise BackendUnavailableError(
            f"backend {backend!r} runs on CUDA tensors, got tensors on {device}; use backend='auto'"
        )
    return backend
