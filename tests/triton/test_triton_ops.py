"""torch.library.opcheck of every coordgate_ext_triton operator (through the interpreter on
CPU tensors), the meta-test that none is left without a case, and torch.compile(fullgraph)."""

from __future__ import annotations

import pytest
import torch

import coordgate_ext as cg
from coordgate_ext import reference
from coordgate_ext.ops import triton_ops

ops = torch.ops.coordgate_ext_triton


def _t(*shape, grad=True, fmt=torch.contiguous_format):
    return torch.randn(*shape).contiguous(memory_format=fmt).requires_grad_(grad)


def _cases():
    cases = []

    def conv(fmt=torch.contiguous_format, bias=True):
        x = _t(1, 4, 5, 4, fmt=fmt)
        w = _t(4, 2, 3, 3)
        return x, w, (_t(4) if bias else None), torch.rand(4, 3, 4, requires_grad=True)

    geometry = ([2, 1], [1, 1], [1, 1], 2)
    for label, fmt, bias, save in (("save", torch.contiguous_format, True, True),
                                   ("channels-last-no-save", torch.channels_last, False, False)):
        cases.append(("gated_conv2d", label, (*conv(fmt, bias), *geometry, save)))
    x, w, b, g = (t.detach() for t in conv())
    for label, saved in (("saved", torch.randn(1, 4, 3, 4)), ("recompute", torch.empty(0))):
        cases.append(("gated_conv2d_backward", label,
                      (torch.randn(1, 4, 3, 4), x, w, b, g, saved, *geometry, [True, True, True, True])))
    enc_w = [_t(4, 2), _t(4, 4)]
    enc_b = [_t(4), _t(4)]
    cases.append(("gated_conv2d_fused", "in-kernel-gate",
                  (*conv()[:3], None, enc_w, enc_b, "tanh", "sigmoid", None, None, *geometry, True)))
    cases.append(("gated_conv2d_fused", "mix",
                  (*conv(), [], [], "none", "none", _t(3, 4, 1, 1), _t(3), *geometry, False)))
    cases.append(("gated_conv2d_fused_backward", "mix-recompute",
                  (torch.randn(1, 3, 3, 4), x, w, b, g, torch.empty(0), torch.randn(3, 4, 1, 1), *geometry,
                   [True] * 6)))
    return cases


CASES = _cases()


@pytest.mark.parametrize("op_name,args", [(c[0], c[2]) for c in CASES], ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_opcheck(op_name, args):
    torch.library.opcheck(getattr(ops, op_name).default, args)


def test_every_op_has_an_opcheck_case():
    registered = {
        name.split("::", 1)[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith(f"{triton_ops.NAMESPACE}::")
    }
    assert registered == set(triton_ops.OPS)
    assert registered <= {c[0] for c in CASES}


def test_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(2, 3, 6, 5)
    layer = cg.FusedCoordGateConv2d(3, 4, 3, padding=1, backend="triton", encoder_hidden=8, gate_init="default")
    compiled = torch.compile(layer, fullgraph=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = compiled(x1), layer(x2)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_compile_fused_op_fullgraph():
    torch._dynamo.reset()
    x, w = torch.randn(1, 2, 6, 5), torch.randn(3, 2, 3, 3)
    enc_w, enc_b = [torch.randn(4, 2), torch.randn(3, 4)], [torch.randn(4), torch.randn(3)]

    def f(x, w):
        return triton_ops.coordgate_conv2d_encoder(x, w, None, enc_w, enc_b, "relu", "sigmoid", [1, 1], [1, 1],
                                                   [1, 1], 1, gate_mode="kernel")

    out = torch.compile(f, fullgraph=True)(x, w)
    g = reference.mlp_gate(enc_w, enc_b, 6, 5, "relu", "sigmoid")
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w, None, 1, 1) * g[None], rtol=1e-4, atol=1e-5)
