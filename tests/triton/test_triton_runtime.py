"""CUDA tensors run compiled Triton kernels and CPU tensors interpreted ones, whatever
TRITON_INTERPRET says when the kernels are first needed (a fresh process for each order)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import torch
from coordgate_ext.triton import _runtime
for device in {order}:
    module, interpreted = _runtime.kernels_for(torch.device(device))
    assert interpreted == (device == "cpu"), device
    assert _runtime.is_interpreted(module) == (device == "cpu"), device
print("ok")
"""


@pytest.mark.parametrize("order", [("cuda", "cpu"), ("cpu", "cuda")], ids="-then-".join)
def test_cuda_kernels_are_compiled_even_when_first_needed_under_the_interpreter(order):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHECK.format(order=order)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_kernels_imported_under_the_interpreter_are_refused_for_cuda():
    code = (
        "import importlib, os, torch\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "importlib.import_module('coordgate_ext.triton.kernels')\n"
        "from coordgate_ext.triton import _runtime\n"
        "_runtime.kernels_for(torch.device('cuda'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "was imported with TRITON_INTERPRET=1, so its kernels are interpreted" in proc.stderr
