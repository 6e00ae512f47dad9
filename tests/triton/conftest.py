"""Fixtures of the Triton tests: CPU tensors run the kernels through the Triton interpreter.

TRITON_INTERPRET=1 is set per test (monkeypatch), not at import: it is what lets the
dispatcher send CPU tensors to the Triton backend. The kernels' interpreted and compiled copies
are built whatever it says (coordgate_ext/triton/_runtime.py), so the CUDA variants run
compiled kernels and no other test sees it.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

TRITON_DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.fixture(autouse=True)
def _triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(params=TRITON_DEVICES)
def tdevice(request) -> str:
    return request.param
