"""The gated convolution: bare F.conv2d (the bound), the eager reference, the compiled
reference (torch.compile, the fair baseline for a fused op) and each fused backend, side by
side, in three modes: training forward (gate computed), forward+backward (all gradients) and
eval forward (gate cached). float32 on the CPU; every dtype on CUDA when a GPU is present.
The same shapes with a channels_last input time the bare convolution and the fused backends
again (cases suffixed "-channels_last"), each against the bare convolution in that layout.

Run: ``make bench`` (or ``pytest benchmarks/``). Each case first checks that the fused output
equals the reference. The summary prints ratios, the performance model of DESIGN.md section 6
and the bytes saved for backward, and writes results/benchmarks.{json,png}.
"""

from __future__ import annotations

import copy
import resource
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import coordgate_ext as cg
from coordgate_ext import reference

# (N, Cin, C, kernel, H, W)
SHAPES = [
    (4, 32, 32, 3, 256, 256),
    (8, 64, 64, 3, 128, 128),
    (1, 32, 32, 3, 1024, 1024),
    (16, 16, 16, 5, 128, 128),
    (2, 3, 64, 3, 512, 512),
]
MODES = ["train_fwd", "fwd+bwd", "eval_fwd"]
#: Back-to-back rounds of a provider and the bare convolution for the paired ratio.
PAIRED_ROUNDS = 5
ENCODER_HIDDEN = 32


def _fused_backends(device: str) -> list[str]:
    available = cg.available_backends()
    candidates = ["cpu"] if device == "cpu" else ["triton", "cuda"]
    return [b for b in candidates if available[b] is None]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
FUSED = _fused_backends(DEVICE)
PROVIDERS = ["bare_conv", "reference", "compiled_reference"] + FUSED
# (provider, mode): every provider in every mode, and each fused backend with recompute=True
# (the ungated convolution recomputed in backward instead of saved) where something is saved.
RECOMPUTE_CASES = [(f"{b}+recompute", m) for b in FUSED for m in MODES if m != "eval_fwd"]
CASES = [(p, m) for p in PROVIDERS for m in MODES] + RECOMPUTE_CASES
# The same shapes with a channels_last input (the output follows it): the bare convolution
# and the fused backends only (the references gain nothing from the layout).
CHANNELS_LAST_CASES = [(p, m) for p in ["bare_conv"] + FUSED for m in MODES] + RECOMPUTE_CASES


def _case_id(shape, dtype=torch.float32, memory_format=torch.contiguous_format):
    n, cin, c, k, h, w = shape
    suffix = "" if dtype == torch.float32 else f"-{str(dtype).split('.')[-1]}"
    if memory_format == torch.channels_last:
        suffix += "-channels_last"
    return f"N{n}-{cin}to{c}-k{k}-{h}x{w}{suffix}"


def _model(shape, dtype) -> dict[str, float]:
    """DESIGN.md section 6: FLOPs, the minimum bytes (read x and the weights once, write out
    once) and the unfused path's bytes (plus: write y, read y and g, the encoder's hidden
    activations written and read, the gate written)."""
    n, cin, c, k, h, w = shape
    item = torch.empty((), dtype=dtype).element_size()
    out = n * c * h * w * item
    gate = c * h * w * item
    hidden = h * w * ENCODER_HIDDEN * 4
    minimum = n * cin * h * w * item + c * cin * k * k * item + out
    unfused = minimum + 2 * out + 2 * gate + 2 * hidden
    return {"gflop": 2 * n * h * w * c * cin * k * k / 1e9, "min_mb": minimum / 1e6, "unfused_mb": unfused / 1e6}


def _make(shape, dtype, backend, memory_format=torch.contiguous_format):
    n, cin, c, k, h, w = shape
    torch.manual_seed(0)
    # nn.Linear's initialisation: a gate that varies over the field, as a trained one does.
    layer = cg.FusedCoordGateConv2d(cin, c, k, padding=k // 2, encoder_hidden=ENCODER_HIDDEN,
                                    gate_init="default", device=DEVICE, dtype=dtype, backend=backend)
    x = torch.randn(n, cin, h, w, device=DEVICE, dtype=dtype)
    return layer, x.contiguous(memory_format=memory_format)


def _runner(provider, mode, shape, dtype, memory_format=torch.contiguous_format):
    """A zero-argument callable running ``provider`` in ``mode``, after an equality check."""
    layer, x = _make(shape, dtype, "reference", memory_format)
    if mode == "eval_fwd":
        layer.eval()
    base, _, variant = provider.partition("+")
    if base in FUSED:
        model = copy.deepcopy(layer)
        model.backend = base
        model.recompute = variant == "recompute"
        with torch.no_grad():
            tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(model(x), layer(x), **tol)
    elif provider == "bare_conv":
        model = lambda inp: F.conv2d(inp, layer.weight, layer.bias, padding=layer.padding)  # noqa: E731
    elif provider == "compiled_reference" and mode == "eval_fwd":
        gate = layer.gate_map(*x.shape[-2:]).detach()
        step = torch.compile(lambda inp, g: reference.gated_conv2d(
            inp, layer.weight, layer.bias, g, layer.stride, layer.padding, layer.dilation, layer.groups))
        model = lambda inp: step(inp, gate)  # noqa: E731
    elif provider == "compiled_reference":
        model = torch.compile(layer)
    else:
        model = layer
    inp = x.requires_grad_(mode == "fwd+bwd")
    # The output gradient is made once (in the warm-up): a fresh output-sized tensor per call
    # would time the harness's page faults, the same for every provider.
    grad_out = []

    def run():
        if mode == "eval_fwd":
            with torch.no_grad():
                return model(inp)
        out = model(inp)
        if mode == "fwd+bwd":
            if not grad_out:
                grad_out.append(torch.ones_like(out))
            out.backward(grad_out[0])
        return out

    return run


@pytest.mark.parametrize(("provider", "mode"), CASES, ids=[f"{p}-{m}" for p, m in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_case_id)
def test_gated_conv2d(benchmark, record_median, record_faults, record_paired, record_model, shape, dtype,
                      provider, mode):
    _time_case(benchmark, record_median, record_faults, record_paired, record_model, shape, dtype, provider,
               mode, torch.contiguous_format)


@pytest.mark.parametrize(("provider", "mode"), CHANNELS_LAST_CASES,
                         ids=[f"{p}-{m}" for p, m in CHANNELS_LAST_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_case_id)
def test_gated_conv2d_channels_last(benchmark, record_median, record_faults, record_paired, record_model, shape,
                                    dtype, provider, mode):
    _time_case(benchmark, record_median, record_faults, record_paired, record_model, shape, dtype, provider,
               mode, torch.channels_last)


def _time_case(benchmark, record_median, record_faults, record_paired, record_model, shape, dtype, provider,
               mode, memory_format):
    """Times one case, and records its median, page faults, paired ratio and model."""
    case = _case_id(shape, dtype, memory_format)
    run = _runner(provider, mode, shape, dtype, memory_format)
    record_model(case, _model(shape, dtype))
    benchmark.group = f"{case} {mode}"
    benchmark.pedantic(run, rounds=5, warmup_rounds=2)
    record_median(case, mode, provider, benchmark)
    faults = _minor_faults()
    run()
    record_faults(case, mode, provider, (_minor_faults() - faults) * resource.getpagesize())
    if provider != "bare_conv":
        record_paired(case, mode, provider,
                      _paired_ratio(run, _runner("bare_conv", mode, shape, dtype, memory_format)))


def _seconds(fn) -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _minor_faults() -> int:
    """Page faults served without I/O so far in this process: on this machine, mostly the
    first touch of the fresh pages glibc maps for every large allocation."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _paired_ratio(run, bare, rounds: int = PAIRED_ROUNDS) -> float:
    """Median over rounds of time(run) / time(bare), the two timed back to back."""
    bare()
    ratios = []
    for _ in range(rounds):
        base = _seconds(bare)
        ratios.append(_seconds(run) / base)
    return statistics.median(ratios)


def _saved_bytes(module, x) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


@pytest.mark.parametrize("shape", SHAPES, ids=_case_id)
def test_saved_for_backward(record_saved_bytes, shape):
    layer, x = _make(shape, torch.float32, "reference")
    x.requires_grad_()
    record_saved_bytes(_case_id(shape), "reference", _saved_bytes(layer, x))
    for backend in FUSED:
        fused = copy.deepcopy(layer)
        fused.backend = backend
        record_saved_bytes(_case_id(shape), backend, _saved_bytes(fused, x))
        fused.recompute = True
        record_saved_bytes(_case_id(shape), f"{backend}+recompute", _saved_bytes(fused, x))
