"""Shared fixtures: devices with skip marks, the tolerance table, seeding."""

from __future__ import annotations

import pytest
import torch

import coordgate_ext  # noqa: F401  (registers the operators)

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


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
