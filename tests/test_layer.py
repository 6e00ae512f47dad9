"""FusedCoordGateConv2d as a drop-in nn.Conv2d, its gate map and its eval-mode gate cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import coordgate_ext as cg
from coordgate_ext.ops import dispatch
from conftest import assert_close

CONV_ARGS = [
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
    dict(in_channels=3, out_channels=4, kernel_size=4, padding="same", padding_mode="reflect"),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding="valid", bias=False),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=2, padding_mode="circular"),
    dict(in_channels=3, out_channels=4, kernel_size=5, stride=3, padding=1, padding_mode="replicate"),
]


@pytest.mark.parametrize("args", CONV_ARGS, ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
def test_identity_gate_equals_nn_conv2d(args):
    """A map encoder starts at ones, so with a ReLU gate the layer is exactly nn.Conv2d."""
    layer = cg.FusedCoordGateConv2d(**args, encoder="map", map_size=(1, 1), dtype=torch.float64, backend="cpu")
    conv = nn.Conv2d(**args, dtype=torch.float64)
    conv.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("encoder.")})
    assert isinstance(layer, nn.Conv2d)
    for size in [(11, 13), (16, 9)]:
        x = torch.randn(2, args["in_channels"], *size, dtype=torch.float64)
        out = layer(x)
        assert out.shape == conv(x).shape
        assert_close(out, conv(x))
        assert layer.output_size(*size) == tuple(out.shape[-2:])


def test_gate_map_shape_and_values():
    layer = cg.FusedCoordGateConv2d(3, 5, 3, encoder_hidden=7, hidden_activation="tanh", gate_activation="sigmoid")
    gate = layer.gate_map(6, 9)
    assert gate.shape == (5, 6, 9)
    expected = cg.reference.mlp_gate([l.weight for l in layer.encoder.layers], [l.bias for l in layer.encoder.layers],
                                     6, 9, "tanh", "sigmoid")
    assert_close(gate, expected)


def test_auto_backend_on_cpu_is_the_cpu_kernels():
    assert dispatch.resolve("auto", torch.device("cpu")) == "cpu"


def _calls_to_encoder(layer):
    calls = []
    layer.encoder.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_gate_cached_in_eval_and_invalidated():
    layer = cg.FusedCoordGateConv2d(3, 4, 3, padding=1, backend="cpu").eval()
    calls = _calls_to_encoder(layer)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first)
        assert len(calls) == 1, "the gate is computed once in eval mode"
        layer(torch.randn(1, 3, 10, 8))
        assert len(calls) == 2, "a new output size recomputes the gate"
        layer(x)
        assert len(calls) == 3
        layer.encoder.layers[0].bias.add_(1.0)
        changed = layer(x)
        assert len(calls) == 4, "an in-place parameter update invalidates the cache"
        assert not torch.equal(changed, first)
        expected = cg.FusedCoordGateConv2d(3, 4, 3, padding=1, backend="reference")
        expected.load_state_dict(layer.state_dict())
        assert_close(changed, expected(x))
        layer.double()
        layer(x.double())
        assert len(calls) == 5, "a dtype change invalidates the cache"


def test_eval_cache_keeps_a_pixel_major_gate_for_channels_last():
    """A channels_last input on the CPU reads the cached gate from a pixel-major copy, made
    once and refreshed with the map; gate_map stays contiguous."""
    layer = cg.FusedCoordGateConv2d(3, 5, 3, padding=1, backend="cpu").eval()
    expected = cg.FusedCoordGateConv2d(3, 5, 3, padding=1, backend="reference").eval()
    expected.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 10, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        layer(x.contiguous())
        assert layer._gate_cache[2] is None, "an NCHW input reads the contiguous map"
        assert_close(layer(x), expected(x))
        _, gate, pixel_major = layer._gate_cache
        assert gate.is_contiguous() and layer.gate_map(10, 9) is gate
        assert pixel_major.permute(1, 2, 0).is_contiguous() and torch.equal(pixel_major, gate)
        assert layer(x).is_contiguous(memory_format=torch.channels_last)
        assert layer._gate_cache[2] is pixel_major, "the copy is made once"
        for module in (layer, expected):
            module.encoder.layers[1].bias.add_(0.5)
        assert_close(layer(x), expected(x))
        assert not torch.equal(layer._gate_cache[2], pixel_major), "a parameter update refreshes the copy"


def test_gate_not_cached_when_training_or_differentiating():
    layer = cg.FusedCoordGateConv2d(3, 4, 3, padding=1, backend="cpu")
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        layer(x)
    assert layer._gate_cache is None, "training mode never caches"
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert layer._gate_cache is not None
    layer(x).sum().backward()
    # Eval mode with gradients flowing into the encoder does not use the cached gate.
    assert layer.encoder.layers[0].weight.grad is not None
    assert layer.encoder.layers[0].weight.grad.abs().sum() > 0


def test_training_keeps_no_gate_for_backward():
    """In training the op evaluates the MLP gate itself (again in backward): autograd keeps
    the input and the ungated convolution, nothing of the gate's (C, Ho, Wo) size."""
    layer = cg.FusedCoordGateConv2d(3, 5, 3, padding=1, backend="cpu")
    x = torch.randn(2, 3, 8, 7, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        layer(x)
    assert (5, 8, 7) not in shapes
    assert (2, 5, 8, 7) in shapes and (2, 3, 8, 7) in shapes


def test_compile_in_eval_mode_under_no_grad():
    torch._dynamo.reset()
    layer = cg.FusedCoordGateConv2d(3, 4, 3, padding=1, backend="cpu").eval()
    x = torch.randn(2, 3, 9, 8)
    with torch.no_grad():
        want = layer(x)
        got = torch.compile(layer, fullgraph=True)(x)
    assert_close(got, want)
