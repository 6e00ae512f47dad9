"""FusedCoordGateConv1d against F.conv1d times a 1-D coordinate gate, and the experiment
models: forward / backward shapes, exact parameter counts, the Wiener stage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import coordgate_ext as cg
from coordgate_ext.nn.models import DEFAULT_GATE, MultiWienerNet, SignalNet, UNet, add_coords, count_parameters
from tests.support import assert_close

DTYPE = torch.float64

CONV1D_ARGS = [
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=5, stride=2, padding=3, dilation=2, groups=2),
    dict(in_channels=3, out_channels=4, kernel_size=4, padding="same", padding_mode="reflect"),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=2, padding_mode="circular", bias=False),
    dict(in_channels=2, out_channels=3, kernel_size=5, stride=3, padding=1, padding_mode="replicate"),
]


def _gate_1d(layer: cg.FusedCoordGateConv1d, length: int) -> torch.Tensor:
    """The MLP gate evaluated by hand on the 1-D coordinate: g[:, j] = psi(E(-1, t_j)),
    t = linspace(-1, 1, length), with a tanh hidden activation and a sigmoid gate."""
    t = torch.linspace(-1, 1, length, dtype=DTYPE)
    h = torch.stack([-torch.ones_like(t), t], dim=-1)
    layers = layer.encoder.layers
    for lin in layers[:-1]:
        h = torch.tanh(lin(h))
    return torch.sigmoid(layers[-1](h)).t()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("args", CONV1D_ARGS, ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
def test_conv1d_matches_conv1d_times_gate(args, backend):
    layer = cg.FusedCoordGateConv1d(**args, encoder_layers=3, encoder_hidden=5, hidden_activation="tanh",
                                    gate_activation="sigmoid", dtype=DTYPE, backend=backend)
    conv = nn.Conv1d(**args, dtype=DTYPE)
    conv.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("encoder.")})
    assert isinstance(layer, nn.Conv1d)
    x = torch.randn(2, args["in_channels"], 19, dtype=DTYPE, requires_grad=True)
    out = layer(x)
    gate = _gate_1d(layer, out.shape[-1])
    expected = conv(x) * gate
    assert out.shape == expected.shape and layer.output_size(19) == out.shape[-1]
    assert_close(out, expected)
    assert_close(layer.gate_map(out.shape[-1]), gate)
    # Gradients with respect to the input, the conv and the encoder match the composition.
    grad = torch.randn_like(out)
    params = [x, layer.weight, *layer.encoder.parameters()]
    got = torch.autograd.grad(out, params, grad)
    ref_params = [x, conv.weight, *layer.encoder.parameters()]
    want = torch.autograd.grad(conv(x) * _gate_1d(layer, out.shape[-1]), ref_params, grad)
    for a, b in zip(got, want):
        assert_close(a, b)


def test_conv1d_gradcheck():
    layer = cg.FusedCoordGateConv1d(2, 3, 3, padding=1, encoder_hidden=4, gate_activation="sigmoid",
                                    dtype=DTYPE, backend="cpu", gate_init="default")
    x = torch.randn(2, 2, 7, dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)


def test_conv1d_map_encoder_and_eval_cache():
    layer = cg.FusedCoordGateConv1d(2, 3, 3, encoder="map", map_size=4, dtype=DTYPE, gate_init="default")
    assert layer.encoder.map.shape == (3, 1, 4)
    x = torch.randn(1, 2, 10, dtype=DTYPE)
    # A map encoder starts at ones: with the ReLU gate the layer is the plain convolution.
    conv = nn.Conv1d(2, 3, 3, dtype=DTYPE)
    conv.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("encoder.")})
    assert_close(layer(x), conv(x))
    layer.eval()
    with torch.no_grad():
        calls = []
        layer.encoder.register_forward_hook(lambda *a: calls.append(1))
        first = layer.gate_map(8)
        assert torch.equal(layer.gate_map(8), first) and len(calls) == 1  # cached in eval mode
        layer.encoder.map.mul_(2)
        assert_close(layer.gate_map(8), 2 * first)  # an in-place update invalidates the cache


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(encoder="bilinear"), "no 1-D form"),
        (dict(encoder="map", map_size=(4, 4)), "map_size must be an int"),
        (dict(backend="gpu"), "backend must be"),
    ],
)
def test_conv1d_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cg.FusedCoordGateConv1d(2, 9, 3, **kwargs)


def test_conv1d_input_errors():
    layer = cg.FusedCoordGateConv1d(2, 3, 5, gate_init="default")
    with pytest.raises(ValueError, match=r"expected a 2-D \(C, L\) or 3-D \(N, C, L\) input, got 4-D"):
        layer(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="output would be empty"):
        layer(torch.randn(1, 2, 3))


# ----------------------------------------------------------------------------- models


def _conv_params(cin, cout, k):
    return cin * cout * k * k + cout


def _encoder_params(channels, hidden=DEFAULT_GATE["encoder_hidden"]):
    return 2 * hidden + hidden + hidden * channels + channels


def _unet_params(width, levels, kind, cin=1, cout=1):
    """The U-Net's parameter count from its layout (module docstring of models.py)."""
    widths = [width * 2**l for l in range(levels)]
    extra = 2 if kind == "coordconv" else 0

    def block(a, b):
        n = _conv_params(a + extra, b, 3) + _conv_params(b, b, 3)
        if kind == "coordgate":
            n += b * b + b + _encoder_params(b)  # the 1x1 mix and the gate's encoder
        return n

    total = sum(block(a, b) for a, b in zip([cin] + widths[:-1], widths))
    for l in range(levels - 1):
        total += widths[l + 1] * widths[l] * 4 + widths[l]  # transposed 2x2 conv
        total += block(2 * widths[l], widths[l])
    return total + widths[0] * cout + cout


@pytest.mark.parametrize("kind", ["plain", "coordconv", "coordgate"])
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_unet_shapes_and_parameter_count(kind, levels):
    model = UNet(1, 1, width=4, levels=levels, kind=kind)
    assert count_parameters(model) == _unet_params(4, levels, kind)
    x = torch.randn(2, 1, 16, 12, requires_grad=True)
    out = model(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())
    assert len(model.gate_layers()) == (2 * levels - 1 if kind == "coordgate" else 0)


def test_unet_gates_sit_before_every_pool_upsample_and_the_head():
    """In the CoordGate U-Net each block ends with a gated layer, and every pool, transposed
    conv and the head reads a block's output: record which module fed each of them."""
    model = UNet(1, 1, width=4, levels=3, kind="coordgate")
    last_gated = []
    for layer in model.gate_layers():
        layer.register_forward_hook(lambda m, i, o: last_gated.append(o))
    seen = []
    for module in [*model.up, model.head]:
        module.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    model(torch.randn(1, 1, 16, 16))
    # The input of every upsample and of the head is ReLU(the latest gated output).
    for consumed in seen:
        assert any(torch.equal(consumed, F.relu(o)) for o in last_gated)


def test_unet_residual_and_errors():
    model = UNet(1, 1, width=4, levels=2, kind="plain")
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    x = torch.randn(1, 1, 8, 8)
    assert torch.equal(model(x), x)  # residual: a zero head is the identity
    with pytest.raises(ValueError, match="multiples of 4"):
        UNet(levels=3)(torch.randn(1, 1, 10, 12))
    with pytest.raises(ValueError, match="kind must be one of"):
        UNet(kind="gated")
    with pytest.raises(ValueError, match="residual needs"):
        UNet(2, 1)


def test_add_coords():
    x = torch.zeros(2, 3, 4, 5)
    y = add_coords(x)
    assert y.shape == (2, 5, 4, 5)
    assert torch.equal(y[0, 3, :, 0], torch.linspace(-1, 1, 4)) and torch.equal(y[1, 4, 0], torch.linspace(-1, 1, 5))
    s = add_coords(torch.zeros(2, 1, 7))
    assert s.shape == (2, 2, 7) and torch.equal(s[1, 1], torch.linspace(-1, 1, 7))


def test_wiener_stage_with_a_delta_psf():
    """With h = delta, conj(H) Y / (|H|^2 + lambda) = Y / (1 + lambda): each estimate is the
    image scaled by 1 / (1 + lambda_k)."""
    psfs = torch.zeros(2, 5, 5)
    psfs[:, 2, 2] = 1
    model = MultiWienerNet(psfs, width=4, levels=2, regularisation=0.25)
    y = torch.rand(3, 1, 8, 12)
    estimates = model.wiener(y)
    assert estimates.shape == (3, 2, 8, 12)
    torch.testing.assert_close(estimates, y.expand(3, 2, 8, 12) / 1.25, rtol=1e-5, atol=1e-6)


def test_wiener_stage_inverts_a_blur():
    """A small lambda undoes a known blur in the middle of the image (away from the padding)."""
    # An outer product of [0.15, 0.7, 0.15], whose spectrum 0.7 + 0.3 cos(w) never vanishes.
    taps = torch.tensor([0.15, 0.7, 0.15])
    psf = taps[:, None] * taps[None, :]
    x = torch.zeros(1, 1, 24, 24)
    x[0, 0, 8:16, 8:16] = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    y = F.conv2d(x, psf[None, None], padding=1)
    model = MultiWienerNet(psf[None], width=4, levels=2, regularisation=1e-6)
    estimate = model.wiener(y)[0, 0]
    torch.testing.assert_close(estimate[6:18, 6:18], x[0, 0, 6:18, 6:18], atol=5e-3, rtol=0)


def test_multiwiener_shapes_and_gradients():
    psfs = torch.rand(3, 5, 5)
    model = MultiWienerNet(psfs, width=4, levels=2)
    assert count_parameters(model) == 3 * 25 + 3 + _unet_params(4, 2, "plain", cin=3, cout=1)
    y = torch.rand(2, 1, 16, 16)
    out = model(y)
    assert out.shape == y.shape
    out.mean().backward()
    assert model.psfs.grad.abs().sum() > 0 and model.log_lambda.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="odd"):
        MultiWienerNet(torch.rand(2, 4, 4))


@pytest.mark.parametrize("kind", ["plain", "coordconv", "coordgate"])
def test_signal_net(kind):
    model = SignalNet(kind, width=4, depth=2, kernel_size=5)
    conv = 1 * 4 * 5 + 4 + 4 * 4 * 5 + 4 + 4 + 1
    extra = {"plain": 0, "coordconv": 4 * 5 + 4 * 5, "coordgate": 2 * _encoder_params(4)}[kind]
    assert count_parameters(model) == conv + extra
    x = torch.rand(3, 1, 32, requires_grad=True)
    out = model(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="kind must be one of"):
        SignalNet("gated")
