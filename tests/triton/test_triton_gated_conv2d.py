"""The Triton kernels of the gated convolution against the reference, forward and every
gradient, on CPU tensors through the Triton interpreter (and on CUDA tensors when a GPU is
present): geometry, gate modes, the fused mix, layouts, dtypes, and every tile configuration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import coordgate_ext as cg
from coordgate_ext import reference
from coordgate_ext.functional import MLPGate
from coordgate_ext.ops import dispatch, triton_ops
from coordgate_ext.triton import configs
from coordgate_ext.triton import gated_conv2d as launch

TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}
LOW_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_low_precision(actual, same_precision_ref, exact):
    """tests/conftest.py's rule: error against float64 at most twice the same-precision
    PyTorch reference's error, plus a floor."""
    err = (actual.double() - exact).abs().max().item()
    ref_err = (same_precision_ref.double() - exact).abs().max().item()
    floor = LOW_FLOOR[actual.dtype]
    assert err <= 2 * ref_err + floor, f"error {err:.3g} > 2 * reference error {ref_err:.3g} + {floor}"


def check(actual, exact, same_precision=None):
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual.double(), exact.double(), **TOL[torch.float32])
    else:
        assert_low_precision(actual, same_precision, exact.double())


#: (id, N, Cin, H, W, C, kernel, stride, padding, dilation, groups, bias, layout)
CASES = [
    ("3x3-same", 2, 3, 7, 6, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "nchw"),
    ("strided-dilated-groups-cl", 1, 4, 9, 7, 6, (3, 2), (2, 1), (1, 0), (1, 2), 2, True, "channels_last"),
    ("depthwise-1x1-nobias", 2, 4, 5, 6, 4, (1, 1), (1, 1), (0, 0), (1, 1), 4, False, "nchw"),
    ("5x5-stride3", 1, 2, 8, 5, 3, (5, 5), (3, 3), (2, 2), (1, 1), 1, True, "nchw"),
    ("batch0", 0, 3, 5, 5, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "nchw"),
    ("noncontiguous", 2, 3, 6, 7, 5, (2, 3), (1, 2), (0, 1), (2, 1), 1, True, "sliced"),
]


def _make(case, dtype, device):
    _, n, cin, h, w, c, k, s, p, d, groups, has_bias, layout = case
    x = torch.randn(n, cin, h, w if layout != "sliced" else 2 * w, dtype=torch.float64)
    if layout == "sliced":
        x = x[..., ::2]
    weight = torch.randn(c, cin // groups, *k, dtype=torch.float64) / (cin * k[0] * k[1]) ** 0.5
    bias = torch.randn(c, dtype=torch.float64) if has_bias else None
    ho = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    wo = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    gate = torch.rand(c, ho, wo, dtype=torch.float64) + 0.5
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    x_t = to(x)
    if layout == "channels_last":
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x_t = to(torch.randn(n, cin, h, 2 * w, dtype=torch.float64))[..., ::2]
        x = x_t.double().cpu()
    return (x, weight, bias, gate), (x_t, to(weight), to(bias), to(gate)), (list(s), list(p), list(d), groups)


def _grads(fn, tensors, grad_out):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wanted, grad_out) if out.numel() else [torch.zeros_like(t) for t in wanted]
    return out.detach(), grads


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_backward_float32(case, recompute, tdevice):
    exact, ours, geometry = _make(case, torch.float32, tdevice)

    def run(x, w, b, g):
        return cg.coordgate_conv2d(x, w, b, g, geometry[0], geometry[1], geometry[2], geometry[3],
                                   recompute=recompute, backend="triton")

    def ref(x, w, b, g):
        return reference.gated_conv2d(x, w, b, g, *geometry)

    out_ref = ref(*exact)
    grad_out = torch.randn_like(out_ref)
    out, grads = _grads(run, ours, grad_out.to(device=tdevice, dtype=torch.float32))
    want, want_grads = _grads(ref, exact, grad_out)
    if case[-1] == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    check(out.cpu(), want)
    for got, exp in zip(grads, want_grads):
        check(got.cpu(), exp)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=[CASES[0][0], CASES[1][0]])
def test_forward_backward_low_precision(case, dtype, tdevice):
    exact, ours, geometry = _make(case, dtype, tdevice)

    def run(x, w, b, g):
        return cg.coordgate_conv2d(x, w, b, g, *geometry, backend="triton")

    def ref(x, w, b, g):
        return reference.gated_conv2d(x, w, b, g, *geometry)

    want, want_grads = _grads(ref, exact, grad_out := torch.randn(ref(*exact).shape, dtype=torch.float64))
    low = [None if t is None else t.to(dtype) for t in exact]
    same, same_grads = _grads(ref, low, grad_out.to(dtype))
    out, grads = _grads(run, ours, grad_out.to(device=tdevice, dtype=dtype))
    assert out.dtype == dtype
    check(out.cpu(), want, same)
    for got, exp, sp in zip(grads, want_grads, same_grads):
        check(got.cpu(), exp, sp)


ENCODERS = [
    ("1-layer", (2, 4), "none", "relu"),
    ("2-layer", (2, 5, 4), "gelu", "sigmoid"),
    ("3-layer", (2, 6, 6, 4), "tanh", "softplus"),
    ("3-layer-silu", (2, 3, 3, 4), "silu", "tanh"),
]


@pytest.mark.parametrize("enc", ENCODERS, ids=[e[0] for e in ENCODERS])
def test_in_kernel_gate(enc, tdevice):
    _, widths, hidden, gate_act = enc
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64) / 5
    b = torch.randn(4, dtype=torch.float64)
    enc_w = [torch.randn(o, i, dtype=torch.float64) for i, o in zip(widths[:-1], widths[1:])]
    enc_b = [torch.randn(o, dtype=torch.float64) for o in widths[1:]]
    geometry = ([2, 1], [1, 1], [1, 1], 1)
    tensors = [x, w, b, *enc_w, *enc_b]
    L = len(enc_w)

    def run(x, w, b, *enc):
        return triton_ops.coordgate_conv2d_encoder(x, w, b, enc[:L], enc[L:], hidden, gate_act, *geometry,
                                                   gate_mode="kernel")

    def ref(x, w, b, *enc):
        out = F.conv2d(x, w, b, geometry[0], geometry[1], geometry[2], geometry[3])
        g = reference.mlp_gate(enc[:L], enc[L:], out.shape[2], out.shape[3], hidden, gate_act)
        return out * g[None]

    want, want_grads = _grads(ref, tensors, grad_out := torch.randn(ref(*tensors).shape, dtype=torch.float64))
    ours = [t.float().to(tdevice) for t in tensors]
    out, grads = _grads(run, ours, grad_out.float().to(tdevice))
    check(out.cpu(), want)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got.cpu().double(), exp, rtol=1e-4, atol=5e-5)


def test_mlp_gate_through_functional_api(tdevice):
    """An MLPGate passed to coordgate_conv2d runs the in-kernel gate on the Triton backend."""
    x = torch.randn(1, 2, 6, 5, device=tdevice)
    w = torch.randn(3, 2, 3, 3, device=tdevice)
    gate = MLPGate([torch.randn(4, 2, device=tdevice), torch.randn(3, 4, device=tdevice)],
                   [torch.randn(4, device=tdevice), torch.randn(3, device=tdevice)], "relu", "sigmoid")
    out = cg.coordgate_conv2d(x, w, None, gate, padding=1, backend="triton")
    g = reference.mlp_gate(gate.weights, gate.biases, 6, 5, "relu", "sigmoid")
    torch.testing.assert_close(out, F.conv2d(x, w, None, padding=1) * g[None], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("groups,mix_bias,layout", [(1, True, "nchw"), (2, False, "channels_last")])
def test_fused_mix(groups, mix_bias, layout, recompute, tdevice):
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    w = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64) / 4
    b = torch.randn(6, dtype=torch.float64)
    g = torch.rand(6, 3, 5, dtype=torch.float64)
    m = torch.randn(5, 6, 1, 1, dtype=torch.float64)
    mb = torch.randn(5, dtype=torch.float64) if mix_bias else None
    geometry = ([2, 1], [1, 1], [1, 1], groups)
    tensors = [x, w, b, g, m, mb]

    def run(x, w, b, g, m, mb):
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        return cg.coordgate_conv2d(x, w, b, g, *geometry, mix_weight=m, mix_bias=mb, recompute=recompute,
                                   backend="triton")

    def ref(x, w, b, g, m, mb):
        return reference.gated_conv2d_mix(x, w, b, g, *geometry, m, mb)

    want, want_grads = _grads(ref, tensors, grad_out := torch.randn(ref(*tensors).shape, dtype=torch.float64))
    ours = [None if t is None else t.float().to(tdevice) for t in tensors]
    out, grads = _grads(run, ours, grad_out.float().to(tdevice))
    check(out.cpu(), want)
    for got, exp in zip(grads, want_grads):
        check(got.cpu(), exp)


def test_wide_mix_falls_back_to_a_separate_conv(tdevice):
    cout = configs.MAX_MIX_CHANNELS + 1
    x, w = torch.randn(1, 2, 4, 4, device=tdevice), torch.randn(3, 2, 1, 1, device=tdevice)
    g, m = torch.rand(3, 4, 4, device=tdevice), torch.randn(cout, 3, 1, 1, device=tdevice)
    out = cg.coordgate_conv2d(x, w, None, g, mix_weight=m, backend="triton")
    torch.testing.assert_close(out, reference.gated_conv2d_mix(x, w, None, g, (1, 1), (0, 0), (1, 1), 1, m, None),
                               rtol=1e-4, atol=1e-5)


def _config_case(device):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 9, 8, device=device)
    w = torch.randn(6, 2, 3, 3, device=device)
    b = torch.randn(6, device=device)
    g = torch.rand(6, 9, 8, device=device)
    return x, w, b, g, ([1, 1], [1, 1], [1, 1], 2)


@pytest.mark.parametrize("cfg", configs.FWD_CONFIGS, ids=str)
def test_every_forward_config(cfg, tdevice):
    x, w, b, g, geometry = _config_case(tdevice)
    out, y = launch.forward(x, w, b, g, *geometry, True, config=cfg)
    want = F.conv2d(x, w, b, *geometry)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, want * g, rtol=1e-4, atol=1e-5)
    enc = launch.Encoder([torch.randn(5, 2, device=tdevice), torch.randn(6, 5, device=tdevice)],
                         [torch.randn(5, device=tdevice), torch.randn(6, device=tdevice)], "relu", "sigmoid")
    out, _ = launch.forward(x, w, b, enc, *geometry, False, config=cfg)
    torch.testing.assert_close(out, want * enc.gate_map(9, 8), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", configs.MIX_CONFIGS, ids=str)
def test_every_mix_config(cfg, tdevice):
    x, w, b, g, geometry = _config_case(tdevice)
    m, mb = torch.randn(3, 6, 1, 1, device=tdevice), torch.randn(3, device=tdevice)
    out, _ = launch.forward(x, w, b, g, *geometry, False, m, mb, config=cfg)
    want = reference.gated_conv2d_mix(x, w, b, g, *geometry, m, mb)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


BACKWARD_CONFIGS = [("bwd_gate", c) for c in configs.BWD_GATE_CONFIGS] + \
    [("bwd_input", c) for c in configs.BWD_INPUT_CONFIGS] + [("bwd_weight", c) for c in configs.BWD_WEIGHT_CONFIGS]


@pytest.mark.parametrize("kind,cfg", BACKWARD_CONFIGS, ids=[f"{k}-{c}" for k, c in BACKWARD_CONFIGS])
def test_every_backward_config(kind, cfg, tdevice):
    x, w, b, g, geometry = _config_case(tdevice)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, g)]
    ref = reference.gated_conv2d(*leaves, *geometry)
    grad_out = torch.randn_like(ref)
    want = torch.autograd.grad(ref, leaves, grad_out)
    got = launch.backward(grad_out, x, w, b, g, x.new_empty((0,)), *geometry, [True] * 4,
                          configs={kind: cfg}, split_k=3 if kind == "bwd_weight" else None)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_backward_is_deterministic(tdevice):
    x, w, b, g, geometry = _config_case(tdevice)
    grad_out = torch.randn(2, 6, 9, 8, device=tdevice)
    with torch.backends.cudnn.flags(deterministic=True):
        first = launch.backward(grad_out, x, w, b, g, x.new_empty((0,)), *geometry, [True] * 4, split_k=2)
        second = launch.backward(grad_out, x, w, b, g, x.new_empty((0,)), *geometry, [True] * 4, split_k=2)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_gate_mode_heuristic():
    small = launch.Encoder([torch.randn(8, 2), torch.randn(16, 8)], [torch.randn(8), torch.randn(16)], "relu", "relu")
    wide = launch.Encoder([torch.randn(128, 2), torch.randn(16, 128)], [torch.randn(128), torch.randn(16)],
                          "relu", "relu")
    assert launch.gate_mode(small, batch=8, conv_reduction=64 * 9) == "kernel"
    assert launch.gate_mode(wide, batch=8, conv_reduction=64 * 9) == "map"
    # A tiny convolution does not pay for the encoder's work per tile.
    assert launch.gate_mode(small, batch=1, conv_reduction=4) == "map"


def test_layer_runs_on_the_triton_backend(tdevice):
    layer = cg.FusedCoordGateConv2d(3, 4, 3, padding=1, backend="triton", encoder_hidden=8, gate_init="default").to(tdevice)
    ref = cg.FusedCoordGateConv2d(3, 4, 3, padding=1, backend="reference", encoder_hidden=8, gate_init="default").to(tdevice)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 6, 5, device=tdevice)
    out, want = layer(x), ref(x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    want.square().sum().backward()
    for p, q in zip(layer.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)


def test_dispatch(monkeypatch):
    assert dispatch.resolve("auto", torch.device("cpu")) == "cpu"
    assert dispatch.resolve("triton", torch.device("cpu")) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        with pytest.raises(cg.BackendUnavailableError, match=r"backend 'triton' is not available: no CUDA device.*TRITON_INTERPRET=1"):
            dispatch.resolve("triton", torch.device("cpu"))
    else:
        with pytest.raises(cg.BackendUnavailableError, match=r"backend 'triton' runs on CUDA tensors"):
            dispatch.resolve("triton", torch.device("cpu"))


def test_errors():
    x, w, g = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.rand(3, 3, 3)
    enc_w = [torch.randn(4, 2), torch.randn(3, 4)]
    enc_b = [torch.randn(4), torch.randn(3)]
    m = torch.randn(2, 3, 1, 1)
    with pytest.raises(ValueError, match=r"gate_mode='kernel' is not available with a mix"):
        triton_ops.coordgate_conv2d_encoder(x, w, None, enc_w, enc_b, "relu", "relu", [1, 1], [0, 0], [1, 1], 1,
                                            mix_weight=m, gate_mode="kernel")
    with pytest.raises(ValueError, match=r"the in-kernel gate is not combined with the fused mix"):
        launch.forward(x, w, None, launch.Encoder(enc_w, enc_b, "relu", "relu"), [1, 1], [0, 0], [1, 1], 1,
                       False, m)
    wide = [torch.randn(launch.MAX_ENCODER_WIDTH + 1, 2), torch.randn(3, launch.MAX_ENCODER_WIDTH + 1)]
    wide_b = [torch.randn(launch.MAX_ENCODER_WIDTH + 1), torch.randn(3)]
    with pytest.raises(ValueError, match=r"in-kernel gate supports encoder widths up to"):
        launch.forward(x, w, None, launch.Encoder(wide, wide_b, "relu", "relu"), [1, 1], [0, 0], [1, 1], 1, False)
    with pytest.raises(ValueError, match=r"expected a gate of shape \(3, 3, 3\), got \(3, 4, 4\)"):
        launch.forward(x, w, None, torch.rand(3, 4, 4), [1, 1], [0, 0], [1, 1], 1, False)
    with pytest.raises(ValueError, match=r"expected at least one input channel per group, got a weight of shape "
                                         r"\(3, 0, 3, 3\)"):
        launch.forward(x[:, :0], w[:, :0], None, g, [1, 1], [0, 0], [1, 1], 1, False)
    with pytest.raises(ValueError, match=r"gate_mode must be 'auto', 'kernel' or 'map'"):
        triton_ops.coordgate_conv2d_encoder(x, w, None, enc_w, enc_b, "relu", "relu", [1, 1], [0, 0], [1, 1], 1,
                                            gate_mode="both")


def test_float64_is_refused_not_computed_in_float32():
    """The Triton kernels compute in float32 at most: float64 is refused, naming the backends
    that compute it, rather than silently rounded."""
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    message = r"the Triton backend computes float32, float16 and bfloat16, got torch.float64; .*'cpu'"
    for layer in (cg.FusedCoordGateConv2d(2, 3, 3, dtype=torch.float64, backend="triton", gate_init="default"),
                  cg.FusedCoordGateBlock2d(2, 3, 2, 3, dtype=torch.float64, backend="triton", gate_init="default")):
        for train in (True, False):
            with pytest.raises(TypeError, match=message):
                layer.train(train)(x)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=message):
        torch.ops.coordgate_ext_triton.gated_conv2d(x, w, None, torch.rand(3, 3, 3, dtype=torch.float64),
                                                    [1, 1], [0, 0], [1, 1], 1, False)
    with pytest.raises(TypeError, match=message):
        torch.ops.coordgate_ext_triton.gated_conv2d_backward(
            torch.randn(1, 3, 3, 3, dtype=torch.float64), x, w, None, torch.rand(3, 3, 3, dtype=torch.float64),
            torch.empty(0, dtype=torch.float64), [1, 1], [0, 0], [1, 1], 1, [True, True, False, True])
