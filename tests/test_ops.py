"""torch.library.opcheck of every operator of the coordgate_ext namespace, a meta-test that
none is left without a case, and torch.compile(fullgraph=True) of the layers."""

from __future__ import annotations

import copy

import pytest
import torch

import coordgate_ext as cg
from tests.support import assert_close

ops = torch.ops.coordgate_ext


def _t(*shape, dtype=torch.float64, grad=True, fmt=torch.contiguous_format):
    return torch.randn(*shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(grad)


def _mlp(widths, dtype=torch.float64):
    weights = [_t(o, i, dtype=dtype) for i, o in zip(widths[:-1], widths[1:])]
    biases = [_t(o, dtype=dtype) for o in widths[1:]]
    return weights, biases


def _opcheck_cases():
    """(op name, id, args) for every case."""
    cases = []
    w, b = _mlp((2, 6, 4))
    cases.append(("mlp_gate", "two-layers", (w, b, 5, 7, "relu", "sigmoid")))
    w1, b1 = _mlp((2, 3), torch.float32)
    cases.append(("mlp_gate", "one-layer-f32", (w1, b1, 4, 3, "none", "relu")))
    w3, b3 = _mlp((2, 5, 5, 3))
    cases.append(("mlp_gate", "three-layers", (w3, b3, 3, 9, "tanh", "softplus")))
    cases.append(("mlp_gate_backward", "two-layers",
                  (_t(4, 5, 7, grad=False), [t.detach() for t in w], [t.detach() for t in b], 5, 7,
                   "gelu", "silu")))

    def conv_args(fmt, bias, save, dtype=torch.float64, mix=False):
        x = _t(2, 4, 9, 7, dtype=dtype, fmt=fmt)
        weight = _t(6, 2, 3, 3, dtype=dtype)
        gate = torch.rand(6, 5, 7, dtype=dtype, requires_grad=True)
        mix_args = (_t(3, 6, 1, 1, dtype=dtype), _t(3, dtype=dtype)) if mix else (None, None)
        return (x, weight, _t(6, dtype=dtype) if bias else None, gate, [2, 1], [1, 2], [1, 2], 2, *mix_args,
                save)

    def mask_id(mask):
        return "".join("1" if m else "0" for m in mask)

    cases.append(("gated_conv2d", "save", conv_args(torch.contiguous_format, True, True)))
    cases.append(("gated_conv2d", "no-save-no-bias", conv_args(torch.contiguous_format, False, False)))
    cases.append(("gated_conv2d", "channels-last", conv_args(torch.channels_last, True, True)))
    cases.append(("gated_conv2d", "float32", conv_args(torch.contiguous_format, True, True, torch.float32)))
    cases.append(("gated_conv2d", "mix-save", conv_args(torch.contiguous_format, True, True, mix=True)))
    cases.append(("gated_conv2d", "mix-channels-last", conv_args(torch.channels_last, False, False, mix=True)))
    # float32 channels_last (the ATen engine) with a pixel-major gate, which it reads in place.
    x32, w32, b32, gate32, *geometry32, _, _, _ = conv_args(torch.channels_last, True, True, torch.float32)
    pixel_major = gate32.detach().permute(1, 2, 0).contiguous().permute(2, 0, 1).requires_grad_()
    cases.append(("gated_conv2d", "channels-last-pixel-major-gate-f32",
                  (x32, w32, b32, pixel_major, *geometry32, None, None, True)))
    conv32 = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    grad32 = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    cases.append(("gated_conv2d_backward", "channels-last-pixel-major-gate-f32",
                  (grad32, x32.detach(), w32.detach(), b32.detach(), pixel_major.detach(), conv32, *geometry32,
                   None, None, [True] * 4 + [False] * 2)))
    relu_w, relu_b = _mlp((2, 5, 6), torch.float32)
    cases.append(("mlp_gated_conv2d", "cl-f32-relu",
                  (x32, w32, b32, relu_w, relu_b, "relu", "relu", *geometry32, None, None, True)))
    cases.append(("mlp_gated_conv2d_backward", "cl-f32-relu",
                  (grad32, x32.detach(), w32.detach(), b32.detach(), [t.detach() for t in relu_w],
                   [t.detach() for t in relu_b], "relu", "relu", conv32, *geometry32, None, None,
                   [True] * 4 + [False] * 2)))
    cases.append(("mlp_gate_backward", "relu-pixel-major-grad",
                  (_t(5, 7, 4, grad=False).permute(2, 0, 1), [t.detach() for t in w], [t.detach() for t in b],
                   5, 7, "relu", "relu")))
    masks = ([True] * 4 + [False] * 2, [False, True, False, True, False, False], [True] + [False] * 5)
    mix_masks = ([True] * 6, [False, False, False, False, True, True], [True, False, False, True, True, False])
    conv = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    for mix, mask_list in ((False, masks), (True, mix_masks)):
        x, weight, bias, gate, *geometry, mix_w, mix_b, _ = conv_args(torch.contiguous_format, True, True, mix=mix)
        grad_out = torch.randn(2, 3 if mix else 6, 5, 7, dtype=torch.float64)
        mix_args = (mix_w.detach(), mix_b.detach()) if mix else (None, None)
        for mask in mask_list:
            for saved, label in ((conv, "saved"), (conv.new_empty((0,)), "recompute")):
                cases.append(("gated_conv2d_backward", f"{'mix-' if mix else ''}{label}-{mask_id(mask)}",
                              (grad_out, x.detach(), weight.detach(), bias.detach(), gate.detach(), saved,
                               *geometry, *mix_args, mask)))
    enc_w, enc_b = _mlp((2, 5, 6))
    for fmt, bias, save, mix in ((torch.contiguous_format, True, True, False),
                                 (torch.channels_last, False, False, False),
                                 (torch.contiguous_format, True, True, True)):
        x, weight, b, _, *geometry, mix_w, mix_b, _ = conv_args(fmt, bias, save, mix=mix)
        label = f"{'cl' if fmt == torch.channels_last else 'nchw'}-{'save' if save else 'nosave'}{'-mix' if mix else ''}"
        cases.append(("mlp_gated_conv2d", label,
                      (x, weight, b, enc_w, enc_b, "tanh", "relu", *geometry, mix_w, mix_b, save)))
    detached = ([t.detach() for t in enc_w], [t.detach() for t in enc_b])
    for mix, mask_list in ((False, masks), (True, mix_masks)):
        x, weight, b, _, *geometry, mix_w, mix_b, _ = conv_args(torch.contiguous_format, True, True, mix=mix)
        mix_args = (mix_w.detach(), mix_b.detach()) if mix else (None, None)
        for mask in mask_list:
            cases.append(("mlp_gated_conv2d_backward", f"{'mix-' if mix else ''}{mask_id(mask)}",
                          (torch.randn(2, 3 if mix else 6, 5, 7, dtype=torch.float64), x.detach(), weight.detach(),
                           b.detach(), *detached, "silu", "sigmoid", conv, *geometry, *mix_args, mask)))
    return cases


CASES = _opcheck_cases()


@pytest.mark.parametrize("op_name,args", [(c[0], c[2]) for c in CASES],
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_opcheck(op_name, args, device):
    """On the CPU kernels, and on the CUDA kernels where a GPU is present."""
    torch.library.opcheck(getattr(ops, op_name).default, _to_device(args, device))


def _to_device(args, device):
    if isinstance(args, torch.Tensor):
        return args.detach().to(device).requires_grad_(args.requires_grad)
    if isinstance(args, (list, tuple)):
        return type(args)(_to_device(a, device) for a in args)
    return args


def test_every_op_has_an_opcheck_case():
    registered = {
        name.split("::", 1)[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("coordgate_ext::")
    }
    assert registered, "no coordgate_ext operators are registered"
    assert registered == set(cg.ops._library.OPS)
    covered = {c[0] for c in CASES}
    assert registered <= covered, f"operators without an opcheck case: {sorted(registered - covered)}"


def _compiled_matches_eager(module, x):
    eager = copy.deepcopy(module)
    compiled = torch.compile(module, fullgraph=True)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    out, want = compiled(x1), eager(x2)
    assert_close(out, want)
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    assert_close(x1.grad, x2.grad)
    for p, q in zip(module.parameters(), eager.parameters()):
        assert_close(p.grad, q.grad)


def test_compile_layer_fullgraph(device):
    torch._dynamo.reset()
    layer = cg.FusedCoordGateConv2d(3, 4, 3, padding="same", padding_mode="reflect", device=device,
                                    backend=device, gate_init="default")
    _compiled_matches_eager(layer, torch.randn(2, 3, 10, 9, device=device))


def test_compile_block_fullgraph(device):
    torch._dynamo.reset()
    block = cg.FusedCoordGateBlock2d(3, 5, 2, 3, stride=2, padding=1, device=device, backend=device,
                                     hidden_activation="tanh", recompute=True, gate_init="default")
    _compiled_matches_eager(block, torch.randn(2, 3, 11, 8, device=device))
