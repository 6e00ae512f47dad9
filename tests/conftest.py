"""Shared fixtures: devices with skip marks, seeding (the tolerance table is in tests/support.py)."""

from __future__ import annotations

import pytest
import torch

import coordgate_ext  # noqa: F401  (registers the operators)

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
