"""Helpers shared by tests/ and tests/triton/, imported as ``tests.support`` (conftest files
hold fixtures only: pytest imports test files with --import-mode=importlib, so a test folder is
never put on sys.path and tests/triton cannot shadow the triton package)."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

#: The CUDA C++ backend, on CUDA tensors where a GPU is visible.
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
#: The fused backends: the C++ CPU kernels, Triton (on CPU tensors through its interpreter), CUDA.
BACKENDS = [
    "cpu",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")),
    CUDA,
]


#: Tolerances by dtype, for comparisons against the float64 reference.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}

#: The floor added to the low-precision rule below.
LOW_PRECISION_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None) -> None:
    """actual vs expected with the table's tolerance for ``dtype`` (default: actual's)."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


def assert_low_precision(actual: torch.Tensor, same_precision_ref: torch.Tensor, exact: torch.Tensor) -> None:
    """The flash-attention rule: the kernel's error against a float64 reference is at most
    twice the error of the PyTorch reference computed in the same low precision, plus a floor."""
    floor = LOW_PRECISION_FLOOR[actual.dtype]
    err = (actual.double() - exact).abs().max().item()
    ref_err = (same_precision_ref.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + floor, f"error {err:.3g} > 2 * reference error {ref_err:.3g} + {floor}"


def device_of(backend: str) -> str:
    """Where a backend's test tensors live."""
    return "cuda" if backend == "cuda" else "cpu"


def count_flops(fn) -> tuple[int, dict[str, int]]:
    """(total FLOPs, {op name: FLOPs}) that FlopCounterMode counts while fn runs."""
    with FlopCounterMode(display=False) as mode:
        fn()
    return mode.get_total_flops(), {str(op): n for op, n in mode.get_flop_counts()["Global"].items()}


class CountCalls(TorchDispatchMode):
    """Counts the calls of each op below the modes above it."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func] += 1
        return func(*args, **(kwargs or {}))


def sample(arg, in_dim, index):
    """Sample ``index`` of an argument batched along ``in_dim`` (a tensor, or a list with one
    in_dim or one per tensor); any other argument as it is."""
    if isinstance(arg, torch.Tensor) and in_dim is not None:
        return arg.select(in_dim, index)
    if isinstance(arg, list) and isinstance(in_dim, (int, list)):
        dims = in_dim if isinstance(in_dim, list) else [in_dim] * len(arg)
        return [sample(a, d, index) for a, d in zip(arg, dims)]
    return arg


def randomize(layer: torch.nn.Module) -> torch.nn.Module:
    """The layer with random parameters, all away from zero (a fresh layer's gate is one)."""
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 0.3)
    return layer


def params_of(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The layer's parameters, detached, for torch.func.functional_call."""
    return {k: v.detach() for k, v in layer.named_parameters()}


def loss_of(layer: torch.nn.Module):
    """loss(params, x, cotangent) = sum(layer(x) * cotangent) with the given parameters."""

    def loss(params, x, cotangent):
        return (functional_call(layer, params, (x,)) * cotangent).sum()

    return loss
