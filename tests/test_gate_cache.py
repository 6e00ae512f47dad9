"""The eval-mode gate cache: an eval forward always equals a fresh computation from the
current parameters, however they changed; the cache is per grid and thread-safe."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import coordgate_ext as cg
from tests.support import assert_close


def _calls_to_encoder(layer):
    calls = []
    layer.encoder.register_forward_hook(lambda *a: calls.append(1))
    return calls


def _fresh(layer, x):
    """What the layer's current parameters compute, by the reference with nothing cached."""
    spec = copy.deepcopy(layer)
    spec.clear_gate_cache()
    spec.encoder._forward_hooks.clear()  # deep-copied with the module: not the layer's calls
    spec.backend = "reference"
    with torch.no_grad():
        return spec(x)


def test_gate_cached_in_eval_and_recomputed_on_change():
    layer = cg.FusedCoordGateConv2d(3, 4, 3, padding=1, gate_init="default", backend="cpu").eval()
    calls = _calls_to_encoder(layer)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first)
        assert len(calls) == 1, "the gate is computed once in eval mode"
        layer(torch.randn(1, 3, 10, 8))
        assert len(calls) == 2, "a new output size computes its gate"
        layer(x)
        assert len(calls) == 2, "gates of recent grids are kept side by side"
        layer.encoder.layers[0].bias.add_(1.0)
        changed = layer(x)
        assert len(calls) == 3, "an in-place parameter update recomputes the gate"
        assert not torch.equal(changed, first)
        assert_close(changed, _fresh(layer, x))
        layer.double()
        layer(x.double())
        assert len(calls) == 4, "a dtype change recomputes the gate"


def test_eval_cache_keeps_a_pixel_major_gate_for_channels_last():
    """A channels_last input on the CPU reads the cached gate from a pixel-major copy, made
    once and refreshed with the map; gate_map stays contiguous."""
    layer = cg.FusedCoordGateConv2d(3, 5, 3, padding=1, gate_init="default", backend="cpu").eval()
    x = torch.randn(2, 3, 10, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        layer(x.contiguous())
        assert layer._gate_entries[(10, 9)][2] is None, "an NCHW input reads the contiguous map"
        assert_close(layer(x), _fresh(layer, x))
        _, gate, pixel_major = layer._gate_entries[(10, 9)]
        assert gate.is_contiguous() and torch.equal(layer.gate_map(10, 9), gate)
        assert pixel_major.permute(1, 2, 0).is_contiguous() and torch.equal(pixel_major, gate)
        assert layer(x).is_contiguous(memory_format=torch.channels_last)
        assert layer._gate_entries[(10, 9)][2] is pixel_major, "the copy is made once"
        layer.encoder.layers[1].bias.add_(0.5)
        assert_close(layer(x), _fresh(layer, x))
        assert not torch.equal(layer._gate_entries[(10, 9)][2], pixel_major), "an update refreshes the copy"


def test_gate_not_cached_when_training_or_differentiating():
    layer = cg.FusedCoordGateConv2d(3, 4, 3, padding=1, gate_init="default", backend="cpu")
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        layer(x)
    assert not getattr(layer, "_gate_entries", None), "training mode never caches"
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert layer._gate_entries
    layer(x).sum().backward()
    # Eval mode with gradients flowing into the encoder does not use the cached gate.
    assert layer.encoder.layers[0].weight.grad is not None
    assert layer.encoder.layers[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "Adagrad", "SGD"])
def test_eval_output_fresh_after_fused_optimizer_steps(optimizer):
    """Fused optimizers update parameters without bumping their version counter."""
    torch.manual_seed(0)
    layer = cg.FusedCoordGateConv2d(3, 4, 3, padding=1, backend="cpu")
    x = torch.randn(2, 3, 8, 8)
    opt = getattr(torch.optim, optimizer)(layer.parameters(), lr=0.1, fused=True)
    for _ in range(2):
        layer.eval()
        with torch.no_grad():
            before = layer(x)
        layer.train()
        opt.zero_grad()
        (layer(x) ** 2).mean().backward()
        opt.step()
        layer.eval()
        with torch.no_grad():
            after = layer(x)
        assert not torch.equal(after, before)
        assert_close(after, _fresh(layer, x))


@pytest.mark.parametrize("edit", ["data", "numpy", "set_"])
def test_eval_output_fresh_after_edits_outside_autograd(edit):
    layer = cg.FusedCoordGateConv2d(3, 4, 3, padding=1, encoder="map", map_size=(2, 2), backend="cpu").eval()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        before = layer(x)
    if edit == "data":
        layer.encoder.map.data.mul_(0.5)
    elif edit == "numpy":
        layer.encoder.map.detach().numpy()[0, 0, 0] = 3.0
    else:
        with torch.no_grad():
            layer.encoder.map.set_(torch.full_like(layer.encoder.map, 2.0))
    with torch.no_grad():
        after = layer(x)
    assert not torch.equal(after, before)
    assert_close(after, _fresh(layer, x))


def test_gate_map_is_the_callers_own_tensor():
    layer = cg.FusedCoordGateConv2d(3, 4, 3, padding=1, backend="cpu").eval()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        before = layer(x)
        layer.gate_map(6, 6).mul_(0.0)
        assert torch.equal(layer(x), before)
    conv1d = cg.FusedCoordGateConv1d(3, 4, 3, padding=1, backend="cpu").eval()
    signal = torch.randn(1, 3, 9)
    with torch.no_grad():
        before = conv1d(signal)
        conv1d.gate_map(9).zero_()
        assert torch.equal(conv1d(signal), before)


def test_nan_parameters_are_never_served_from_the_cache():
    """NaN equals nothing, so a map holding NaN is recomputed on every call, never stale."""
    layer = cg.FusedCoordGateConv2d(2, 3, 3, padding=1, encoder="map", map_size=(1, 1), backend="cpu").eval()
    x = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        layer.encoder.map[0] = float("nan")
        assert layer(x)[:, 0].isnan().all()
        layer.encoder.map.data[0] = 1.0
        assert_close(layer(x), _fresh(layer, x))


def test_concurrent_eval_calls_at_different_sizes():
    """Threads sharing one eval layer, each at its own input size: every call is right."""
    torch.manual_seed(0)
    layers = [
        cg.FusedCoordGateConv2d(2, 3, 3, padding=1, backend="cpu").eval(),
        cg.FusedCoordGateBlock2d(2, 3, 2, 3, padding=1, backend="cpu").eval(),
        cg.CoordGate(3, 2).eval(),
    ]
    sizes = [(5, 7), (8, 6), (9, 9), (4, 11), (6, 6)]  # more grids than the cache keeps
    errors = []

    def work(layer, x, want):
        try:
            for _ in range(30):
                with torch.no_grad():
                    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5)
        except Exception as exc:  # noqa: BLE001  (reported by the main thread)
            errors.append(exc)

    for layer in layers:
        channels = 3 if isinstance(layer, cg.CoordGate) else 2
        inputs = [torch.randn(1, channels, *size) for size in sizes]
        cases = [(layer, x, _fresh(layer, x)) for x in inputs]
        threads = [threading.Thread(target=work, args=case) for case in cases for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]
