"""Graph capture of the layers: torch.export.export with a dynamic batch (the custom ops kept
whole), and torch.compile(dynamic=True) over changing input shapes without recompiling."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.export import Dim, export

import coordgate_ext as cg
from coordgate_ext.ops import dispatch
from tests.support import assert_close

#: name: (layer factory, the coordgate_ext op its forward becomes, whether it is a fused convolution)
LAYERS = {
    "conv2d-mlp": (lambda: cg.FusedCoordGateConv2d(3, 4, 3, padding=1), "mlp_gated_conv2d", True),
    "conv2d-map": (
        lambda: cg.FusedCoordGateConv2d(3, 4, 3, stride=2, padding=1, encoder="map", map_size=(4, 5)),
        "gated_conv2d",
        True,
    ),
    "block2d": (
        lambda: cg.FusedCoordGateBlock2d(3, 5, 2, 3, padding=1, hidden_activation="tanh"),
        "mlp_gated_conv2d",
        True,
    ),
    "conv1d": (lambda: cg.FusedCoordGateConv1d(3, 4, 3, padding=1), "mlp_gated_conv2d", True),
    "coordgate": (lambda: cg.CoordGate(3, 4), "mlp_gate", False),
}
MODES = ["train", "eval"]


def _input(name: str, batch: int, height: int, width: int) -> torch.Tensor:
    shape = (batch, 3, height * width) if name == "conv1d" else (batch, 3, height, width)
    return torch.randn(shape)


def _forward_backward(module, x, train: bool):
    """(output, grad of x, {name: parameter grad}); under no_grad in eval mode."""
    if not train:
        with torch.no_grad():
            return module(x), None, {}
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(torch.ones_like(out))
    # A compiled module names its parameters "_orig_mod.<name>".
    return out, x.grad, {n.removeprefix("_orig_mod."): p.grad for n, p in module.named_parameters()}


def _assert_same(got, want) -> None:
    (out, grad_x, grads), (want_out, want_grad_x, want_grads) = got, want
    assert_close(out, want_out)
    if want_grad_x is not None:
        assert_close(grad_x, want_grad_x)
    assert grads.keys() == want_grads.keys()
    for name in want_grads:
        assert_close(grads[name], want_grads[name])


def _called_ops(program: torch.export.ExportedProgram) -> set[str]:
    return {str(node.target) for node in program.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LAYERS)
def test_export_with_dynamic_batch_matches_eager(name, mode):
    """Exported at batch 2 (eval mode under no_grad), run at batch 5: the eager module's output
    and, in train mode, its gradients. With the cpu backend the graph holds the fused op, not
    a decomposition of it."""
    factory, op, fused = LAYERS[name]
    train = mode == "train"
    layer = factory().train(train)
    exported_layer = copy.deepcopy(layer)
    with torch.set_grad_enabled(train):
        program = export(exported_layer, (_input(name, 2, 7, 6),), dynamic_shapes={"input": {0: Dim("batch")}})
    x = _input(name, 5, 7, 6)
    _assert_same(_forward_backward(program.module(), x, train), _forward_backward(layer, x, train))
    if dispatch.resolve("auto", torch.device("cpu")) == "cpu":
        ops = _called_ops(program)
        assert f"coordgate_ext.{op}.default" in ops, sorted(ops)
        if fused:
            assert not any(o.startswith("aten.conv") for o in ops), sorted(ops)


@pytest.mark.parametrize("name", ["conv2d-map", "block2d", "coordgate"])  # one layer per op
def test_exported_program_survives_decompositions_and_save_load(name):
    """run_decompositions() keeps the custom ops whole; torch.export.save / load round-trips
    their schemas (tensor lists, strings, int lists, optional tensors)."""
    factory, op, _ = LAYERS[name]
    layer = factory()
    program = export(layer, (_input(name, 2, 7, 6),), dynamic_shapes={"input": {0: Dim("batch")}})
    decomposed = program.run_decompositions()
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    x = _input(name, 3, 7, 6)
    want = layer(x)
    assert_close(decomposed.module()(x), want)
    assert_close(loaded.module()(x), want)
    if dispatch.resolve("auto", torch.device("cpu")) == "cpu":
        assert f"coordgate_ext.{op}.default" in _called_ops(decomposed)
        assert f"coordgate_ext.{op}.default" in _called_ops(loaded)


#: (batch, height, width) per call: every one changes the batch and the grid. No size is 1 and
#: the first call's sizes are all different: torch itself specialises sizes 0 and 1 and
#: equal sizes of the first call (duck shaping), which would recompile whatever the library does.
COMPILE_SHAPES = [(2, 9, 8), (3, 11, 7), (5, 6, 13)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LAYERS)
def test_compile_dynamic_does_not_recompile(name, mode):
    """torch.compile(dynamic=True, fullgraph=True) compiles the layer once for every batch and
    grid; a recompile raises with its guard failure. The aot_eager backend traces the fake
    kernels and the autograd formulas with symbolic shapes, where the library could
    specialise a size; Inductor's code generation is left out (it would take ~8 s a case on
    two cores, and it adds no guard of the library's)."""
    torch._dynamo.reset()
    train = mode == "train"
    layer = LAYERS[name][0]().train(train)
    eager = copy.deepcopy(layer)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, dynamic=True, fullgraph=True)
    for call, (batch, height, width) in enumerate(COMPILE_SHAPES):
        x = _input(name, batch, height, width)
        with torch._dynamo.config.patch(error_on_recompile=call > 0):
            got = _forward_backward(compiled, x, train)
        layer.zero_grad()
        want = _forward_backward(eager, x, train)
        eager.zero_grad()
        _assert_same(got, want)
    assert counter.frame_count == 1
