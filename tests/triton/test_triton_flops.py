"""FlopCounterMode counts the coordgate_ext_triton ops' FLOPs: every op, in forward and in
forward+backward through the functional API with backend="triton" (the interpreter on CPU
tensors), against what FlopCounterMode counts for the reference backend on the same tensors
plus the work the Triton path redoes in backward; and a meta-test that every op of the
namespace has a formula."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import flop_registry

import coordgate_ext as cg
from coordgate_ext import reference
from coordgate_ext.functional import MLPGate, conv2d_output_size
from coordgate_ext.ops import triton_ops
from tests.support import count_flops

ops = torch.ops.coordgate_ext_triton


@dataclass(frozen=True)
class Case:
    """gate: "map" (a (C, Ho, Wo) tensor), "kernel" or "encoder-map" (an MLP encoder whose gate
    the kernel evaluates, or that is computed as a map first); ``no_grad`` names the tensors
    that need no gradient; ops: (the forward op, the backward op) the case runs."""

    gate: str
    ops: tuple[str, str]
    mix: bool = False
    recompute: bool = False
    no_grad: tuple = ()
    geometry: int = 0


#: (input (N, Cin, H, W), weight (C, Cin/groups, kh, kw), stride, padding, dilation, groups)
GEOMETRIES = [
    ((2, 4, 6, 5), (4, 2, 3, 3), (2, 1), (1, 1), (1, 1), 2),
    ((1, 3, 5, 6), (5, 3, 2, 3), (1, 1), (0, 1), (2, 1), 1),
]

PLAIN = ("gated_conv2d", "gated_conv2d_backward")
FUSED = ("gated_conv2d_fused", "gated_conv2d_fused_backward")
CASES = {
    "map": Case("map", PLAIN),
    "map-recompute": Case("map", PLAIN, recompute=True, geometry=1),
    "map-no-input-grad": Case("map", PLAIN, no_grad=("input",)),
    "map-frozen-weight-recompute": Case("map", PLAIN, recompute=True, no_grad=("weight", "bias"), geometry=1),
    "map-mix": Case("map", FUSED, mix=True),
    "map-mix-recompute": Case("map", FUSED, mix=True, recompute=True, geometry=1),
    "map-only-mix-grads-recompute": Case("map", FUSED, mix=True, recompute=True,
                                         no_grad=("input", "weight", "bias", "gate")),
    "kernel": Case("kernel", FUSED),
    "kernel-recompute": Case("kernel", FUSED, recompute=True, geometry=1),
    "kernel-frozen-encoder-recompute": Case("kernel", FUSED, recompute=True, no_grad=("gate",)),
    "encoder-map-mix": Case("encoder-map", FUSED, mix=True, geometry=1),
}


def _tensors(case: Case, device: str) -> dict:
    x_shape, w_shape, stride, padding, dilation, groups = GEOMETRIES[case.geometry]
    channels = w_shape[0]
    ho, wo = conv2d_output_size(*x_shape[2:], w_shape[2:], stride, padding, dilation)

    def t(name, *shape):
        return torch.randn(*shape, device=device).requires_grad_(name not in case.no_grad)

    if case.gate == "map":
        gate = torch.rand(channels, ho, wo, device=device).requires_grad_("gate" not in case.no_grad)
    else:
        widths = (2, 6, channels)
        gate = MLPGate([t("gate", o, i) for i, o in zip(widths[:-1], widths[1:])],
                       [t("gate", o) for o in widths[1:]], "tanh", "sigmoid")
    return dict(input=t("input", *x_shape), weight=t("weight", *w_shape), bias=t("bias", channels), gate=gate,
                stride=stride, padding=padding, dilation=dilation, groups=groups,
                mix_weight=t("mix", 3, channels, 1, 1) if case.mix else None,
                mix_bias=t("mix", 3) if case.mix else None, recompute=case.recompute)


def _run(case: Case, args: dict, backend: str) -> torch.Tensor:
    if backend == "triton" and case.gate != "map":
        return triton_ops.coordgate_conv2d_encoder(
            args["input"], args["weight"], args["bias"], args["gate"].weights, args["gate"].biases,
            args["gate"].hidden_activation, args["gate"].gate_activation, args["stride"], args["padding"],
            args["dilation"], args["groups"], args["mix_weight"], args["mix_bias"], case.recompute,
            gate_mode="kernel" if case.gate == "kernel" else "map")
    return cg.coordgate_conv2d(
        args["input"], args["weight"], args["bias"], args["gate"], args["stride"], args["padding"],
        args["dilation"], args["groups"], mix_weight=args["mix_weight"], mix_bias=args["mix_bias"],
        recompute=case.recompute, backend=backend)


def _forward_and_backward(case, args, backend):
    out = _run(case, args, backend)
    out.backward(torch.ones_like(out))


def _recomputed(case: Case, args: dict) -> int:
    """What the Triton path redoes in backward: the in-kernel encoder's forward (its
    gradient runs through the reference encoder), and the convolution when it was not saved
    but the gate's or the mix weight's gradient needs it."""
    flops = 0
    gate = args["gate"]
    if case.gate == "kernel":
        ho, wo = conv2d_output_size(*args["input"].shape[2:], tuple(args["weight"].shape[2:]), args["stride"],
                                    args["padding"], args["dilation"])
        with torch.no_grad():
            flops += count_flops(lambda: reference.mlp_gate(gate.weights, gate.biases, ho, wo,
                                                       gate.hidden_activation, gate.gate_activation))[0]
    gate_needs_grad = "gate" not in case.no_grad
    mix_needs_grad = case.mix and "mix" not in case.no_grad
    if case.recompute and (gate_needs_grad or mix_needs_grad):
        with torch.no_grad():
            flops += count_flops(lambda: F.conv2d(args["input"], args["weight"], args["bias"], args["stride"],
                                             args["padding"], args["dilation"], args["groups"]))[0]
    return flops


def test_every_op_has_a_flop_formula():
    missing = [name for name in triton_ops.OPS if getattr(ops, name) not in flop_registry]
    assert not missing, f"ops of {triton_ops.NAMESPACE} without a FlopCounterMode formula: {missing}"


def test_every_op_is_counted_by_a_test():
    assert {op for case in CASES.values() for op in case.ops} == set(triton_ops.OPS)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward(case, tdevice):
    torch.manual_seed(0)
    args = _tensors(case, tdevice)
    total, by_op = count_flops(lambda: _run(case, args, "triton"))
    assert f"{triton_ops.NAMESPACE}.{case.ops[0]}" in by_op
    assert total == count_flops(lambda: _run(case, args, "reference"))[0]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_backward(case, tdevice):
    torch.manual_seed(0)
    args = _tensors(case, tdevice)
    total, by_op = count_flops(lambda: _forward_and_backward(case, args, "triton"))
    expected, _ = count_flops(lambda: _forward_and_backward(case, args, "reference"))
    assert f"{triton_ops.NAMESPACE}.{case.ops[1]}" in by_op
    assert total == expected + _recomputed(case, args)
