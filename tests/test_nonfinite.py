"""NaN and Inf propagate as in the reference, through every activation and every backend:
non-finite encoder parameters (hidden and gate pre-activations of +-inf and NaN, 0 * inf),
and non-finite inputs meeting a zero gate."""

from __future__ import annotations

import copy

import pytest
import torch

import coordgate_ext as cg
from coordgate_ext import reference
from tests.support import BACKENDS, CUDA, HAS_TRITON, device_of

# NumPy, under the Triton interpreter, warns about the NaN these tests feed it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

#: (parameter, index, value): a hidden or gate pre-activation of +-inf or NaN everywhere
#: (biases), or a weight that meets the zero coordinate of an odd grid (0 * inf = NaN).
INJECTIONS = [
    ("layers.0.bias", (0,), float("inf")),
    ("layers.0.bias", (1,), float("-inf")),
    ("layers.0.bias", (2,), float("nan")),
    ("layers.0.weight", (0, 1), float("inf")),
    ("layers.1.bias", (0,), float("inf")),
    ("layers.1.bias", (1,), float("-inf")),
    ("layers.1.bias", (2,), float("nan")),
    ("layers.1.weight", (1, 0), float("-inf")),
]


def _same(actual, expected, what):
    torch.testing.assert_close(actual, expected, equal_nan=True, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


def _compare(layer, x, backend, train, what):
    layer, x = layer.to(device_of(backend)), x.to(device_of(backend))
    ours, spec = copy.deepcopy(layer), copy.deepcopy(layer)
    ours.backend, spec.backend = backend, "reference"
    results = []
    for module in (ours, spec):
        module.train(train)
        xi = x.clone().requires_grad_(train)
        out = module(xi)
        grads = ()
        if train:
            out.sum().backward()
            grads = (xi.grad, *(p.grad for p in module.parameters()))
        results.append((out.detach(), *grads))
    for a, b in zip(*results):
        _same(a, b, what)


def _layer(hidden, gate, injection, dtype):
    name, index, value = injection
    torch.manual_seed(0)
    layer = cg.FusedCoordGateConv2d(2, 3, 3, padding=1, encoder_hidden=4, hidden_activation=hidden,
                                    gate_activation=gate, gate_init="default", dtype=dtype)
    with torch.no_grad():
        layer.encoder.get_parameter(name)[index] = value
    return layer


@pytest.mark.parametrize("backend", ["cpu", CUDA])
@pytest.mark.parametrize("hidden", reference.ACTIVATIONS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_nonfinite_encoder_parameters_propagate(backend, hidden, train):
    """The C++ backends: the fused op's in-op encoder (train) and the gate op (eval), forward
    and every gradient."""
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    for gate in reference.ACTIVATIONS:
        for injection in INJECTIONS:
            layer = _layer(hidden, gate, injection, torch.float64)
            _compare(layer, x, backend, train, f"{hidden}/{gate}: {injection}")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("hidden", reference.ACTIVATIONS)
def test_nonfinite_through_the_triton_in_kernel_encoder(hidden, monkeypatch):
    """The Triton kernel that evaluates the encoder itself (gate_mode="kernel"): forward
    (its backward goes through the reference encoder)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from coordgate_ext.ops import triton_ops

    x = torch.randn(1, 2, 5, 5)
    for gate in reference.ACTIVATIONS:
        for injection in INJECTIONS:
            layer = _layer(hidden, gate, injection, torch.float32)
            spec = layer.encoder.spec()
            args = (x, layer.weight, layer.bias, list(spec.weights), list(spec.biases), hidden, gate,
                    (1, 1), (1, 1), (1, 1), 1)
            with torch.no_grad():
                got = triton_ops.coordgate_conv2d_encoder(*args, gate_mode="kernel")
                # Against the float64 reference: torch's float32 gelu gives NaN at +inf.
                layer.double().backend = "reference"
                _same(got, layer(x.double()).float(), f"{hidden}/{gate}: {injection}")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_nonfinite_through_the_triton_backend(monkeypatch):
    """The layer on the Triton backend, forward and gradients, for one activation pair."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(1, 2, 5, 5)
    for injection in INJECTIONS:
        for train in (True, False):
            _compare(_layer("relu", "softplus", injection, torch.float32), x, "triton", train, f"{injection}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_nonfinite_input_meets_a_zero_gate(backend, value, monkeypatch):
    """inf * 0 = NaN where a relu gate is zero, as in the reference."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    dtype = torch.float32 if backend == "triton" else torch.float64
    layer = cg.FusedCoordGateConv2d(2, 3, 3, padding=1, encoder="map", map_size=(1, 1), dtype=dtype)
    with torch.no_grad():
        layer.encoder.map[1] = -1.0  # relu(-1) = 0: channel 1 is gated to zero
    x = torch.randn(1, 2, 6, 6, dtype=dtype)
    x[0, 0, 2, 3] = value
    for train in (True, False):
        _compare(layer, x, backend, train, f"input {value}")


@pytest.mark.parametrize("name", reference.ACTIVATIONS)
def test_cpu_activations_match_torch_on_special_values(name):
    """The C++ activations (the MLP gate op with an identity layer) on +-inf, NaN, +-0 and
    values around softplus's threshold."""
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 19.5, 20.5, -30.0],
                           dtype=torch.float64)
    # One layer 2 -> n, zero weight, the special values as biases: psi(bias) on every pixel.
    weight = torch.zeros(special.numel(), 2, dtype=torch.float64)
    gate = cg.mlp_gate([weight], [special], 2, 3, "none", name, backend="cpu")
    expected = reference.activation(name, special)[:, None, None].expand(-1, 2, 3)
    _same(gate, expected, name)
