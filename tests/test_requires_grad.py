"""Every subset of the tensors that can require a gradient, on every backend (the Triton
backend, interpreted, on a sample of the subsets): the gradients
equal the reference backend's, and the tensors left out get none (frozen encoders, frozen
convolutions, input-only gradients, recompute, eval mode, torch.compile)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import coordgate_ext as cg
from tests.support import assert_close
from tests.support import BACKENDS, device_of



def _layers():
    """(label, module factory, input shape), float64 for the CPU backend, each with its
    groups of parameters that a user may freeze separately."""
    kw = dict(dtype=torch.float64)
    return [
        ("conv2d-mlp", lambda: cg.FusedCoordGateConv2d(2, 3, 3, padding=1, gate_init="default", **kw),
         (2, 2, 5, 4)),
        ("conv2d-map", lambda: cg.FusedCoordGateConv2d(2, 3, 3, padding=1, encoder="map", map_size=(2, 2), **kw),
         (2, 2, 5, 4)),
        ("block2d", lambda: cg.FusedCoordGateBlock2d(2, 3, 2, 3, padding=1, gate_init="default", **kw),
         (2, 2, 5, 4)),
        ("conv1d", lambda: cg.FusedCoordGateConv1d(2, 3, 3, padding=1, gate_init="default", **kw), (2, 2, 7)),
    ]


def _groups(module: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """The parameter groups: the convolution's weight and bias, each encoder layer, the mix."""
    groups = {"weight": [module.weight], "bias": [module.bias]}
    encoder = module.encoder
    if isinstance(encoder, cg.nn.MLPEncoder):
        # Across the layers, so that each of the ops' weight and bias lists can hold tensors
        # that require a gradient next to tensors that do not.
        first, last = encoder.layers[0], encoder.layers[-1]
        groups["encoder-a"] = [first.weight, last.bias]
        groups["encoder-b"] = [last.weight, first.bias]
    else:
        groups["encoder"] = list(encoder.parameters())
    if isinstance(module, cg.FusedCoordGateBlock2d):
        groups["mix_weight"] = [module.mix_weight]
        groups["mix_bias"] = [module.mix_bias]
    return groups


def _gradients(module, x, subset, train: bool, grad_out):
    """The gradients of (out * grad_out).sum() w.r.t. the subset's tensors, and the names of
    every other tensor, which must have received none."""
    module.train(train)
    groups = _groups(module)
    for name, params in groups.items():
        for p in params:
            p.requires_grad_(name in subset)
    x = x.clone().requires_grad_("input" in subset)
    out = module(x)
    if not subset:
        assert not out.requires_grad
        return {}, []
    (out * grad_out).sum().backward()
    grads = {"input": x.grad} if "input" in subset else {}
    untouched = [] if "input" in subset else [x.grad]
    for name, params in groups.items():
        for i, p in enumerate(params):
            (grads.__setitem__(f"{name}.{i}", p.grad) if name in subset else untouched.append(p.grad))
    return grads, untouched


def _subsets(names, every: bool):
    """Every subset of names; else (the interpreted Triton kernels are slow) none, each name
    alone, each left out and all."""
    if every:
        return [c for size in range(len(names) + 1) for c in itertools.combinations(names, size)]
    alone = [(n,) for n in names]
    left_out = [tuple(m for m in names if m != n) for n in names]
    return [(), *alone, *left_out, tuple(names)]


def _run(backend, label, factory, shape, recompute, train, monkeypatch):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    dtype = torch.float32 if backend == "triton" else torch.float64
    torch.manual_seed(0)
    module = factory().to(device_of(backend), dtype)
    module.recompute = recompute
    x = torch.randn(shape, dtype=dtype, device=device_of(backend))
    with torch.no_grad():
        out_shape = module(x).shape
    grad_out = torch.randn(out_shape, dtype=dtype, device=device_of(backend))
    for subset in _subsets(["input", *_groups(module)], every=backend != "triton"):
            ours = copy.deepcopy(module)
            ours.backend = backend
            spec = copy.deepcopy(module)
            spec.backend = "reference"
            grads, untouched = _gradients(ours, x, subset, train, grad_out)
            expected, _ = _gradients(spec, x, subset, train, grad_out)
            assert all(g is None for g in untouched), f"{label} {subset}: a frozen tensor got a gradient"
            for name, g in grads.items():
                assert g is not None, f"{label} {subset}: no gradient for {name}"
                assert_close(g, expected[name])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label,factory,shape", _layers(), ids=[c[0] for c in _layers()])
@pytest.mark.parametrize("recompute,train", [(False, True), (True, True), (False, False)],
                         ids=["train", "train-recompute", "eval"])
def test_every_subset_requiring_grad(backend, label, factory, shape, recompute, train, monkeypatch):
    _run(backend, label, factory, shape, recompute, train, monkeypatch)


def test_frozen_encoder_trains_under_compile():
    """The issue's first report, compiled: a layer with a frozen MLP encoder trains."""
    torch.manual_seed(0)
    module = cg.FusedCoordGateBlock2d(2, 3, 2, 3, padding=1, gate_init="default", dtype=torch.float64)
    module.encoder.requires_grad_(False)
    spec = copy.deepcopy(module)
    spec.backend = "reference"
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    torch.compile(module, fullgraph=True)(x).sum().backward()
    spec(x).sum().backward()
    for (name, p), q in zip(module.named_parameters(), spec.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert_close(p.grad, q.grad)
