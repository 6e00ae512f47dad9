"""torch.func through the layers and the coordgate_ext_triton operators on the Triton backend
(through the interpreter on CPU tensors; float32, tiny shapes): torch.func.grad with
functional_call against ordinary autograd, vmap over inputs and over parameters against a
loop, per-sample gradients, the vmap rule of every operator, and the errors of forward-mode
AD and double backward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, grad, jvp, vmap
from torch.utils import _pytree as pytree

import coordgate_ext as cg
from coordgate_ext.ops import triton_ops
from coordgate_ext.ops.gated_conv2d import output_memory_format
from tests.support import CountCalls, loss_of, params_of, randomize, sample

ops = torch.ops.coordgate_ext_triton
TOL = dict(rtol=1e-4, atol=1e-4)
BATCH = 2
#: name: (constructor, shape of one call's input)
LAYERS = {
    # N * Cin * kh * kw = 54: the MLP gate is evaluated in the kernel (triton.gated_conv2d.gate_mode).
    "conv2d-mlp-kernel-gate": (lambda d: cg.FusedCoordGateConv2d(3, 4, 3, padding=1, encoder_hidden=5,
                                                                 backend="triton", device=d), (2, 3, 5, 6)),
    "conv2d-map-strided": (lambda d: cg.FusedCoordGateConv2d(3, 4, (3, 2), stride=(2, 1), encoder="map",
                                                            map_size=(3, 3), backend="triton", device=d),
                           (2, 3, 7, 6)),
    "block2d": (lambda d: cg.FusedCoordGateBlock2d(3, 4, 2, 3, padding=1, encoder_hidden=5, backend="triton",
                                                   device=d), (2, 3, 5, 6)),
    "conv1d": (lambda d: cg.FusedCoordGateConv1d(3, 4, 3, padding=1, encoder_hidden=5, backend="triton", device=d),
               (2, 3, 9)),
}


def _layer(name, device):
    """The layer with random parameters, and its input shape."""
    make, shape = LAYERS[name]
    return randomize(make(device)), shape


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, **TOL)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", LAYERS)
def test_grad_of_functional_call_matches_autograd(name, train, tdevice):
    layer, shape = _layer(name, tdevice)
    layer.train(train)
    x = torch.randn(shape, device=tdevice)
    cotangent = torch.randn_like(layer(x))
    grads, grad_x = grad(loss_of(layer), argnums=(0, 1))(params_of(layer), x, cotangent)
    x_ = x.clone().requires_grad_()
    (layer(x_) * cotangent).sum().backward()
    _close(grad_x, x_.grad)
    for k, p in layer.named_parameters():
        _close(grads[k], p.grad)


@pytest.mark.parametrize("mode,layout,in_dim", [("train", "contiguous", 0), ("inference", "channels_last", 1)],
                         ids=["train-contiguous-0", "inference-channels_last-1"])
@pytest.mark.parametrize("name", LAYERS)
def test_vmap_over_inputs_matches_loop(name, mode, layout, in_dim, tdevice):
    layer, shape = _layer(name, tdevice)
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is a layout of 4-D inputs")
    layer.train(mode == "train")
    xs = torch.randn(BATCH, *shape, device=tdevice)
    if layout == "channels_last":
        xs = xs.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    with torch.set_grad_enabled(mode == "train"):
        out = vmap(layer, in_dims=in_dim)(xs.movedim(0, in_dim))
        expected = [layer(x) for x in xs]
    _close(out, torch.stack(expected))
    for got, want in zip(out, expected):
        if want.dim() == 4:
            assert output_memory_format(got) == output_memory_format(want)


@pytest.mark.parametrize("name", LAYERS)
def test_backward_through_vmap_matches_loop(name, tdevice):
    layer, shape = _layer(name, tdevice)
    looped = copy.deepcopy(layer)
    xs = torch.randn(BATCH, *shape, device=tdevice, requires_grad=True)
    cotangents = torch.randn_like(torch.stack([looped(x) for x in xs.detach()]))
    (vmap(layer)(xs) * cotangents).sum().backward()
    xs_ = xs.detach().clone().requires_grad_()
    sum((looped(x) * c).sum() for x, c in zip(xs_, cotangents)).backward()
    _close(xs.grad, xs_.grad)
    for p, q in zip(layer.parameters(), looped.parameters()):
        _close(p.grad, q.grad)


@pytest.mark.parametrize("name", LAYERS)
def test_per_sample_grads_match_loop(name, tdevice):
    layer, shape = _layer(name, tdevice)
    xs = torch.randn(BATCH, *shape, device=tdevice)
    cotangents = torch.randn_like(vmap(layer)(xs))
    grads = vmap(grad(loss_of(layer)), in_dims=(None, 0, 0))(params_of(layer), xs, cotangents)
    for b in range(BATCH):
        layer.zero_grad()
        (layer(xs[b]) * cotangents[b]).sum().backward()
        for k, p in layer.named_parameters():
            _close(grads[k][b], p.grad)


@pytest.mark.parametrize("name", LAYERS)
def test_vmap_over_parameters_matches_loop(name, tdevice):
    layer, shape = _layer(name, tdevice)
    x = torch.randn(shape, device=tdevice)
    members = [params_of(layer), {k: v + 0.1 * torch.randn_like(v) for k, v in params_of(layer).items()}]
    stacked = {k: torch.stack([m[k] for m in members]) for k in members[0]}
    out = vmap(lambda p: functional_call(layer, p, (x,)))(stacked)
    _close(out, torch.stack([functional_call(layer, m, (x,)) for m in members]))


FORWARD_MODE = r"coordgate_ext_triton::\w+: forward-mode AD .* is not supported"


@pytest.mark.parametrize("name", LAYERS)
def test_forward_mode_ad_raises(name, tdevice):
    layer, shape = _layer(name, tdevice)
    x = torch.randn(shape, device=tdevice)
    params = params_of(layer)
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    with pytest.raises(NotImplementedError, match=FORWARD_MODE):
        jvp(lambda p: functional_call(layer, p, (x,)), (params,), (tangents,))
    with pytest.raises(NotImplementedError, match=FORWARD_MODE):
        jvp(grad(lambda p: functional_call(layer, p, (x,)).square().sum()), (params,), (tangents,))


@pytest.mark.parametrize("name", LAYERS)
def test_double_backward_raises(name, tdevice):
    layer, shape = _layer(name, tdevice)
    x = torch.randn(shape, device=tdevice)

    def grad_norm(params):
        grads = grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)
        return sum(g.square().sum() for g in grads.values())

    with pytest.raises(RuntimeError, match=r"double backward .* is not supported"):
        grad(grad_norm)(params_of(layer))


def test_double_backward_through_autograd_raises(tdevice):
    layer, shape = _layer("conv2d-mlp-kernel-gate", tdevice)
    x = torch.randn(shape, device=tdevice)
    grads = torch.autograd.grad(layer(x).square().sum(), list(layer.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward .* is not supported"):
        sum(g.sum() for g in grads).backward()


# --- the operators' vmap rules -----------------------------------------------------------------

GEOMETRY = ([2, 1], [1, 1], [1, 1], 2)  # (N, 4, 5, 4) -> (N, 4, 3, 4)


def _dims(args, **batched):
    """in_dims for ``args``: None but where ``batched`` names an argument position (a0=...)."""
    return tuple(batched.get(f"a{i}") for i in range(len(args)))


def _op_cases():
    """(op name, id, args, in_dims, calls of the op the rule makes: 1 folded, BATCH looped)."""
    B, cases = BATCH, []

    def add(op, label, args, calls, **batched):
        cases.append((op, label, args, _dims(args, **batched), calls))

    t = torch.randn
    x, weight, bias, gate = t(B, 1, 4, 5, 4), t(4, 2, 3, 3), t(4), torch.rand(4, 3, 4)
    x_cl = t(B, 1, 5, 4, 4).permute(0, 1, 4, 2, 3)
    enc_w, enc_b = [t(4, 2), t(4, 4)], [t(4), t(4)]
    mix_w, mix_b = t(3, 4, 1, 1), t(3)
    g, g_mix, conv, empty = t(B, 1, 4, 3, 4), t(B, 1, 3, 3, 4), t(B, 1, 4, 3, 4), torch.empty(0)
    add("gated_conv2d", "input", (x, weight, bias, gate, *GEOMETRY, True), 1, a0=0)
    add("gated_conv2d", "input-channels-last-dim1", (x_cl.movedim(0, 1), weight, None, gate, *GEOMETRY, False), 1,
        a0=1)
    add("gated_conv2d", "gate", (x[0], weight, bias, torch.rand(B, 4, 3, 4), *GEOMETRY, True), B, a3=0)
    add("gated_conv2d_backward", "grad-input-fold", (g, x, weight, bias, gate, conv, *GEOMETRY, [True] + [False] * 3),
        1, a0=0, a1=0, a5=0)
    add("gated_conv2d_backward", "all-grads-recompute-loop", (g, x, weight, bias, gate, empty, *GEOMETRY, [True] * 4),
        B, a0=0, a1=0)
    add("gated_conv2d_fused", "input-kernel-gate",
        (x, weight, bias, None, enc_w, enc_b, "tanh", "sigmoid", None, None, *GEOMETRY, True), 1, a0=0)
    add("gated_conv2d_fused", "encoder-loop",
        (x[0], weight, bias, None, [t(B, 4, 2), enc_w[1]], enc_b, "relu", "relu", None, None, *GEOMETRY, False), B,
        a4=[0, None])
    add("gated_conv2d_fused", "input-mix", (x, weight, bias, gate, [], [], "none", "none", mix_w, mix_b, *GEOMETRY,
                                            False), 1, a0=0)
    add("gated_conv2d_fused_backward", "grad-input-fold",
        (g_mix, x, weight, bias, gate, conv, mix_w, *GEOMETRY, [True] + [False] * 5), 1, a0=0, a1=0, a5=0)
    add("gated_conv2d_fused_backward", "all-grads-loop",
        (g_mix, x, weight, bias, gate, empty, mix_w, *GEOMETRY, [True] * 6), B, a0=0, a1=0)
    return cases


OP_CASES = _op_cases()


@pytest.mark.parametrize("op_name,args,in_dims,calls", [c[0:1] + c[2:] for c in OP_CASES],
                         ids=[f"{c[0]}-{c[1]}" for c in OP_CASES])
def test_op_vmap_matches_loop(op_name, args, in_dims, calls):
    op = getattr(ops, op_name).default
    with CountCalls() as counter:
        got = vmap(op, in_dims=in_dims)(*args)
    assert counter.calls[op] == calls
    loop = [pytree.tree_leaves(op(*(sample(a, d, i) for a, d in zip(args, in_dims)))) for i in range(BATCH)]
    for k, leaf in enumerate(pytree.tree_leaves(got)):
        want = [leaves[k] for leaves in loop]
        if want[0].numel() == 0:
            assert leaf.numel() == 0
        else:
            _close(leaf, torch.stack(want))


def test_every_op_has_a_vmap_rule_and_a_case():
    for name in triton_ops.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{triton_ops.NAMESPACE}::{name}", "FuncTorchBatched")
    covered = {c[0] for c in OP_CASES}
    assert set(triton_ops.OPS) <= covered, f"operators without a vmap case: {sorted(set(triton_ops.OPS) - covered)}"
