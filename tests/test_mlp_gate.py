"""coordgate_ext::mlp_gate: the C++ encoder against the reference, gradients, gradcheck."""

from __future__ import annotations

import pytest
import torch

import coordgate_ext as cg
from coordgate_ext import reference
from tests.support import assert_close

# (widths 2 -> ... -> C, hidden_activation, gate_activation, height, width)
CASES = [
    ((2, 4), "none", "relu", 5, 7),
    ((2, 8, 6), "relu", "relu", 9, 4),
    ((2, 8, 6), "none", "relu", 1, 1),
    ((2, 5, 5, 3), "tanh", "sigmoid", 6, 11),
    ((2, 16, 7), "silu", "gelu", 13, 3),
    ((2, 3, 4), "gelu", "softplus", 2, 2),
    ((2, 6, 6), "sigmoid", "tanh", 7, 1),
    ((2, 6, 6), "softplus", "silu", 3, 5),
    # More pixels than one tile of the C++ kernel (2048), with a partial last tile.
    ((2, 8, 4), "relu", "sigmoid", 47, 53),
]


def _params(widths, dtype):
    weights = [torch.randn(o, i, dtype=dtype, requires_grad=True) for i, o in zip(widths[:-1], widths[1:])]
    biases = [torch.randn(o, dtype=dtype, requires_grad=True) for o in widths[1:]]
    return weights, biases


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference(case, dtype):
    widths, hidden, gate_act, h, w = case
    weights, biases = _params(widths, dtype)
    got = cg.mlp_gate(weights, biases, h, w, hidden, gate_act, backend="cpu")
    want = reference.mlp_gate(weights, biases, h, w, hidden, gate_act)
    assert got.shape == (widths[-1], h, w)
    assert_close(got, want)
    grad = torch.randn_like(want)
    for g, r in zip(torch.autograd.grad(got, weights + biases, grad),
                    torch.autograd.grad(want, weights + biases, grad)):
        assert_close(g, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameters_computed_in_float32(dtype):
    weights, biases = _params((2, 8, 4), torch.float32)
    low_w = [w.detach().to(dtype) for w in weights]
    low_b = [b.detach().to(dtype) for b in biases]
    got = cg.mlp_gate(low_w, low_b, 9, 7, "tanh", "sigmoid", backend="cpu")
    want = reference.mlp_gate([w.float() for w in low_w], [b.float() for b in low_b], 9, 7, "tanh", "sigmoid")
    assert got.dtype == dtype
    torch.testing.assert_close(got, want.to(dtype))


def test_grid_coordinates_match_linspace():
    """A single linear layer with identity weights exposes the coordinates themselves."""
    weight = torch.eye(2, dtype=torch.float64)
    bias = torch.zeros(2, dtype=torch.float64)
    for h, w in [(1, 1), (2, 5), (7, 4), (100, 3)]:
        gate = torch.ops.coordgate_ext.mlp_gate([weight], [bias], h, w, "none", "none")
        # Up to rounding: torch's vectorised linspace may contract to FMA.
        rows = torch.linspace(-1, 1, h, dtype=torch.float64)[:, None].expand(h, w)
        cols = torch.linspace(-1, 1, w, dtype=torch.float64)[None, :].expand(h, w)
        torch.testing.assert_close(gate[0], rows, rtol=0, atol=1e-15)
        torch.testing.assert_close(gate[1], cols, rtol=0, atol=1e-15)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=lambda c: "-".join(map(str, c)))
def test_gradcheck(case):
    widths, hidden, gate_act, h, w = case
    weights, biases = _params(widths, torch.float64)
    layers = len(weights)

    def f(*params):
        return cg.mlp_gate(params[:layers], params[layers:], h, w, hidden, gate_act, backend="cpu")

    assert torch.autograd.gradcheck(f, (*weights, *biases))


@pytest.mark.parametrize("widths, hidden", [((2, 16, 8), "relu"), ((2, 16, 16, 8), "tanh")],
                         ids=["piecewise-linear", "tiled-gemm"])
def test_backward_is_deterministic_and_thread_independent(widths, hidden):
    weights, biases = _params(widths, torch.float32)
    grad = torch.randn(8, 61, 67)
    args = (grad, weights, biases, 61, 67, hidden, "sigmoid")
    first = torch.ops.coordgate_ext.mlp_gate_backward(*args)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.ops.coordgate_ext.mlp_gate_backward(*args)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first[0] + first[1], single[0] + single[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("hidden", ["relu", "none"])
@pytest.mark.parametrize("gate_act", ["relu", "gelu"])
def test_piecewise_linear_encoder_edge_cases(hidden, gate_act):
    """Two-layer relu / none encoders take the per-row piecewise-linear path: units that
    switch inside a row (either direction), never, always, and one whose pre-activation does
    not depend on the column (W1[e, 1] = 0), on a wide grid."""
    weights, biases = _params((2, 7, 5), torch.float64)
    with torch.no_grad():
        weights[0][:, 1] = torch.tensor([3.0, -2.0, 0.0, 0.5, -0.7, 1e-3, 4.0], dtype=torch.float64)
        biases[0][:] = torch.tensor([0.1, -0.3, 0.2, 5.0, -5.0, 2.5e-4, -0.5], dtype=torch.float64)
    # Even sizes: no coordinate is 0, so no pixel sits exactly on a unit's kink, where the
    # relu's gradient is a matter of rounding (either side is a valid subgradient).
    h, w = 22, 300
    got = cg.mlp_gate(weights, biases, h, w, hidden, gate_act, backend="cpu")
    want = reference.mlp_gate(weights, biases, h, w, hidden, gate_act)
    assert_close(got, want)
    grad = torch.randn_like(want)
    for g, r in zip(torch.autograd.grad(got, weights + biases, grad),
                    torch.autograd.grad(want, weights + biases, grad)):
        assert_close(g, r)


def test_large_gate_from_reused_buffers():
    """Gates of at least 1 MiB come from the CPU output cache: a reused buffer must hold the
    new gate, not the old one."""
    cg.empty_cpu_cache()
    for step in range(3):
        weights, biases = _params((2, 6, 8), torch.float32)
        got = cg.mlp_gate(weights, biases, 192, 192, "tanh", "relu", backend="cpu")
        assert_close(got, reference.mlp_gate(weights, biases, 192, 192, "tanh", "relu"))
        del got
        assert cg.cpu_cache_bytes() >= 8 * 192 * 192 * 4
    cg.empty_cpu_cache()
