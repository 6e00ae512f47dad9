"""torch.func through the layers and the operators, on the "reference" and "cpu" backends:
torch.func.grad with functional_call against ordinary autograd, vmap over inputs and over
parameters against a loop, per-sample gradients (vmap of grad), jacrev, the vmap rule of
every operator, and the errors of forward-mode AD and double backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch.func import functional_call, grad, jacrev, jvp, vmap

import coordgate_ext as cg
from coordgate_ext.ops import _library
from coordgate_ext.ops.gated_conv2d import output_memory_format
from tests.support import CountCalls, loss_of, params_of, randomize, sample

ops = torch.ops.coordgate_ext
DTYPE = torch.float64
needs_cpp = pytest.mark.skipif(not _library.loaded(), reason="coordgate_ext._C is not built")
BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpp)]
#: name: (constructor, shape of one call's input)
LAYERS = {
    "conv2d-mlp": (lambda b: cg.FusedCoordGateConv2d(3, 4, 3, padding=1, encoder_hidden=5, backend=b, dtype=DTYPE),
                   (2, 3, 5, 7)),
    "conv2d-map-strided": (lambda b: cg.FusedCoordGateConv2d(3, 4, (3, 2), stride=(2, 1), encoder="map",
                                                            map_size=(3, 3), backend=b, dtype=DTYPE),
                           (2, 3, 7, 6)),
    "conv2d-groups-dilated-reflect": (
        lambda b: cg.FusedCoordGateConv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False,
                                          padding_mode="reflect", encoder_hidden=5, hidden_activation="tanh",
                                          gate_activation="sigmoid", backend=b, dtype=DTYPE),
        (2, 4, 6, 5)),
    "block2d": (lambda b: cg.FusedCoordGateBlock2d(3, 4, 2, 3, padding=1, encoder_hidden=5, backend=b, dtype=DTYPE),
                (2, 3, 5, 7)),
    "conv1d": (lambda b: cg.FusedCoordGateConv1d(3, 4, 3, padding=1, encoder_hidden=5, backend=b, dtype=DTYPE),
               (2, 3, 9)),
    "coordgate": (lambda b: cg.CoordGate(3, 4, backend=b, dtype=DTYPE), (2, 3, 5, 7)),
}
BATCH = 3


def _layer(name, backend):
    """The layer with random parameters, and its input shape."""
    make, shape = LAYERS[name]
    return randomize(make(backend)), shape


def assert_close(actual, expected):
    """torch.testing's default tolerances for the dtype compared (float64 here)."""
    torch.testing.assert_close(actual, expected)


def _inputs(shape, batch=BATCH, layout="contiguous"):
    """(batch, *shape): per call, channels_last when asked (4-D calls only)."""
    if layout == "channels_last":
        n, c, h, w = shape
        return torch.randn(batch, n, h, w, c, dtype=DTYPE).permute(0, 1, 4, 2, 3)
    return torch.randn(batch, *shape, dtype=DTYPE)


def _layout(t):
    return output_memory_format(t) if t.dim() == 4 else torch.contiguous_format


# --- the layers ------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_grad_of_functional_call_matches_autograd(name, backend, train):
    layer, shape = _layer(name, backend)
    layer.train(train)
    x = torch.randn(shape, dtype=DTYPE)
    cotangent = torch.randn_like(layer(x))
    grads, grad_x = grad(loss_of(layer), argnums=(0, 1))(params_of(layer), x, cotangent)
    x_ = x.clone().requires_grad_()
    (layer(x_) * cotangent).sum().backward()
    assert_close(grad_x, x_.grad)
    for k, p in layer.named_parameters():
        assert_close(grads[k], p.grad)


#: (mode, the calls' layout, vmap's in_dim, samples per call)
VMAP_CASES = [
    ("train", "contiguous", 0, 2),
    ("train", "channels_last", 0, 2),
    ("inference", "channels_last", 1, 2),
    ("inference", "contiguous", 0, 0),
]


@pytest.mark.parametrize("mode,layout,in_dim,samples", VMAP_CASES,
                         ids=["-".join(map(str, c)) for c in VMAP_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_vmap_over_inputs_matches_loop(name, backend, mode, layout, in_dim, samples):
    layer, shape = _layer(name, backend)
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is a layout of 4-D inputs")
    layer.train(mode == "train")
    xs = _inputs((samples, *shape[1:]), layout=layout)
    with torch.set_grad_enabled(mode == "train"):
        out = vmap(layer, in_dims=in_dim)(xs.movedim(0, in_dim))
        expected = [layer(x) for x in xs]
    assert_close(out, torch.stack(expected))
    for got, want in zip(out, expected):
        assert _layout(got) == _layout(want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_backward_through_vmap_matches_loop(name, backend):
    layer, shape = _layer(name, backend)
    looped = copy.deepcopy(layer)
    xs = _inputs(shape).requires_grad_()
    cotangents = torch.randn_like(torch.stack([looped(x) for x in xs.detach()]))
    (vmap(layer)(xs) * cotangents).sum().backward()
    xs_ = xs.detach().clone().requires_grad_()
    sum((looped(x) * c).sum() for x, c in zip(xs_, cotangents)).backward()
    assert_close(xs.grad, xs_.grad)
    for p, q in zip(layer.parameters(), looped.parameters()):
        assert_close(p.grad, q.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_per_sample_grads_match_loop(name, backend):
    """vmap(grad): one gradient per call (each a batch of shape[0] samples)."""
    layer, shape = _layer(name, backend)
    xs = _inputs(shape)
    cotangents = torch.randn_like(vmap(layer)(xs))
    grads = vmap(grad(loss_of(layer)), in_dims=(None, 0, 0))(params_of(layer), xs, cotangents)
    for b in range(BATCH):
        layer.zero_grad()
        (layer(xs[b]) * cotangents[b]).sum().backward()
        for k, p in layer.named_parameters():
            assert_close(grads[k][b], p.grad)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_vmap_over_parameters_matches_loop(name, backend, train):
    """An ensemble: the op's weights, gate or encoder batched (the vmap rules' loop)."""
    layer, shape = _layer(name, backend)
    layer.train(train)
    x = torch.randn(shape, dtype=DTYPE)
    members = [params_of(layer), {k: v + 0.1 * torch.randn_like(v) for k, v in params_of(layer).items()}]
    stacked = {k: torch.stack([m[k] for m in members]) for k in members[0]}
    out = vmap(lambda p: functional_call(layer, p, (x,)))(stacked)
    assert_close(out, torch.stack([functional_call(layer, m, (x,)) for m in members]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["conv2d-mlp", "block2d", "conv1d", "coordgate"])
def test_jacrev_matches_autograd_jacobian(name, backend):
    """vmap over the backward ops' grad_out with the input unbatched (the fold expands it), and
    over grad_out with weight gradients asked for (the loop)."""
    layer, shape = _layer(name, backend)
    x = torch.randn((1, *shape[1:]), dtype=DTYPE)
    params = params_of(layer)
    names = list(params)

    def by_params(*values):
        return functional_call(layer, dict(zip(names, values)), (x,))

    assert_close(jacrev(layer)(x), torch.autograd.functional.jacobian(layer, x))
    got = jacrev(by_params, argnums=tuple(range(len(names))))(*params.values())
    want = torch.autograd.functional.jacobian(by_params, tuple(params.values()))
    for g, w in zip(got, want):
        assert_close(g, w)


FORWARD_MODE = r"coordgate_ext::\w+: forward-mode AD .* is not supported"


@needs_cpp
@pytest.mark.parametrize("name", LAYERS)
def test_forward_mode_ad_raises(name):
    """The C++ ops have no forward-mode formula: torch.func.jvp says so, also over a grad
    transform (forward over reverse)."""
    layer, shape = _layer(name, "cpu")
    x = torch.randn(shape, dtype=DTYPE)
    params = params_of(layer)
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    with pytest.raises(NotImplementedError, match=FORWARD_MODE):
        jvp(lambda p: functional_call(layer, p, (x,)), (params,), (tangents,))
    with pytest.raises(NotImplementedError, match=FORWARD_MODE):
        jvp(grad(lambda p: functional_call(layer, p, (x,)).square().sum()), (params,), (tangents,))


@needs_cpp
def test_forward_ad_of_the_input_raises():
    layer, shape = _layer("conv2d-map-strided", "cpu")
    layer.requires_grad_(False)
    x = torch.randn(shape, dtype=DTYPE)
    with pytest.raises(NotImplementedError, match=FORWARD_MODE):
        jvp(layer, (x,), (torch.randn_like(x),))
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match=FORWARD_MODE):
        layer(forward_ad.make_dual(x, torch.randn_like(x)))


@needs_cpp
@pytest.mark.parametrize("name", LAYERS)
def test_double_backward_raises(name):
    """Through autograd (create_graph=True) and through torch.func (grad of grad)."""
    layer, shape = _layer(name, "cpu")
    x = torch.randn(shape, dtype=DTYPE)
    grads = torch.autograd.grad(layer(x).square().sum(), list(layer.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward .* is not supported"):
        sum(g.sum() for g in grads).backward()

    def grad_norm(params):
        grads = grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)
        return sum(g.square().sum() for g in grads.values())

    with pytest.raises(RuntimeError, match=r"double backward .* is not supported"):
        grad(grad_norm)(params_of(layer))


# --- the operators' vmap rules -----------------------------------------------------------------

def _t(*shape, fmt=torch.contiguous_format):
    return torch.randn(*shape, dtype=DTYPE).contiguous(memory_format=fmt)


def _mlp(widths, batch=None):
    lead = () if batch is None else (batch,)
    return ([_t(*lead, o, i) for i, o in zip(widths[:-1], widths[1:])], [_t(*lead, o) for o in widths[1:]])


#: stride, padding, dilation, groups of the convolution cases: (N, 4, 9, 7) -> (N, 6, 5, 7)
GEOMETRY = ([2, 1], [1, 2], [1, 2], 2)
GRAD = [True] + [False] * 5
ALL = [True] * 4 + [False] * 2
ALL_MIX = [True] * 6


def _dims(args, **batched):
    """in_dims for ``args``: None but where ``batched`` names an argument position (a0=...)."""
    return tuple(batched.get(f"a{i}") for i in range(len(args)))


def _op_cases():
    """(op name, id, args, in_dims, calls of the op the rule makes: 1 folded, BATCH looped)."""
    B, cases = BATCH, []
    w, b = _mlp((2, 5, 6))
    wb, bb = _mlp((2, 5, 6), batch=B)

    def add(op, label, args, calls, **batched):
        cases.append((op, label, args, _dims(args, **batched), calls))

    add("mlp_gate", "weights", (wb, bb, 5, 7, "tanh", "relu"), B, a0=0, a1=0)
    add("mlp_gate_backward", "grad", (_t(B, 6, 5, 7), w, b, 5, 7, "silu", "sigmoid"), B, a0=0)
    add("mlp_gate_backward", "weights-dim1", (_t(6, 5, 7), [t.movedim(0, 1) for t in wb], bb, 5, 7, "relu", "relu"),
        B, a1=1, a2=0)
    x = _t(B, 2, 4, 9, 7)
    x_cl = _t(B, 2, 9, 7, 4).permute(0, 1, 4, 2, 3)
    weight, bias, gate = _t(6, 2, 3, 3), _t(6), _t(6, 5, 7)
    mix_w, mix_b = _t(3, 6, 1, 1), _t(3)
    add("gated_conv2d", "input", (x, weight, bias, gate, *GEOMETRY, None, None, True), 1, a0=0)
    add("gated_conv2d", "input-channels-last", (x_cl, weight, None, gate, *GEOMETRY, None, None, False), 1, a0=0)
    add("gated_conv2d", "input-dim2", (x.movedim(0, 2), weight, bias, gate, *GEOMETRY, None, None, True), 1, a0=2)
    add("gated_conv2d", "input-mix", (x, weight, bias, gate, *GEOMETRY, mix_w, mix_b, False), 1, a0=0)
    add("gated_conv2d", "gate", (x[0], weight, bias, _t(B, 6, 5, 7), *GEOMETRY, None, None, True), B, a3=0)
    add("gated_conv2d", "input-weight", (x, _t(B, 6, 2, 3, 3), bias, gate, *GEOMETRY, mix_w, None, True), B,
        a0=0, a1=0)
    g, g_mix, conv = _t(B, 2, 6, 5, 7), _t(B, 2, 3, 5, 7), _t(B, 2, 6, 5, 7)
    empty = conv.new_empty((0,))
    add("gated_conv2d_backward", "grad-input-fold", (g, x, weight, bias, gate, conv, *GEOMETRY, None, None, GRAD), 1,
        a0=0, a1=0, a5=0)
    add("gated_conv2d_backward", "grad-only-recompute-fold",
        (g, x[0], weight, bias, gate, empty, *GEOMETRY, None, None, GRAD), 1, a0=0)
    add("gated_conv2d_backward", "all-grads-loop", (g, x, weight, bias, gate, conv, *GEOMETRY, None, None, ALL), B,
        a0=0, a1=0, a5=0)
    add("gated_conv2d_backward", "mix-all-grads-loop",
        (g_mix, x, weight, bias, gate, conv, *GEOMETRY, mix_w, mix_b, ALL_MIX), B, a0=0, a1=0, a5=0)
    add("mlp_gated_conv2d", "input", (x, weight, bias, w, b, "tanh", "relu", *GEOMETRY, None, None, True), 1, a0=0)
    add("mlp_gated_conv2d", "encoder", (x[0], weight, bias, wb, bb, "relu", "sigmoid", *GEOMETRY, mix_w, mix_b, True),
        B, a3=0, a4=0)
    add("mlp_gated_conv2d_backward", "grad-input-fold",
        (g, x, weight, bias, w, b, "silu", "relu", conv, *GEOMETRY, None, None, GRAD), 1, a0=0, a1=0, a8=0)
    add("mlp_gated_conv2d_backward", "mix-all-grads-loop",
        (g_mix, x, weight, bias, w, b, "tanh", "none", empty, *GEOMETRY, mix_w, mix_b, ALL_MIX), B, a0=0, a1=0)
    return cases


OP_CASES = _op_cases()


def _check_op_vmap(op, args, in_dims, calls):
    with CountCalls() as counter:
        got = vmap(op, in_dims=in_dims)(*args)
    assert counter.calls[op] == calls
    loop = [op(*(sample(a, d, i) for a, d in zip(args, in_dims))) for i in range(BATCH)]
    got_leaves = torch.utils._pytree.tree_leaves(got)
    for k, leaf in enumerate(got_leaves):
        want = [torch.utils._pytree.tree_leaves(out)[k] for out in loop]
        if want[0].numel() == 0:
            assert leaf.numel() == 0
        else:
            assert_close(leaf, torch.stack(want))


@needs_cpp
@pytest.mark.parametrize("op_name,args,in_dims,calls", [c[0:1] + c[2:] for c in OP_CASES],
                         ids=[f"{c[0]}-{c[1]}" for c in OP_CASES])
def test_op_vmap_matches_loop(op_name, args, in_dims, calls):
    _check_op_vmap(getattr(ops, op_name).default, args, in_dims, calls)


@needs_cpp
def test_every_op_has_a_vmap_rule_and_a_case():
    for name in _library.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"coordgate_ext::{name}", "FuncTorchBatched"), name
    covered = {c[0] for c in OP_CASES}
    assert set(_library.OPS) <= covered, f"operators without a vmap case: {sorted(set(_library.OPS) - covered)}"


def _old_output_memory_format(t):
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def test_output_memory_format_reads_strides_as_is_contiguous_does():
    base = torch.randn(2, 3, 5, 4)
    tensors = [
        base, base.contiguous(memory_format=torch.channels_last), base[:, :, ::2], base.transpose(2, 3),
        base[:, :1].contiguous(memory_format=torch.channels_last), torch.randn(2, 1, 1, 4),
        torch.randn(1, 3, 1, 1).contiguous(memory_format=torch.channels_last), torch.randn(0, 3, 5, 4),
        torch.randn(2, 5, 4, 3).permute(0, 3, 1, 2)[..., :2], base.permute(0, 2, 3, 1), torch.randn(3, 5, 4),
    ]
    for t in tensors:
        assert output_memory_format(t) == _old_output_memory_format(t), (t.shape, t.stride())
    # Under vmap: the layout of one sample.
    xs = torch.randn(3, 2, 5, 4, 3).permute(0, 1, 4, 2, 3)
    seen = []
    vmap(lambda x: seen.append(output_memory_format(x)) or x)(xs)
    assert seen == [torch.channels_last]
