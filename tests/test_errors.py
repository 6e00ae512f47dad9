"""Clear errors for bad input, each message checked: the public API and the ops directly."""

from __future__ import annotations

import pytest
import torch

import coordgate_ext as cg
from coordgate_ext.ops import dispatch

ops = torch.ops.coordgate_ext


def _conv_args(**overrides):
    args = dict(
        input=torch.randn(2, 4, 8, 8),
        weight=torch.randn(6, 4, 3, 3),
        bias=torch.randn(6),
        gate=torch.rand(6, 6, 6),
        stride=[1, 1],
        padding=[0, 0],
        dilation=[1, 1],
        groups=1,
        mix_weight=None,
        mix_bias=None,
        save_conv=False,
    )
    args.update(overrides)
    return args


OP_ERRORS = [
    (dict(input=torch.randn(4, 8, 8)), r"expected a 4-D input \(N, Cin, H, W\), got 3-D"),
    (dict(weight=torch.randn(6, 4, 3)), r"expected a 4-D weight"),
    (dict(gate=torch.rand(6, 36)), r"expected a 3-D gate \(C, Ho, Wo\), got 2-D"),
    (dict(input=torch.randn(2, 5, 8, 8)), r"expected input with 4 channels .* got 5"),
    (dict(groups=4, weight=torch.randn(6, 1, 3, 3)), r"output channels \(6\) must be divisible by groups \(4\)"),
    (dict(input=torch.randn(2, 0, 8, 8), weight=torch.randn(6, 0, 3, 3)),
     r"expected at least one input channel per group, got a weight of shape \[6, 0, 3, 3\]"),
    (dict(bias=torch.randn(5)), r"expected a bias of shape \(6\)"),
    (dict(gate=torch.rand(6, 5, 6)), r"expected a gate of shape \(6, 6, 6\), got \[6, 5, 6\]"),
    (dict(gate=torch.rand(5, 6, 6)), r"expected a gate of shape \(6, 6, 6\)"),
    (dict(weight=torch.randn(6, 4, 3, 3, dtype=torch.float64)), r"must have one dtype; got input Float, weight Double"),
    (dict(input=torch.randint(0, 3, (2, 4, 8, 8))), r"expected a floating-point input, got Long"),
    (dict(input=torch.randn(2, 4, 2, 8)), r"the output would be empty \(0x6\)"),
    (dict(stride=[0, 1]), r"stride must be positive"),
    (dict(dilation=[1, 0]), r"dilation must be positive"),
    (dict(padding=[-1, 0]), r"padding must be non-negative"),
    (dict(groups=0), r"groups must be positive"),
    (dict(mix_weight=torch.randn(3, 5, 1, 1)), r"expected a mix_weight of shape \(Cout, 6, 1, 1\), got \[3, 5, 1, 1\]"),
    (dict(mix_weight=torch.randn(3, 6, 3, 3)), r"expected a mix_weight of shape \(Cout, 6, 1, 1\)"),
    (dict(mix_weight=torch.randn(3, 6, 1, 1), mix_bias=torch.randn(4)), r"expected a mix_bias of shape \(3\), got \[4\]"),
    (dict(mix_bias=torch.randn(3)), r"a mix_bias was given without a mix_weight"),
    (dict(mix_weight=torch.randn(3, 6, 1, 1, dtype=torch.float64)),
     r"mix_weight and mix_bias must have the input's dtype \(Float\); got Double"),
]


@pytest.mark.parametrize("overrides,message", OP_ERRORS, ids=[m for _, m in OP_ERRORS])
def test_gated_conv2d_op_errors(overrides, message):
    with pytest.raises(RuntimeError, match=message):
        ops.gated_conv2d(**_conv_args(**overrides))


def test_gated_conv2d_backward_shape_errors():
    args = _conv_args()
    del args["save_conv"]
    with pytest.raises(RuntimeError, match=r"expected grad_out of shape \[2, 6, 6, 6\]"):
        ops.gated_conv2d_backward(torch.randn(2, 6, 6, 5), conv_out=torch.empty(0),
                                  output_mask=[True] * 4 + [False] * 2, **args)
    with pytest.raises(RuntimeError, match=r"expected conv_out of shape \[2, 6, 6, 6\] or empty"):
        ops.gated_conv2d_backward(torch.randn(2, 6, 6, 6), conv_out=torch.randn(2, 6, 6, 5),
                                  output_mask=[True] * 4 + [False] * 2, **args)
    with pytest.raises(RuntimeError, match=r"mix gradients asked for without a mix_weight"):
        ops.gated_conv2d_backward(torch.randn(2, 6, 6, 6), conv_out=torch.empty(0),
                                  output_mask=[True] * 6, **args)
    args.update(mix_weight=torch.randn(3, 6, 1, 1))
    with pytest.raises(RuntimeError, match=r"expected grad_out of shape \(N, 3, Ho, Wo\) \(the mix's output"):
        ops.gated_conv2d_backward(torch.randn(2, 6, 6, 6), conv_out=torch.empty(0),
                                  output_mask=[True] * 6, **args)


MLP_ERRORS = [
    (([torch.randn(4, 2)], []), r"expected one bias per weight, got 1 weights and 0 biases"),
    (([torch.randn(4, 2), torch.randn(3, 5)], [torch.randn(4), torch.randn(3)]),
     r"encoder width mismatch: layer 1 expects 5 input features but the previous layer gives 4"),
    (([torch.randn(4, 3)], [torch.randn(4)]), r"layer 0 expects 3 input features but the previous layer gives 2"),
    (([torch.randn(4, 2)], [torch.randn(5)]), r"encoder bias 0 must have shape \(4\)"),
    (([torch.randn(4, 2, 1)], [torch.randn(4)]), r"encoder weight 0 must be 2-D"),
    (([torch.randn(4, 2), torch.randn(3, 4, dtype=torch.float64)], [torch.randn(4), torch.randn(3)]),
     r"every encoder parameter must have one dtype"),
]


@pytest.mark.parametrize("params,message", MLP_ERRORS, ids=[m for _, m in MLP_ERRORS])
def test_mlp_gate_op_errors(params, message):
    with pytest.raises(RuntimeError, match=message):
        ops.mlp_gate(*params, 4, 4, "relu", "relu")


def test_mlp_gate_without_layers():
    with pytest.raises(ValueError, match=r"expected at least one encoder layer, got none"):
        cg.mlp_gate([], [], 4, 4, backend="cpu")


def test_mlp_gate_op_grid_and_activation_errors():
    w, b = [torch.randn(4, 2)], [torch.randn(4)]
    with pytest.raises(RuntimeError, match=r"expected a non-empty output grid, got 0x4"):
        ops.mlp_gate(w, b, 0, 4, "relu", "relu")
    with pytest.raises(RuntimeError, match=r"activation must be one of .* got 'swish'"):
        ops.mlp_gate(w, b, 4, 4, "swish", "relu")
    with pytest.raises(RuntimeError, match=r"expected grad_gate of shape \(4, 4, 4\)"):
        ops.mlp_gate_backward(torch.randn(4, 4, 3), w, b, 4, 4, "relu", "relu")


def test_public_api_errors():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match=r"expected input with 4 channels .* got 3"):
        cg.FusedCoordGateConv2d(4, 6, 3, backend="cpu")(x)
    with pytest.raises(ValueError, match=r"expected a 3-D \(C, H, W\) or 4-D \(N, C, H, W\) input, got 5-D"):
        cg.FusedCoordGateConv2d(3, 6, 3, backend="cpu")(x[None])
    with pytest.raises(ValueError, match=r"expected a 2-D \(C, L\) or 3-D \(N, C, L\) input, got 4-D"):
        cg.FusedCoordGateConv1d(3, 6, 3, backend="cpu")(x)
    with pytest.raises(ValueError, match=r"the output would be empty \(0x0\) for an input of 8x8 and kernel \(9, 9\)"):
        cg.FusedCoordGateConv2d(3, 6, 9, backend="cpu")(x)
    with pytest.raises(RuntimeError, match=r"must have one dtype"):
        cg.FusedCoordGateConv2d(3, 6, 3, backend="cpu")(x.double())
    layer = cg.FusedCoordGateConv2d(3, 6, 3, backend="cpu")
    gate = layer.gate_map(6, 6).to("meta")
    with pytest.raises(ValueError, match=r"every tensor must be on the input's device \(cpu\); gate is on meta"):
        cg.coordgate_conv2d(x, layer.weight, layer.bias, gate, backend="cpu")
    with pytest.raises(ValueError, match=r"padding_mode must be one of"):
        cg.coordgate_conv2d(x, layer.weight, layer.bias, layer.gate_map(6, 6), padding_mode="mirror")
    for backend in ("reference", "cpu"):
        with pytest.raises(ValueError, match=r"expected at least one input channel per group, got a weight of shape "
                                             r"\[6, 0, 3, 3\]"):
            cg.coordgate_conv2d(x[:, :0], layer.weight[:, :0], layer.bias, layer.gate_map(6, 6), backend=backend)
    with pytest.raises(ValueError, match=r"padding='same' is not supported for strided convolutions"):
        cg.FusedCoordGateConv2d(3, 6, 3, stride=2, padding="same")


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"encoder must be one of mlp, map, bilinear \(or 'pos'\); got 'fourier'"):
        cg.FusedCoordGateConv2d(3, 6, 3, encoder="fourier")
    with pytest.raises(ValueError, match=r"the bilinear encoder gates exactly 9 channels, got 6"):
        cg.FusedCoordGateConv2d(3, 6, 3, encoder="bilinear")
    with pytest.raises(ValueError, match=r"at least one layer, got encoder_layers=0"):
        cg.FusedCoordGateConv2d(3, 6, 3, encoder_layers=0)
    with pytest.raises(ValueError, match=r"activation must be one of .* got 'swish'"):
        cg.FusedCoordGateConv2d(3, 6, 3, gate_activation="swish")
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of reference, cpu, triton, cuda; got 'gpu'"):
        cg.FusedCoordGateConv2d(3, 6, 3, backend="gpu")
    with pytest.raises(ValueError, match=r"gate_init must be one of one, default; got 'zero'"):
        cg.FusedCoordGateConv2d(3, 6, 3, gate_init="zero")
    with pytest.raises(ValueError, match=r"encoder_hidden must be a positive int, got 0"):
        cg.FusedCoordGateConv2d(3, 6, 3, encoder_hidden=0)


CONV_ARGUMENT_ERRORS = [
    (dict(stride=1.5), r"FusedCoordGateConv2d: stride must be a positive int or a tuple of 2 positive ints, got 1.5"),
    (dict(stride=(1, 0)), r"stride must be a positive int .* got \(1, 0\)"),
    (dict(stride=(1, 1, 1)), r"stride must be a positive int or a tuple of 2 positive ints, got \(1, 1, 1\)"),
    (dict(dilation=0), r"dilation must be a positive int .* got 0"),
    (dict(kernel_size=2.0), r"kernel_size must be a positive int .* got 2.0"),
    (dict(padding=-1), r"padding must be 'same', 'valid', a non-negative int or a tuple of 2 of them, got -1"),
    (dict(padding=(1, 0.5)), r"padding must be .* got \(1, 0.5\)"),
    (dict(encoder="map", map_size=(0, 4)), r"map_size must be 2 positive ints, got \(0, 4\)"),
    (dict(encoder="map", map_size=4), r"map_size must be 2 positive ints, got 4"),
]


@pytest.mark.parametrize("overrides,message", CONV_ARGUMENT_ERRORS, ids=[m for _, m in CONV_ARGUMENT_ERRORS])
def test_conv_argument_errors(overrides, message):
    """Each says which argument, what was expected and what was got (nn.Conv2d takes them
    and fails at the first forward with "'float' object is not iterable" and the like)."""
    with pytest.raises(ValueError, match=message):
        cg.FusedCoordGateConv2d(3, 6, **{"kernel_size": 3, **overrides})


def test_conv1d_and_coordgate_argument_errors():
    with pytest.raises(ValueError, match=r"FusedCoordGateConv1d: stride must be a positive int or a tuple of 1 "
                                         r"positive ints, got 1.5"):
        cg.FusedCoordGateConv1d(3, 6, 3, stride=1.5)
    with pytest.raises(ValueError, match=r"FusedCoordGateConv1d: map_size must be an int or \(m,\), got \(2, 2\)"):
        cg.FusedCoordGateConv1d(3, 6, 3, encoder="map", map_size=(2, 2))
    with pytest.raises(ValueError, match=r"map_size must be 2 positive ints, got \(4, 0\)"):
        cg.CoordGate(9, 4, encoder="bilinear", map_size=(4, 0))


def test_functional_argument_errors():
    x, w, gate = torch.randn(1, 3, 8, 8), torch.randn(6, 3, 3, 3), torch.rand(6, 6, 6)
    with pytest.raises(ValueError, match=r"stride must be an int or a pair of ints, got 1.5"):
        cg.coordgate_conv2d(x, w, None, gate, stride=1.5)
    with pytest.raises(ValueError, match=r"dilation must be an int or a pair of ints, got \(1, 2, 3\)"):
        cg.coordgate_conv2d(x, w, None, gate, dilation=(1, 2, 3))


def test_a_failed_extension_load_warns_once_with_the_cause(tmp_path):
    """A copy of the package without the compiled extension: one warning at import naming
    the missing module and the fix; the reference still runs, and asking for the C++
    backend says why it cannot."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    package = Path(cg.__file__).parent
    shutil.copytree(package, tmp_path / "coordgate_ext", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    script = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import coordgate_ext as cg\n"
        "    import coordgate_ext.ops, coordgate_ext.nn\n"
        "print(len(caught)); print(caught[0].message)\n"
        "import torch\n"
        "print(cg.FusedCoordGateConv2d(2, 3, 3)(torch.randn(1, 2, 5, 5)).shape)\n"
        "try:\n"
        "    cg.FusedCoordGateConv2d(2, 3, 3, backend='cpu')(torch.randn(1, 2, 5, 5))\n"
        "except cg.BackendUnavailableError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    count, message, shape, refusal = done.stdout.strip().splitlines()
    assert count == "1"
    assert "No module named 'coordgate_ext._C'" in message and "make build" in message
    assert "circular import" not in message
    assert shape == "torch.Size([1, 3, 3, 3])"
    assert "backend 'cpu' is not available" in refusal and "No module named 'coordgate_ext._C'" in refusal


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU makes the CUDA-side backends available")
def test_unavailable_backends_say_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(cg.BackendUnavailableError, match=r"backend 'triton' is not available: no CUDA device .*TRITON_INTERPRET=1"):
        cg.FusedCoordGateConv2d(3, 6, 3, backend="triton")(x)
    built = cg.ops._library.has_kernel("gated_conv2d", "CUDA")
    cuda_reason = "no CUDA device is visible to torch" if built else "built without CUDA kernels"
    with pytest.raises(cg.BackendUnavailableError, match=rf"backend 'cuda' is not available: .*{cuda_reason}"):
        cg.FusedCoordGateConv2d(3, 6, 3, backend="cuda")(x)
    with pytest.raises(cg.BackendUnavailableError, match=r"backend 'cpu' runs on CPU tensors, got tensors on cuda"):
        dispatch.resolve("cpu", torch.device("cuda"))
    reasons = cg.available_backends()
    assert reasons["reference"] is None and reasons["cpu"] is None
    assert "no CUDA device" in reasons["triton"]


def test_double_backward_is_refused():
    layer = cg.FusedCoordGateConv2d(2, 3, 3, padding=1, backend="cpu")
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward .* is not supported"):
        gx.sum().backward()


def test_cpu_engine_errors():
    with pytest.raises(ValueError, match="cpu engine must be one of auto, aten, implicit_gemm; got 'onednn'"):
        cg.set_cpu_engine("onednn")
    with pytest.raises(ValueError, match="cpu engine must be one of 'auto', 'aten', 'implicit_gemm'"):
        cg.ops._library._C.set_cpu_engine("onednn")
    assert cg.cpu_engine() == "auto"


def test_cpu_band_bytes_errors():
    default = cg.cpu_band_bytes()
    assert default == 2 << 20
    with pytest.raises(ValueError, match="cpu band bytes must be at least 1, got 0"):
        cg.set_cpu_band_bytes(0)
    with pytest.raises(TypeError, match="cpu band bytes must be an int, got float"):
        cg.set_cpu_band_bytes(1.5)
    with pytest.raises(ValueError, match="cpu band bytes must be at least 1, got -3"):
        cg.ops._library._C.set_cpu_band_bytes(-3)
    assert cg.cpu_band_bytes() == default


def test_cpu_stream_bytes_errors():
    default = cg.cpu_stream_bytes()
    assert default == 128 << 20
    with pytest.raises(ValueError, match="cpu stream bytes must be at least 0, got -1"):
        cg.set_cpu_stream_bytes(-1)
    with pytest.raises(TypeError, match="cpu stream bytes must be an int, got str"):
        cg.set_cpu_stream_bytes("1")
    with pytest.raises(ValueError, match="cpu stream bytes must be at least 0, got -3"):
        cg.ops._library._C.set_cpu_stream_bytes(-3)
    assert cg.cpu_stream_bytes() == default


@pytest.mark.parametrize("engine", ["aten", "implicit_gemm"])
@pytest.mark.parametrize("overrides,message", OP_ERRORS, ids=[m for _, m in OP_ERRORS])
def test_op_errors_under_each_cpu_engine(engine, overrides, message):
    """The argument checks run before either engine."""
    previous = cg.cpu_engine()
    cg.set_cpu_engine(engine)
    try:
        with pytest.raises(RuntimeError, match=message):
            ops.gated_conv2d(**_conv_args(**overrides))
    finally:
        cg.set_cpu_engine(previous)


def _mlp_conv_args(**overrides):
    args = _conv_args(**overrides)
    del args["gate"]
    args.update(encoder_weights=[torch.randn(5, 2), torch.randn(6, 5)], encoder_biases=[torch.randn(5), torch.randn(6)],
                hidden_activation="relu", gate_activation="sigmoid")
    return args


MLP_CONV_ERRORS = [
    (dict(stride=[0, 1]), r"stride must be positive"),
    (dict(dilation=[1, 0]), r"dilation must be positive"),
    (dict(padding=[0, -1]), r"padding must be non-negative"),
    (dict(groups=0), r"groups must be positive"),
    (dict(weight=torch.randn(6, 4, 0, 3)), r"expected a non-empty kernel, got 0x3"),
    (dict(input=torch.randn(2, 5, 8, 8)), r"expected input with 4 channels .* got 5"),
    (dict(input=torch.randn(2, 0, 8, 8), weight=torch.randn(6, 0, 3, 3)),
     r"expected at least one input channel per group"),
    (dict(mix_bias=torch.randn(3)), r"a mix_bias was given without a mix_weight"),
]


@pytest.mark.parametrize("engine", ["aten", "implicit_gemm"])
@pytest.mark.parametrize("overrides,message", MLP_CONV_ERRORS, ids=[m for _, m in MLP_CONV_ERRORS])
def test_mlp_gated_conv2d_op_errors(engine, overrides, message):
    """Raised, not crashed on (a zero stride used to divide before any check)."""
    previous = cg.cpu_engine()
    cg.set_cpu_engine(engine)
    try:
        with pytest.raises(RuntimeError, match=message):
            ops.mlp_gated_conv2d(**_mlp_conv_args(**overrides))
    finally:
        cg.set_cpu_engine(previous)


def test_auto_passes_over_a_backend_for_dtypes_it_refuses(monkeypatch):
    """With no CUDA kernels built, "auto" runs float64 CUDA tensors on the reference, not on
    the Triton kernels that refuse float64."""
    monkeypatch.setattr(dispatch, "_unavailable_reason", lambda name: "not built" if name == "cuda" else None)
    cuda = torch.device("cuda")
    assert dispatch.resolve("auto", cuda, torch.float32) == "triton"
    assert dispatch.resolve("auto", cuda, torch.float64) == "reference"
