"""FlopCounterMode counts the coordgate_ext ops' FLOPs: every op, in forward and in
forward+backward through the public layers on the CPU backend, against what FlopCounterMode
counts for the same computation written with PyTorch ops (nn.Conv2d, the reference encoder's
nn.Linear GEMMs, the reference backend), plus the work the fused ops redo in backward; and a
meta-test that every op of the namespace has a formula."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import flop_registry

import coordgate_ext as cg
from coordgate_ext import reference
from coordgate_ext.nn.encoders import MLPEncoder
from coordgate_ext.ops import _library
from tests.support import count_flops

ops = torch.ops.coordgate_ext


@dataclass(frozen=True)
class Case:
    """A layer: ``args`` of FusedCoordGateConv2d (or of FusedCoordGateBlock2d when block),
    ``frozen`` parameter groups ("conv", "encoder", "mix") that need no gradient."""

    args: tuple
    options: dict = field(default_factory=dict)
    block: bool = False
    frozen: tuple = ()
    input_grad: bool = True
    input_shape: tuple = (2, 9, 7)  # (N, H, W)


CASES = {
    "conv3x3": Case((4, 6, 3), dict(padding=1)),
    "stride2-groups2-no-bias": Case((4, 6, 3), dict(stride=2, groups=2, bias=False)),
    "dilation-non-square-kernel-3-layers": Case((3, 5, (3, 2)), dict(dilation=(2, 1), padding=(1, 0),
                                                                     encoder_layers=3)),
    "same-even-kernel-reflect-1-layer": Case((3, 4, 4), dict(padding="same", padding_mode="reflect",
                                                             encoder_layers=1)),
    "recompute": Case((4, 6, 3), dict(stride=(1, 2), recompute=True)),
    "batch-0": Case((4, 6, 3), input_shape=(0, 9, 7)),
    "no-input-grad": Case((4, 6, 3), dict(stride=2), input_grad=False),
    "frozen-conv": Case((4, 6, 3), dict(groups=2), frozen=("conv",)),
    "frozen-conv-no-input-grad": Case((4, 6, 3), frozen=("conv",), input_grad=False),
    "frozen-encoder": Case((4, 6, 3), dict(groups=2), frozen=("encoder",)),
    "frozen-encoder-recompute": Case((4, 6, 3), dict(recompute=True), frozen=("encoder",)),
    "block": Case((4, 6, 3, 3), dict(padding=1), block=True),
    "block-groups-recompute": Case((4, 6, 5, 3), dict(groups=2, recompute=True), block=True),
    "block-frozen-mix": Case((4, 6, 3, 3), block=True, frozen=("mix",)),
    "block-only-mix-grads": Case((4, 6, 3, 3), block=True, frozen=("conv", "encoder"), input_grad=False),
}


#: (the layer's encoder, the forward op its forward runs, the backward op); the gate map
#: (layer.gate_map) runs GATE_OPS.
LAYER_OPS = [("mlp", "mlp_gated_conv2d", "mlp_gated_conv2d_backward"), ("map", "gated_conv2d", "gated_conv2d_backward")]
GATE_OPS = ("mlp_gate", "mlp_gate_backward")


def _layers(case: Case, encoder: str):
    """(the CPU backend's layer, its reference twin with the same parameters), and the input."""
    cls = cg.FusedCoordGateBlock2d if case.block else cg.FusedCoordGateConv2d
    options = dict(case.options, encoder=encoder, encoder_hidden=8)
    if encoder == "map":
        options.pop("encoder_layers", None)
        options["map_size"] = (2, 3)
    fused = cls(*case.args, backend="cpu", **options)
    twin = cls(*case.args, backend="reference", **options)
    twin.load_state_dict(fused.state_dict())
    for layer in (fused, twin):
        groups = {"conv": [layer.weight, layer.bias], "encoder": list(layer.encoder.parameters()),
                  "mix": [getattr(layer, "mix_weight", None), getattr(layer, "mix_bias", None)]}
        for name in case.frozen:
            for p in groups[name]:
                if p is not None:
                    p.requires_grad_(False)
    n, h, w = case.input_shape
    x = torch.randn(n, case.args[0], h, w, requires_grad=case.input_grad)
    return fused, twin, x


def _reference_gate(layer, height: int, width: int) -> torch.Tensor:
    spec = layer.encoder.spec()
    return reference.mlp_gate(spec.weights, spec.biases, height, width, spec.hidden_activation,
                              spec.gate_activation)


def _conv_twin(layer) -> nn.Conv2d:
    """The plain nn.Conv2d of the layer's convolution."""
    return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode)


def _forward_and_backward(layer, x):
    out = layer(x)
    out.backward(torch.randn_like(out))


def _recomputed(layer, x) -> int:
    """What the fused op redoes in backward: the encoder's forward (it keeps nothing of the
    gate's size), and the convolution when it was not saved but the gate's or the mix
    weight's gradient needs it."""
    flops = 0
    ho, wo = layer.output_size(*x.shape[2:])
    if isinstance(layer.encoder, MLPEncoder):
        with torch.no_grad():
            flops += count_flops(lambda: _reference_gate(layer, ho, wo))[0]
    mix_weight = getattr(layer, "mix_weight", None)
    needs_y = any(p.requires_grad for p in layer.encoder.parameters()) or (
        mix_weight is not None and mix_weight.requires_grad)
    if layer.recompute and needs_y:
        with torch.no_grad():
            flops += count_flops(lambda: _conv_twin(layer)(x))[0]
    return flops


def test_every_op_has_a_flop_formula():
    missing = [name for name in _library.OPS if getattr(ops, name) not in flop_registry]
    assert not missing, f"ops of {_library.NAMESPACE} without a FlopCounterMode formula: {missing}"


def test_forward_count_is_the_conv_and_encoder_formula():
    # DESIGN section 6: 2 * N * Ho * Wo * C * (Cin / groups) * kh * kw, plus the encoder's
    # GEMMs 2 * Ho * Wo * sum in_l * out_l and the mix's 2 * N * Ho * Wo * Cout * C.
    n, cin, c, cout, groups, k, hidden = 2, 4, 6, 5, 2, 3, 8
    block = cg.FusedCoordGateBlock2d(cin, c, cout, k, stride=2, groups=groups, encoder_hidden=hidden,
                                     backend="cpu")
    x = torch.randn(n, cin, 9, 7)
    ho, wo = (9 - k) // 2 + 1, (7 - k) // 2 + 1
    expected = (2 * n * ho * wo * c * (cin // groups) * k * k + 2 * ho * wo * (2 * hidden + hidden * c)
                + 2 * n * ho * wo * cout * c)
    assert count_flops(lambda: block(x)) == (expected, {"coordgate_ext.mlp_gated_conv2d": expected})


@pytest.mark.parametrize("encoder,op", [(encoder, fwd) for encoder, fwd, _ in LAYER_OPS])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_layer_forward(case, encoder, op):
    fused, _, x = _layers(case, encoder)
    total, by_op = count_flops(lambda: fused(x))
    ho, wo = fused.output_size(*x.shape[2:])
    expected, _ = count_flops(lambda: _conv_twin(fused)(x))
    if encoder == "mlp":
        expected += count_flops(lambda: _reference_gate(fused, ho, wo))[0]
    if case.block:
        gated = torch.randn(x.shape[0], fused.out_channels, ho, wo)
        expected += count_flops(lambda: F.conv2d(gated, fused.mix_weight, fused.mix_bias))[0]
    assert f"coordgate_ext.{op}" in by_op
    assert total == expected


@pytest.mark.parametrize("encoder,op", [(encoder, bwd) for encoder, _, bwd in LAYER_OPS])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_layer_forward_backward(case, encoder, op):
    fused, twin, x = _layers(case, encoder)
    total, by_op = count_flops(lambda: _forward_and_backward(fused, x))
    expected, _ = count_flops(lambda: _forward_and_backward(twin, x))
    assert f"coordgate_ext.{op}" in by_op
    assert total == expected + _recomputed(fused, x)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_gate_map(layers):
    fused, twin, _ = _layers(Case((3, 5, 3), dict(encoder_layers=layers)), "mlp")
    total, by_op = count_flops(lambda: fused.gate_map(6, 11))
    assert f"coordgate_ext.{GATE_OPS[0]}" in by_op
    assert total == count_flops(lambda: twin.gate_map(6, 11))[0]

    total, by_op = count_flops(lambda: fused.gate_map(6, 11).backward(torch.randn(5, 6, 11)))
    expected, _ = count_flops(lambda: twin.gate_map(6, 11).backward(torch.randn(5, 6, 11)))
    assert f"coordgate_ext.{GATE_OPS[1]}" in by_op
    # mlp_gate_backward evaluates the encoder again for its activations.
    assert total == expected + count_flops(lambda: twin.gate_map(6, 11))[0]


def test_every_op_is_counted_by_a_test():
    tested = {op for _, fwd, bwd in LAYER_OPS for op in (fwd, bwd)} | set(GATE_OPS)
    assert tested == set(_library.OPS)
