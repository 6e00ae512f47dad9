"""Gated convolution on the CPU: bare F.conv2d (the bound), the eager reference and each fused
backend, side by side, training forward and forward+backward. float32.

Run: ``make bench`` or ``pytest benchmarks/``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import coordgate_ext as cg

# (N, Cin, C, kernel, H, W)
SHAPES = [(4, 32, 32, 3, 256, 256)]
PROVIDERS = ["bare_conv", "reference", "cpu"]
MODES = ["forward", "fwd+bwd"]


def _case_id(shape):
    n, cin, c, k, h, w = shape
    return f"N{n}-{cin}to{c}-k{k}-{h}x{w}"


def _layers(shape):
    n, cin, c, k, h, w = shape
    torch.manual_seed(0)
    fused = cg.FusedCoordGateConv2d(cin, c, k, padding=k // 2, backend="cpu")
    ref = copy.deepcopy(fused)
    ref.backend = "reference"
    return fused, ref, torch.randn(n, cin, h, w)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=_case_id)
def test_gated_conv2d(benchmark, record_median, shape, provider, mode):
    fused, ref, x = _layers(shape)
    with torch.no_grad():  # the fused output equals the reference before anything is timed
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)
    if provider == "bare_conv":
        weight, bias = fused.weight, fused.bias
        model = lambda inp: F.conv2d(inp, weight, bias, padding=fused.padding)  # noqa: E731
    else:
        model = fused if provider == "cpu" else ref
    inp = x.requires_grad_(mode == "fwd+bwd")

    def run():
        out = model(inp)
        if mode == "fwd+bwd":
            out.backward(torch.ones_like(out))

    benchmark.group = f"{_case_id(shape)} {mode}"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    record_median(_case_id(shape), mode, provider, benchmark)
