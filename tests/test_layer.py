"""FusedCoordGateConv2d as a drop-in nn.Conv2d and its gate map (the eval-mode gate cache: test_gate_cache.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import coordgate_ext as cg
from coordgate_ext.ops import dispatch
from tests.support import assert_close

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
    layer = cg.FusedCoordGateConv2d(3, 5, 3, encoder_hidden=7, hidden_activation="tanh", gate_activation="sigmoid",
                                    gate_init="default")
    gate = layer.gate_map(6, 9)
    assert gate.shape == (5, 6, 9)
    expected = cg.reference.mlp_gate([l.weight for l in layer.encoder.layers], [l.bias for l in layer.encoder.layers],
                                     6, 9, "tanh", "sigmoid")
    assert_close(gate, expected)


def test_auto_backend_on_cpu_is_the_cpu_kernels():
    assert dispatch.resolve("auto", torch.device("cpu")) == "cpu"


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


def _plain_twin(layer):
    """The nn.Conv1d / nn.Conv2d (with its 1x1 mix for a block) holding the layer's weights."""
    kind = nn.Conv1d if isinstance(layer, cg.FusedCoordGateConv1d) else nn.Conv2d
    conv = kind(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, dtype=layer.weight.dtype)
    conv.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    if not isinstance(layer, cg.FusedCoordGateBlock2d):
        return conv
    mix = nn.Conv2d(layer.out_channels, layer.mix_out_channels, 1, dtype=layer.weight.dtype)
    mix.load_state_dict({"weight": layer.mix_weight, "bias": layer.mix_bias})
    return nn.Sequential(conv, mix)


LAYERS = {
    "conv2d": lambda **kw: cg.FusedCoordGateConv2d(3, 4, 3, padding=1, **kw),
    "conv2d-map": lambda **kw: cg.FusedCoordGateConv2d(3, 4, 3, padding=1, encoder="map", map_size=(3, 2), **kw),
    "block2d": lambda **kw: cg.FusedCoordGateBlock2d(3, 4, 5, 3, padding=1, **kw),
    "conv1d": lambda **kw: cg.FusedCoordGateConv1d(3, 4, 3, padding=1, **kw),
}


def _input(name, *batch):
    return torch.randn(*batch, 3, 11) if name == "conv1d" else torch.randn(*batch, 3, 9, 7)


@pytest.mark.parametrize("gate_activation", cg.reference.ACTIVATIONS)
@pytest.mark.parametrize("name", LAYERS)
def test_fresh_layer_behaves_like_its_plain_conv(name, gate_activation):
    """gate_init="one" (the default): the gate starts at one on every pixel (at psi(3) where
    psi never reaches one), so a fresh layer computes its plain convolution's output."""
    layer = LAYERS[name](gate_activation=gate_activation, dtype=torch.float64)
    x = _input(name, 2).double()
    one = 1.0 if gate_activation not in ("sigmoid", "tanh") else cg.reference.activation(
        gate_activation, torch.tensor(3.0, dtype=torch.float64)).item()
    with torch.no_grad():
        expected = one * _plain_twin(layer)(x) if name != "block2d" else _plain_twin(layer)[1](
            one * _plain_twin(layer)[0](x))
        assert_close(layer(x), expected)
        gate = layer.gate_map(11) if name == "conv1d" else layer.gate_map(9, 7)
    assert_close(gate, torch.full_like(gate, one))


def test_default_gate_init_is_pytorchs_and_the_papers_module_keeps_it():
    torch.manual_seed(0)
    layer = cg.FusedCoordGateConv2d(3, 4, 3, gate_init="default")
    torch.manual_seed(0)
    nn.Conv2d(3, 4, 3)
    expected = [nn.Linear(2, 32), nn.Linear(32, 4)]
    for ours, linear in zip(layer.encoder.layers, expected):
        assert torch.equal(ours.weight, linear.weight) and torch.equal(ours.bias, linear.bias)
    assert cg.CoordGate(4, 4).encoder.gate_init == "default"


@pytest.mark.parametrize("name", LAYERS)
def test_reset_parameters_resets_the_encoder_and_the_mix(name):
    """Meta-device construction, to_empty, reset_parameters: a usable layer, the encoder and
    the mix re-initialised too (to_empty leaves whatever was in memory: NaN here)."""
    layer = LAYERS[name](device="meta").to_empty(device="cpu")
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(float("nan"))
    layer.reset_parameters()
    for pname, p in layer.named_parameters():
        assert p.isfinite().all(), pname
    gate = layer.gate_map(11) if name == "conv1d" else layer.gate_map(9, 7)
    assert torch.equal(gate, torch.ones_like(gate))
    x = _input(name, 2)
    with torch.no_grad():
        assert_close(layer(x), _plain_twin(layer)(x))
    block = cg.FusedCoordGateBlock2d(3, 4, 5, 3)
    before = block.mix_weight.clone()
    block.reset_parameters()
    assert not torch.equal(block.mix_weight, before)
    coordgate = cg.CoordGate(4, 3)
    with torch.no_grad():
        for p in coordgate.parameters():
            p.fill_(float("nan"))
    coordgate.reset_parameters()
    assert all(p.isfinite().all() for p in coordgate.parameters())


@pytest.mark.parametrize("name", [*LAYERS, "coordgate"])
def test_unbatched_input(name):
    """(C, H, W) (and (C, L) for the 1-D layer) as nn.Conv2d / nn.Conv1d take it: the batched
    result's sample, in training and in eval mode."""
    layer = cg.CoordGate(3, 4) if name == "coordgate" else LAYERS[name]()
    x = _input(name, 1)
    for train in (True, False):
        layer.train(train)
        single = x[0].clone().requires_grad_()
        out = layer(single)
        assert out.shape == layer(x)[0].shape
        assert_close(out, layer(x)[0])
        out.sum().backward()
        assert single.grad.shape == single.shape


@pytest.mark.parametrize("name", [*LAYERS, "coordgate"])
def test_meta_forward_with_auto_backend(name):
    """Meta tensors give meta outputs of nn.Conv2d's shape, as nn.Conv2d does."""
    layer = cg.CoordGate(3, 4, device="meta") if name == "coordgate" else LAYERS[name](device="meta")
    x = _input(name, 2).to("meta")
    cpu_layer = cg.CoordGate(3, 4) if name == "coordgate" else LAYERS[name]()
    for train in (True, False):
        layer.train(train)
        out = layer(x)
        assert out.device.type == "meta"
        assert out.shape == cpu_layer(torch.randn(x.shape)).shape
