"""coordgate_ext::gated_conv2d: the fused backends against the reference over an explicit
matrix of convolution geometries, layouts, encoders and dtypes; gradcheck; gradients."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
import torch

import coordgate_ext as cg
from coordgate_ext import reference
from coordgate_ext.ops.gated_conv2d import conv_output_size
from tests.support import assert_close, assert_low_precision

# backend-engine: the C++ CPU kernels with each of their convolution engines (ATen's, the
# implicit GEMM that runs the CUDA kernels' per-element maths from csrc/common, and "auto",
# which mixes them per call), and the CUDA kernels on CUDA tensors where a GPU is present.
FUSED_BACKENDS = [
    "cpu-aten",
    "cpu-aten_rows",
    "cpu-implicit_gemm",
    "cpu-auto",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or cg.available_backends()["cuda"] is not None,
        reason=f"CUDA backend not available: {cg.available_backends()['cuda']}")),
]


@contextlib.contextmanager
def _cpu_settings(engine: str, band_bytes: int | None = None, stream_bytes: int | None = None):
    """The CPU engine (and the ATen engine's band and stream bytes) for the block, restored
    after it."""
    engine_before, band_before, stream_before = (cg.cpu_engine(), cg.cpu_band_bytes(),
                                                 cg.cpu_stream_bytes())
    cg.set_cpu_engine(engine)
    if band_bytes is not None:
        cg.set_cpu_band_bytes(band_bytes)
    if stream_bytes is not None:
        cg.set_cpu_stream_bytes(stream_bytes)
    try:
        yield
    finally:
        cg.set_cpu_engine(engine_before)
        cg.set_cpu_band_bytes(band_before)
        cg.set_cpu_stream_bytes(stream_before)


@pytest.fixture(params=FUSED_BACKENDS)
def backend(request):
    if request.param == "cuda":
        yield "cuda"
        return
    name, engine = request.param.split("-", 1)
    band_bytes = None
    if engine == "aten_rows":
        # The ATen engine with bands of one output row of one sample: every band's input
        # halo, its zero padding at the image's edges, strides and dilations go through the
        # row-band path that large images take.
        engine, band_bytes = "aten", 1
    with _cpu_settings(engine, band_bytes):
        yield name


def _device(backend: str) -> str:
    """The device whose tensors a backend runs."""
    return "cuda" if backend in ("cuda", "triton") else "cpu"


# (N, Cin, C, H, W, kernel, stride, padding, dilation, groups, bias, padding_mode)
GEOMETRIES = [
    (1, 3, 4, 7, 9, 1, 1, 0, 1, 1, True, "zeros"),
    (3, 4, 6, 9, 7, 3, 1, 1, 1, 1, True, "zeros"),
    (3, 4, 6, 9, 7, 3, 2, 1, 1, 1, False, "zeros"),
    (1, 4, 6, 11, 8, 3, 1, 2, 2, 1, True, "zeros"),
    (3, 4, 6, 9, 10, 3, (2, 1), (1, 2), (2, 1), 2, True, "zeros"),
    (1, 6, 6, 9, 7, 3, 1, 1, 1, 6, True, "zeros"),
    (3, 4, 8, 12, 9, 5, 2, 2, 1, 2, False, "zeros"),
    (2, 3, 4, 5, 7, 3, 1, (4, 1), 1, 1, True, "zeros"),  # rows that read only the padding
    (1, 3, 4, 10, 9, 5, 1, "same", 1, 1, True, "zeros"),
    (2, 3, 4, 10, 9, 3, 1, "same", 2, 1, True, "reflect"),
    (2, 3, 4, 8, 9, (2, 4), 1, "same", 1, 1, True, "zeros"),
    (1, 3, 4, 9, 8, 5, 1, "valid", 1, 1, True, "zeros"),
    (3, 3, 4, 9, 8, 3, 1, 1, 1, 1, True, "reflect"),
    (1, 3, 4, 9, 8, 3, 2, (2, 1), 1, 1, True, "replicate"),
    (3, 3, 4, 9, 8, 3, 1, 1, 2, 1, False, "circular"),
    (0, 3, 4, 9, 8, 3, 1, 1, 1, 1, True, "zeros"),
    (0, 3, 4, 9, 8, 3, 2, 1, 1, 1, False, "reflect"),
]
LAYOUTS = ["contiguous", "channels_last", "sliced"]

# (encoder, encoder_layers, hidden_activation, gate_activation, map_size): every activation
# appears as a hidden and as a gate activation.
ENCODERS = [
    ("mlp", 1, "none", "relu", None),
    ("mlp", 2, "relu", "relu", None),
    ("mlp", 2, "none", "sigmoid", None),
    ("mlp", 3, "tanh", "softplus", None),
    ("mlp", 2, "sigmoid", "tanh", None),
    ("mlp", 3, "silu", "gelu", None),
    ("mlp", 2, "gelu", "silu", None),
    ("mlp", 2, "softplus", "none", None),
    ("map", None, None, "relu", (3, 4)),
    ("map", None, None, "sigmoid", (4, 5)),
    ("bilinear", None, None, "relu", (3, 2)),
]


def _make_input(shape, layout, dtype, requires_grad=True, device="cpu"):
    n, c, h, w = shape
    if layout == "sliced":
        x = torch.randn(n, c + 2, h + 3, 2 * w, dtype=dtype, device=device)[:, 1 : c + 1, 2 : h + 2, ::2]
        assert n == 0 or not x.is_contiguous()
    else:
        x = torch.randn(n, c, h, w, dtype=dtype, device=device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    return x.detach().requires_grad_(requires_grad)


def _randomise(layer: torch.nn.Module) -> None:
    """Parameters away from their initialisation (the map encoders start constant)."""
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def _twins(backend, dtype, in_ch, out_ch, kernel, stride, padding, dilation, groups, bias,
           padding_mode, encoder=("mlp", 2, "relu", "relu", None)):
    kind, layers, hidden, gate_act, map_size = encoder
    options = dict(encoder=kind, gate_activation=gate_act)
    if kind == "mlp":
        options.update(encoder_layers=layers, encoder_hidden=5, hidden_activation=hidden)
    else:
        options.update(map_size=map_size)
    fused = cg.FusedCoordGateConv2d(
        in_ch, out_ch, kernel, stride, padding, dilation, groups, bias, padding_mode,
        device=_device(backend), dtype=dtype, backend=backend, **options,
    )
    _randomise(fused)
    ref = copy.deepcopy(fused)
    ref.backend = "reference"
    return fused, ref


def _check_layer(fused, ref, x, dtype):
    out = fused(x)
    expected = ref(x)
    assert out.shape == expected.shape
    assert_close(out, expected, dtype)
    if x.shape[0] > 0 and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, [x, *fused.parameters()], grad, allow_unused=True)
    want = torch.autograd.grad(expected, [x, *ref.parameters()], grad, allow_unused=True)
    for name, g, w in zip(["input"] + [n for n, _ in fused.named_parameters()], got, want):
        if w is None:
            assert g is None or g.abs().max() == 0, name
            continue
        assert g is not None, name
        assert_close(g, w, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "-".join(map(str, g)))
def test_geometry_matches_reference(backend, layout, geometry):
    n, cin, c, h, w, kernel, stride, padding, dilation, groups, bias, padding_mode = geometry
    dtype = torch.float64
    fused, ref = _twins(backend, dtype, cin, c, kernel, stride, padding, dilation, groups, bias,
                        padding_mode)
    x = _make_input((n, cin, h, w), layout, dtype, device=_device(backend))
    _check_layer(fused, ref, x, dtype)


# (N, Cin, C, H, W, kernel, stride, padding, dilation, groups): strides that skip input rows
# (k=1, stride 3), halos shared by neighbouring row bands, dilation and groups.
BAND_GEOMETRIES = [
    (5, 3, 4, 10, 7, 3, 1, 1, 1, 1),
    (3, 3, 4, 11, 7, 1, 3, 0, 1, 1),
    (3, 4, 6, 12, 9, 3, 2, 1, 1, 2),
    (2, 3, 4, 13, 8, 3, 1, 2, 2, 1),
]


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bands", ["two_samples", "three_rows"])
@pytest.mark.parametrize("geometry", BAND_GEOMETRIES, ids=lambda g: "-".join(map(str, g)))
def test_bands_match_reference(geometry, bands, layout, recompute):
    """The ATen engine's bands: several whole samples to a band (the last one short), and
    bands of three output rows; forward and every gradient, saved and recomputed."""
    n, cin, c, h, w, kernel, stride, padding, dilation, groups = geometry
    dtype = torch.float64
    fused, ref = _twins("cpu", dtype, cin, c, kernel, stride, padding, dilation, groups, True,
                        "zeros")
    fused.recompute = recompute
    x = _make_input((n, cin, h, w), layout, dtype)
    out_h = conv_output_size(h, kernel, stride, padding, dilation)
    out_w = conv_output_size(w, kernel, stride, padding, dilation)
    row_bytes = c * out_w * x.element_size()
    with _cpu_settings("aten", 2 * out_h * row_bytes if bands == "two_samples" else 3 * row_bytes):
        _check_layer(fused, ref, x, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("encoder", ENCODERS, ids=lambda e: "-".join(map(str, e)))
def test_encoder_matches_reference(backend, encoder, layout):
    """Every encoder; channels_last on the ATen engine makes the MLP gate pixel-major (and
    reads its gradient so), by the piecewise-linear and the per-tile encoder kernels."""
    dtype = torch.float64
    kind = encoder[0]
    out_ch = 9 if kind == "bilinear" else 4
    fused, ref = _twins(backend, dtype, 3, out_ch, 3, 1, 1, 1, 1, True, "zeros", encoder)
    for size in [(9, 12), (7, 10)]:  # a multiple of the map sizes, and not
        x = _make_input((2, 3, *size), layout, dtype, device=_device(backend))
        _check_layer(fused, ref, x, dtype)


@pytest.mark.parametrize("engine", ["aten", "aten_rows", "implicit_gemm"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pixel_major_gate_gives_the_same_results(engine, layout):
    """A gate with (Ho, Wo, C) memory (what the modules cache for a channels_last input)
    gives the contiguous gate's output and gradients, bit for bit; the operator's gate
    gradient is contiguous either way."""
    ops = torch.ops.coordgate_ext
    x = _make_input((2, 4, 9, 7), layout, torch.float32, requires_grad=False)
    w, b = torch.randn(6, 4, 3, 3), torch.randn(6)
    gate = torch.rand(6, 9, 7)
    pixel_major = gate.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    assert not pixel_major.is_contiguous()
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    grad_out = _make_input((2, 6, 9, 7), layout, torch.float32, requires_grad=False)
    with _cpu_settings("aten" if engine == "aten_rows" else engine, 1 if engine == "aten_rows" else None):
        results = []
        for g in (gate, pixel_major):
            out, conv = ops.gated_conv2d(x, w, b, g, *geometry, None, None, True)
            grads = ops.gated_conv2d_backward(grad_out, x, w, b, g, conv, *geometry, None, None,
                                              [True] * 4 + [False] * 2)
            assert grads[3].is_contiguous()
            results.append((out, conv, *grads[:4]))
    for want, got in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float32_matches_reference(backend, layout):
    fused, ref = _twins(backend, torch.float32, 8, 16, 3, 1, 1, 1, 1, True, "zeros")
    x = _make_input((2, 8, 21, 17), layout, torch.float32, device=_device(backend))
    _check_layer(fused, ref, x, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    """The flash-attention rule against the float64 reference, forward and input gradient."""
    fused, ref = _twins(backend, dtype, 4, 8, 3, 1, 1, 1, 1, True, "zeros")
    exact = copy.deepcopy(ref).double()
    x = _make_input((2, 4, 13, 11), "contiguous", dtype, device=_device(backend))
    x64 = x.detach().double().requires_grad_()
    out, out_ref, out_exact = fused(x), ref(x), exact(x64)
    assert out.dtype == dtype
    assert_low_precision(out, out_ref, out_exact.detach())
    grad = torch.randn_like(out_exact)
    (g,) = torch.autograd.grad(out, x, grad.to(dtype))
    (g_ref,) = torch.autograd.grad(out_ref, x, grad.to(dtype))
    (g_exact,) = torch.autograd.grad(out_exact, x64, grad)
    assert g.dtype == dtype
    assert_low_precision(g, g_ref, g_exact)


def test_autocast_follows_context_dtype(backend):
    fused, ref = _twins(backend, torch.float32, 4, 8, 3, 1, 1, 1, 1, True, "zeros")
    device = _device(backend)
    x = torch.randn(2, 4, 11, 9, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = fused(x)
        out_ref = ref(x)
    assert out.dtype == torch.bfloat16
    assert_low_precision(out, out_ref, ref.double()(x.double()).detach())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_op(backend, layout):
    """float64 gradcheck of the functional op, every differentiable input."""
    x = _make_input((2, 4, 7, 6), layout, torch.float64, device=_device(backend))
    options = dict(dtype=torch.float64, device=_device(backend), requires_grad=True)
    w = torch.randn(6, 2, 3, 3, **options)
    b = torch.randn(6, **options)
    gate = torch.rand(6, 4, 4, **options)

    def f(x, w, b, gate):
        return cg.coordgate_conv2d(x, w, b, gate, stride=(2, 1), padding=1, dilation=(1, 2),
                                   groups=2, backend=backend)

    assert torch.autograd.gradcheck(f, (x, w, b, gate))


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("encoder", [ENCODERS[3], ENCODERS[9], ENCODERS[10]], ids=lambda e: e[0])
def test_gradcheck_layer(backend, recompute, encoder):
    """float64 gradcheck through the whole layer: input, conv and encoder parameters."""
    out_ch = 9 if encoder[0] == "bilinear" else 3
    layer, _ = _twins(backend, torch.float64, 2, out_ch, 3, 1, "same", 1, 1, True, "reflect",
                      encoder)
    layer.recompute = recompute
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = _make_input((2, 2, 6, 5), "contiguous", torch.float64, device=_device(backend))

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_recompute_matches_saved(backend):
    fused, _ = _twins(backend, torch.float64, 3, 4, 3, 1, 1, 1, 1, True, "zeros")
    recomputing = copy.deepcopy(fused)
    recomputing.recompute = True
    x = _make_input((2, 3, 9, 8), "contiguous", torch.float64, device=_device(backend))
    a, b = fused(x), recomputing(x)
    assert_close(a, b)
    grad = torch.randn_like(a)
    for g1, g2 in zip(torch.autograd.grad(a, [x, *fused.parameters()], grad),
                      torch.autograd.grad(b, [x, *recomputing.parameters()], grad)):
        assert_close(g1, g2)


def test_saved_tensors_default_and_recompute(backend):
    """Backward keeps the ungated convolution by default and only the input with recompute."""
    fused, _ = _twins(backend, torch.float32, 3, 4, 3, 1, 1, 1, 1, True, "zeros")
    x = torch.randn(2, 3, 9, 8, device=_device(backend), requires_grad=True)
    conv_shape = (2, 4, 9, 8)

    def saved_shapes(layer):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t,
                                                      lambda t: t):
            layer(x)
        return shapes

    assert conv_shape in saved_shapes(fused)
    fused.recompute = True
    assert conv_shape not in saved_shapes(fused)


@pytest.mark.parametrize("encoder", ["mlp", "map"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("recompute", [False, True])
def test_block_matches_reference(backend, encoder, layout, recompute):
    """The 1x1 mix inside the op (gated_conv2d for a map gate, mlp_gated_conv2d for an MLP):
    output and every gradient, the mix's included, default and recomputing."""
    options = dict(map_size=(3, 7)) if encoder == "map" else {}
    block = cg.FusedCoordGateBlock2d(3, 5, 2, 3, padding=1, groups=1, dtype=torch.float64,
                                     device=_device(backend), backend=backend,
                                     encoder=encoder, recompute=recompute, **options)
    _randomise(block)
    x = _make_input((2, 3, 9, 7), layout, torch.float64, device=_device(backend))
    gate = copy.deepcopy(block).gate_map(9, 7)
    ref = copy.deepcopy(block)
    ref.backend = "reference"
    expected = ref(x)
    torch.testing.assert_close(
        expected.detach(),
        reference.gated_conv2d_mix(x, block.weight, block.bias, gate, (1, 1), (1, 1), (1, 1), 1,
                                   block.mix_weight, block.mix_bias).detach())
    out = block(x)
    assert out.shape == (2, 2, 9, 7)
    assert_close(out, expected)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(out)
    for g1, g2 in zip(torch.autograd.grad(out, [x, *block.parameters()], grad),
                      torch.autograd.grad(expected, [x, *ref.parameters()], grad)):
        assert_close(g1, g2)


def test_block_gradcheck(backend):
    block = cg.FusedCoordGateBlock2d(2, 4, 3, 3, padding=1, stride=2, groups=2, dtype=torch.float64,
                                     device=_device(backend), backend=backend, encoder_hidden=4, gate_init="default")
    _randomise(block)
    x = _make_input((2, 2, 5, 6), "contiguous", torch.float64, device=_device(backend))
    params = list(block.parameters())

    def f(x, *p):
        return torch.func.functional_call(block, dict(zip([n for n, _ in block.named_parameters()], p)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(
    n=st.integers(0, 2),
    groups=st.sampled_from([1, 2]),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    size=st.tuples(st.integers(5, 12), st.integers(5, 12)),
    channels_last=st.booleans(),
    bias=st.booleans(),
)
def test_random_geometry_matches_reference(n, groups, kernel, stride, dilation, padding, size,
                                           channels_last, bias):
    """Property: any valid geometry gives the reference's output and gradients."""
    h, w = size
    assume(all((s + 2 * p - d * (k - 1) - 1) >= 0
               for s, p, d, k in zip(size, padding, dilation, kernel)))
    fused, ref = _twins("cpu", torch.float64, 2 * groups, 2 * groups, kernel, stride, padding,
                        dilation, groups, bias, "zeros")
    x = _make_input((n, 2 * groups, h, w), "channels_last" if channels_last else "contiguous",
                    torch.float64)
    _check_layer(fused, ref, x, torch.float64)


@pytest.mark.parametrize("bands", ["samples", "rows"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels", [5, 8])
def test_streaming_stores_give_the_same_outputs(channels, layout, bands):
    """The forward gate pass with non-temporal stores (taken for outputs of at least
    cpu_stream_bytes, here every output) writes exactly what the cached stores write: the
    output and the saved convolution, bit for bit, for odd channel counts and widths (runs
    with unaligned heads and tails, in either layout), whole-sample and one-row bands."""
    torch.manual_seed(0)
    x = _make_input((3, 4, 13, 11), layout, torch.float32, requires_grad=False)
    w = torch.randn(channels, 4, 3, 3)
    b = torch.randn(channels)
    gate = torch.rand(channels, 13, 11)
    args = (x, w, b, gate, [1, 1], [1, 1], [1, 1], 1, None, None)
    band_bytes = 1 if bands == "rows" else None
    for save_conv in (True, False):
        with _cpu_settings("aten", band_bytes):
            cached = torch.ops.coordgate_ext.gated_conv2d(*args, save_conv)
        with _cpu_settings("aten", band_bytes, stream_bytes=0):
            streamed = torch.ops.coordgate_ext.gated_conv2d(*args, save_conv)
        assert torch.equal(streamed[0], cached[0])
        assert torch.equal(streamed[1], cached[1])
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        assert streamed[0].is_contiguous(memory_format=fmt)
    assert_close(streamed[0], reference.gated_conv2d(x, w, b, gate, [1, 1], [1, 1], [1, 1], 1))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_outputs_from_reused_buffers(layout):
    """Outputs of at least 1 MiB come from the CPU output cache: reused buffers must give the
    reference's results step after step, and empty_cpu_cache() must release them."""
    cg.empty_cpu_cache()
    fused, ref = _twins("cpu", torch.float32, 4, 8, 3, 1, 1, 1, 1, True, "zeros")
    for step in range(3):
        x = _make_input((2, 4, 128, 128), layout, torch.float32)
        _check_layer(fused, ref, x, torch.float32)
        if step == 0:
            assert cg.cpu_cache_bytes() >= 2 * 8 * 128 * 128 * 4, "freed outputs are kept for reuse"
    cg.empty_cpu_cache()
    assert cg.cpu_cache_bytes() == 0


# Run in a fresh process: the cache reads COORDGATE_CPU_CACHE_MB once, at its first use.
_CACHE_EVICTION_SCRIPT = """
import torch, coordgate_ext as cg
gate = lambda c: torch.rand(c, 256, 256)
def eval_out(c):
    # NCHW, one sample per band: the output (c * 256 KiB) is the call's only cached buffer.
    x = torch.randn(1, 2, 256, 256)
    w = torch.randn(c, 2, 1, 1)
    out, _ = torch.ops.coordgate_ext.gated_conv2d(x, w, None, gate(c), [1, 1], [0, 0], [1, 1], 1,
                                                   None, None, False)
    return out.numel() * 4
old = eval_out(8)      # 2 MiB freed into the cache
assert cg.cpu_cache_bytes() == old, cg.cpu_cache_bytes()
new = eval_out(10)     # 2.5 MiB: both do not fit under 3 MiB
print(cg.cpu_cache_bytes(), new)
"""


def test_output_cache_keeps_the_newest_buffers():
    """When a freed buffer would take the cache over its limit, the buffers freed longest ago
    make room: a process that moves on to new shapes must not keep only stale sizes."""
    env = dict(os.environ, COORDGATE_CPU_CACHE_MB="3")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _CACHE_EVICTION_SCRIPT], env=env, cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    cached, newest = map(int, result.stdout.split()[-2:])
    assert cached == newest == 10 * 256 * 256 * 4
