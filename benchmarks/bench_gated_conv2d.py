"""The gated convolution: bare F.conv2d (the bound), the eager reference, the compiled
reference (torch.compile, the fair baseline for a fused op) and each fused backend, side by
side, in three modes: training forward (gate computed), forward+backward (all gradients) and
eval forward (gate cached). On the CPU: five shapes, float32, every provider in every mode. On
CUDA, when a GPU is present: a trimmed matrix (CUDA_SHAPES, CUDA_DTYPES, the compiled reference
in bfloat16 training modes only) that fits in five minutes on one H100/H200. The same shapes
with a channels_last input time the bare convolution and the fused backends again (cases
suffixed "-channels_last"; bfloat16 only on CUDA), each against the bare convolution in that
layout.

Each case first checks that the fused output equals the reference, then calls its callable
once, untimed, with the timed input and mode (backward included): torch.compile and the Triton
JIT compile there, never in the warm-up round or the timed rounds. Each compiled case starts
from torch.compiler.reset(), so that it compiles one static graph for its own shape and dtype
(dynamo's cache is per function: without the reset, later cases would get dynamic-shape
recompiles, and past its limit of 8 recompiles, the eager function). On CUDA every timed call
ends with torch.cuda.synchronize(), so that a median measures the kernels, not their launch.

Run: ``make bench`` (or ``pytest benchmarks/``). The summary prints ratios, the performance
model of DESIGN.md section 6 and the bytes saved for backward, and writes
results/benchmarks.{json,png}.
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

MODES = ["train_fwd", "fwd+bwd", "eval_fwd"]
#: Back-to-back rounds of a provider and the bare convolution for the paired ratio.
PAIRED_ROUNDS = 5
ENCODER_HIDDEN = 32

# (N, Cin, C, kernel, H, W)
CPU_SHAPES = [
    (4, 32, 32, 3, 256, 256),
    (8, 64, 64, 3, 128, 128),
    (1, 32, 32, 3, 1024, 1024),
    (16, 16, 16, 5, 128, 128),
    (2, 3, 64, 3, 512, 512),
]
CPU_DTYPES = [torch.float32]

# The CUDA matrix, trimmed so that `pytest benchmarks/` fits in 5 minutes on one H100/H200.
CUDA_SHAPES = [
    (8, 64, 64, 3, 128, 128),  # the most arithmetic per output (Cin k^2 = 576): the convolution dominates
    (1, 32, 32, 3, 1024, 1024),  # N = 1 on a large field: the gate is amortised over one sample only
    (2, 3, 64, 3, 512, 512),  # Cin k^2 = 27: memory-bound, the unfused passes dominate
]
#: float16 left out: it moves the same bytes through the same kernels as bfloat16.
CUDA_DTYPES = [torch.bfloat16, torch.float32]
#: (dtype, mode) of the compiled reference on CUDA, each case a fresh compile: bfloat16, the
#: training dtype; not eval_fwd, where the reference is one convolution and one multiply by the
#: cached gate: little for the compiler to fuse, so the eager reference stands for it.
CUDA_COMPILED = [(torch.bfloat16, "train_fwd"), (torch.bfloat16, "fwd+bwd")]
#: channels_last on CUDA in bfloat16 only, the dtype whose convolutions prefer that layout.
CUDA_CHANNELS_LAST_DTYPES = [torch.bfloat16]
#: The CUDA run's cost, estimated in seconds rather than measured: "start" (import, CUDA
#: context), per "case" (set-up, equality check, warm-up, 1 + 5 rounds and the paired ratio's 11
#: calls, each a few ms at most), per "compile" (torch.compile of the reference, 10-30 s), per
#: "jit" (the Triton kernels' first compile per shape, dtype and layout). The matrix above has
#: 141 timed cases (6 compiled) and 3 memory cases in 9 groups:
#: 15 + 138 x 0.5 + 6 x 20 + 9 x 4 = 240 s of the 300 s budget (tests/test_benchmarks.py).
CUDA_COST_S = {"start": 15, "case": 0.5, "compile": 20, "jit": 4}


def _fused_backends(device: str) -> list[str]:
    available = cg.available_backends()
    candidates = ["cpu"] if device == "cpu" else ["triton", "cuda"]
    return [b for b in candidates if available[b] is None]


def _timed_cases(device: str, fused: list[str]) -> list[tuple]:
    """(shape, dtype, provider, mode) of the contiguous cases: every provider in every mode, and
    each fused backend with recompute=True (the ungated convolution recomputed in backward
    instead of saved) where something is saved; on CUDA, the compiled reference in CUDA_COMPILED
    only."""
    shapes, dtypes = (CPU_SHAPES, CPU_DTYPES) if device == "cpu" else (CUDA_SHAPES, CUDA_DTYPES)
    providers = ["bare_conv", "reference", "compiled_reference"] + fused
    cases = [(p, m) for p in providers for m in MODES] + _recompute_cases(fused)
    return [(s, d, p, m) for s in shapes for d in dtypes for p, m in cases
            if p != "compiled_reference" or device == "cpu" or (d, m) in CUDA_COMPILED]


def _channels_last_cases(device: str, fused: list[str]) -> list[tuple]:
    """The same shapes with a channels_last input (the output follows it): the bare convolution
    and the fused backends only (the references gain nothing from the layout)."""
    shapes, dtypes = (CPU_SHAPES, CPU_DTYPES) if device == "cpu" else (CUDA_SHAPES, CUDA_CHANNELS_LAST_DTYPES)
    cases = [(p, m) for p in ["bare_conv"] + fused for m in MODES] + _recompute_cases(fused)
    return [(s, d, p, m) for s in shapes for d in dtypes for p, m in cases]


def _recompute_cases(fused: list[str]) -> list[tuple[str, str]]:
    return [(f"{b}+recompute", m) for b in fused for m in MODES if m != "eval_fwd"]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = CPU_SHAPES if DEVICE == "cpu" else CUDA_SHAPES
FUSED = _fused_backends(DEVICE)
TIMED_CASES = _timed_cases(DEVICE, FUSED)
CHANNELS_LAST_CASES = _channels_last_cases(DEVICE, FUSED)


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
    """A zero-argument callable running ``provider`` in ``mode``, after an equality check and
    one untimed call."""
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
    elif provider == "compiled_reference":
        # One static graph per case, compiled afresh (see the module docstring).
        torch.compiler.reset()
        if mode == "eval_fwd":
            gate = layer.gate_map(*x.shape[-2:]).detach()
            step = torch.compile(lambda inp, g: reference.gated_conv2d(
                inp, layer.weight, layer.bias, g, layer.stride, layer.padding, layer.dilation, layer.groups))
            model = lambda inp: step(inp, gate)  # noqa: E731
        else:
            model = torch.compile(layer)
    else:
        model = layer
    inp = x.requires_grad_(mode == "fwd+bwd")
    # The output gradient is made once (in the first call): a fresh output-sized tensor per call
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

    # With the timed input and mode, backward included, so that torch.compile and the Triton
    # JIT compile here and not in a timed round; synchronised, so that timing starts on an idle GPU.
    _synchronised(run)()
    return run


def _synchronised(run):
    """``run`` followed by torch.cuda.synchronize() on CUDA, so that a timer around it measures
    the kernels, not only their launch; ``run`` itself on the CPU, which adds nothing."""
    if DEVICE != "cuda":
        return run

    def synchronised():
        out = run()
        torch.cuda.synchronize()
        return out

    return synchronised


def _ids(cases) -> list[str]:
    return [f"{_case_id(shape)}-{dtype}-{provider}-{mode}" for shape, dtype, provider, mode in cases]


@pytest.mark.parametrize(("shape", "dtype", "provider", "mode"), TIMED_CASES, ids=_ids(TIMED_CASES))
def test_gated_conv2d(benchmark, record_median, record_faults, record_paired, record_model, shape, dtype,
                      provider, mode):
    _time_case(benchmark, record_median, record_faults, record_paired, record_model, shape, dtype, provider,
               mode, torch.contiguous_format)


@pytest.mark.parametrize(("shape", "dtype", "provider", "mode"), CHANNELS_LAST_CASES, ids=_ids(CHANNELS_LAST_CASES))
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
    # One warm-up round after _runner's first call: the timed rounds then follow a call made in
    # the steady state (allocator and caches as they will be).
    benchmark.pedantic(_synchronised(run), rounds=5, warmup_rounds=1)
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
    """Median over rounds of time(run) / time(bare), the two timed back to back (both from
    _runner, so already called once)."""
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
