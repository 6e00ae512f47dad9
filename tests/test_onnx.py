"""ONNX export (torch.onnx.export, dynamo=True) of every layer and of small U-Nets: the graph
holds standard ONNX operators only, onnxruntime reproduces the PyTorch output, the batch
dimension can be left dynamic, and the exported gate is that of the current parameters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import coordgate_ext as cg
from coordgate_ext.ops import dispatch
from tests.support import assert_close

# Part of `make test`'s pinned set (requirements.txt); absent from a bare install.
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class _MixedUNet(nn.Module):
    """Two levels with one of each 2-D layer on the path: an MLP-gated conv, a strided
    map-gated conv, CoordGate, a transposed conv up, and a block with replicate padding."""

    def __init__(self):
        super().__init__()
        self.encode = cg.FusedCoordGateConv2d(2, 8, 3, padding=1)
        self.down = cg.FusedCoordGateConv2d(8, 8, 3, stride=2, padding=1, encoder="map", map_size=(4, 3))
        self.middle = cg.CoordGate(8, 8)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.decode = cg.FusedCoordGateBlock2d(16, 8, 2, 3, padding=1, padding_mode="replicate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.relu(self.encode(x))
        z = F.relu(self.middle(F.relu(self.down(skip))))
        return self.decode(torch.cat([self.up(z), skip], dim=1))


#: id -> (model factory, input shape).
MODELS = {
    "conv-mlp": (lambda: cg.FusedCoordGateConv2d(3, 8, 3, padding=1), (2, 3, 12, 10)),
    "conv-mlp-geometry": (
        lambda: cg.FusedCoordGateConv2d(
            3, 6, (3, 2), stride=2, padding=(1, 2), dilation=(1, 2), groups=3, padding_mode="reflect",
            encoder_layers=3, encoder_hidden=8, hidden_activation="gelu", gate_activation="sigmoid",
        ),
        (2, 3, 11, 9),
    ),
    "conv-map": (lambda: cg.FusedCoordGateConv2d(3, 8, 3, padding=1, encoder="map", map_size=(4, 5)),
                 (2, 3, 12, 10)),
    "conv-map-resampled": (
        lambda: cg.FusedCoordGateConv2d(3, 8, 3, padding="same", encoder="map", map_size=(5, 7),
                                        gate_activation="softplus"),
        (2, 3, 12, 10),
    ),
    "conv-bilinear": (lambda: cg.FusedCoordGateConv2d(3, 9, 3, padding=1, encoder="bilinear", map_size=(6, 5)),
                      (2, 3, 12, 10)),
    "block": (lambda: cg.FusedCoordGateBlock2d(3, 8, 5, 3, padding="same", hidden_activation="silu"),
              (2, 3, 12, 10)),
    "conv1d-mlp": (lambda: cg.FusedCoordGateConv1d(3, 8, 5, padding=2, gate_activation="tanh"), (2, 3, 20)),
    "conv1d-map": (lambda: cg.FusedCoordGateConv1d(3, 8, 3, stride=2, encoder="map", map_size=3), (2, 3, 19)),
    "coordgate-mlp": (lambda: cg.CoordGate(4, 6), (2, 4, 12, 10)),
    "coordgate-map": (lambda: cg.CoordGate(4, 6, "map", map_size=(6, 5)), (2, 4, 12, 10)),
    "unet-mixed": (_MixedUNet, (2, 2, 16, 12)),
    "unet": (lambda: cg.nn.UNet(1, 1, width=4, levels=2, kind="coordgate"), (2, 1, 16, 12)),
    "signalnet": (lambda: cg.nn.SignalNet("coordgate", width=4, kernel_size=5), (2, 1, 24)),
}
#: Models also exported in train mode: those that pass an MLP encoder's parameters to the op
#: when training (in eval a cached gate could stand in for them outside an export).
TRAIN_MODELS = ["conv-mlp", "block", "conv1d-mlp", "unet-mixed"]


def _make(name: str, training: bool = False) -> tuple[nn.Module, torch.Tensor]:
    """The model, its encoders' parameters drawn at random (a fresh map encoder's gate is all
    ones, which would hide a wrong gate), and an input."""
    make, shape = MODELS[name]
    model = make().train(training)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "encoder." in param_name:
                param.uniform_(-1, 1)
    return model, torch.randn(shape)


def _export(model: nn.Module, x: torch.Tensor, **options) -> onnx.ModelProto:
    return torch.onnx.export(model, (x,), dynamo=True, verbose=False, **options).model_proto


def _run(model: onnx.ModelProto, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def _op_types(model: onnx.ModelProto) -> set[str]:
    """The graph's operator types, after checking that each is a standard ONNX operator."""
    onnx.checker.check_model(model)
    assert not model.functions, [f.name for f in model.functions]
    for node in model.graph.node:
        assert node.domain in ("", "ai.onnx") and onnx.defs.has(node.op_type), (node.domain, node.op_type)
    return {node.op_type for node in model.graph.node}


def _initializers(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


@pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode")
@pytest.mark.parametrize(
    "name, training",
    [(name, False) for name in MODELS] + [(name, True) for name in TRAIN_MODELS],
    ids=[f"{name}-eval" for name in MODELS] + [f"{name}-train" for name in TRAIN_MODELS],
)
def test_export_matches_pytorch(name, training):
    model, x = _make(name, training)
    exported = _export(model, x)
    assert {"Conv", "Mul"} <= _op_types(exported)
    assert_close(_run(exported, x), model(x).detach())


@pytest.mark.parametrize("name", ["block", "conv1d-mlp", "unet-mixed"])
def test_dynamic_batch(name):
    model, x = _make(name)
    exported = _export(model, x, dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert exported.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (0, 1, 5):
        x = torch.randn(batch, *x.shape[1:])
        assert_close(_run(exported, x), model(x).detach())


@pytest.mark.parametrize("name", ["conv-mlp", "conv-map", "conv-bilinear", "coordgate-mlp", "conv1d-mlp"])
def test_unoptimized_graph_evaluates_the_encoder(name):
    """Without the exporter's constant folding the encoder stays in the graph, its parameters
    as initializers, even when an eval forward has cached the gate."""
    model, x = _make(name)
    with torch.no_grad():
        model(x)
    exported = _export(model, x, optimize=False)
    ops = _op_types(exported)
    encoder = {f"encoder.{n}" for n, _ in model.encoder.named_parameters()}
    assert encoder <= _initializers(exported)
    if "mlp" in name:
        assert ops & {"Gemm", "MatMul"} and "Relu" in ops
    assert_close(_run(exported, x), model(x).detach())


def test_export_follows_the_parameters():
    """An eval model whose gate is cached: an export after its encoder changes has the new
    gate (the default export folds the gate into a constant of the current parameters)."""
    model, x = _make("conv-mlp")
    with torch.no_grad():
        before = model(x)
        assert_close(_run(_export(model, x), x), before)
        model.encoder.layers[-1].bias.add_(0.5)
        after = model(x)
    assert not torch.allclose(before, after)
    assert_close(_run(_export(model, x), x), after)


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_any_backend_exports(backend):
    """The export holds the reference whatever backend the layer names, even one this
    machine cannot run (a model set up for GPU training exports on a CPU-only machine)."""
    model, x = _make("block")
    reference = copy.deepcopy(model)
    reference.backend = "reference"
    model.backend = backend
    exported = _export(model, x)
    assert_close(_run(exported, x), reference(x).detach())


def test_torch_export_keeps_the_operators():
    """The reference is taken only while torch.onnx.export runs: torch.export.export after an
    ONNX export still holds the coordgate_ext operators."""
    model, x = _make("conv-mlp")
    _export(model, x)
    assert not dispatch.exporting_onnx()
    graph = torch.export.export(model, (x,)).graph
    targets = {str(node.target) for node in graph.nodes if node.op == "call_function"}
    assert any(t.startswith("coordgate_ext.") for t in targets), targets
