"""The benchmarks' harness (benchmarks/bench_gated_conv2d.py), on the CPU only: on CUDA every
timed call synchronises, torch.compile and the fused kernels' first call happen before timing,
the CPU matrix stays as it is, and the CUDA matrix fits its five-minute budget."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

import coordgate_ext as cg

BENCH_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gated_conv2d.py"
#: The wall-clock budget of `pytest benchmarks/` on one H100/H200.
CUDA_BUDGET_S = 300

CPU_SHAPES = [
    (4, 32, 32, 3, 256, 256),
    (8, 64, 64, 3, 128, 128),
    (1, 32, 32, 3, 1024, 1024),
    (16, 16, 16, 5, 128, 128),
    (2, 3, 64, 3, 512, 512),
]
MODES = ["train_fwd", "fwd+bwd", "eval_fwd"]
TINY_SHAPE = (1, 2, 4, 3, 9, 7)
#: (provider, mode) whose first call must come before timing.
WARM_UP_CASES = [(p, m) for p in ["compiled_reference", "cpu"] for m in MODES] + [("cpu+recompute", "fwd+bwd")]


@pytest.fixture(scope="module")
def bench():
    """The benchmark module, loaded by path: benchmarks/ is not a package."""
    spec = importlib.util.spec_from_file_location("bench_gated_conv2d", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timed_call_synchronises_on_cuda(bench, monkeypatch):
    events = []
    monkeypatch.setattr(bench, "DEVICE", "cuda")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("synchronize"))
    timed = bench._synchronised(lambda: events.append("work"))
    for _ in range(3):
        timed()
    assert events == ["work", "synchronize"] * 3


def test_timed_call_is_unwrapped_on_cpu(bench, monkeypatch):
    monkeypatch.setattr(bench, "DEVICE", "cpu")

    def run():
        pass

    assert bench._synchronised(run) is run


class _FakeBenchmark:
    """pytest-benchmark's fixture, reduced to pedantic: it notes the events that happened
    before timing began and the callable it was given, then runs the rounds."""

    def __init__(self, events):
        self.events = events
        self.group = None
        self.before = None
        self.target = None

    def pedantic(self, target, rounds, warmup_rounds):
        self.before = list(self.events)
        self.target = target
        for _ in range(warmup_rounds + rounds):
            target()


@pytest.mark.parametrize(("provider", "mode"), WARM_UP_CASES, ids=[f"{p}-{m}" for p, m in WARM_UP_CASES])
def test_compile_and_first_call_happen_before_timing(bench, monkeypatch, provider, mode):
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "FUSED", bench._fused_backends("cpu"))
    assert "cpu" in bench.FUSED, "the CPU backend is not built"
    events = []

    def compile_(fn, **kwargs):
        events.append("compile")

        def compiled(*args):
            events.append("compiled call")
            return fn(*args)

        return compiled

    layer_forward = cg.FusedCoordGateConv2d.forward
    tensor_backward = torch.Tensor.backward

    def forward(self, *args):
        events.append(("forward", torch.is_grad_enabled()))
        return layer_forward(self, *args)

    def backward(self, *args):
        events.append("backward")
        return tensor_backward(self, *args)

    synchronised = []

    def synchronise(run):
        def timed():
            return run()

        synchronised.append(timed)
        return timed

    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(torch.compiler, "reset", lambda: events.append("reset"))
    monkeypatch.setattr(cg.FusedCoordGateConv2d, "forward", forward)
    monkeypatch.setattr(torch.Tensor, "backward", backward)
    monkeypatch.setattr(bench, "_synchronised", synchronise)
    benchmark = _FakeBenchmark(events)

    def ignore(*args):
        pass

    bench._time_case(benchmark, ignore, ignore, ignore, ignore, TINY_SHAPE, torch.float32, provider, mode,
                     torch.contiguous_format)

    before = benchmark.before
    assert benchmark.target in synchronised, "the timed callable is not the synchronised one"
    if provider == "compiled_reference":
        assert "compiled call" in before
        assert before.index("reset") < before.index("compile") < before.index("compiled call")
    else:
        assert "compile" not in before
    if mode != "eval_fwd":
        assert ("forward", True) in before, "the timed mode's forward (with autograd) was first run in the timer"
    assert ("backward" in before) == (mode == "fwd+bwd")


def test_cpu_matrix_is_unchanged(bench):
    assert bench.CPU_SHAPES == CPU_SHAPES
    assert bench.CPU_DTYPES == [torch.float32]
    assert bench.MODES == MODES
    assert bench._fused_backends("cpu") == ["cpu"]
    recompute = [("cpu+recompute", "train_fwd"), ("cpu+recompute", "fwd+bwd")]
    timed = bench._timed_cases("cpu", ["cpu"])
    providers = ["bare_conv", "reference", "compiled_reference", "cpu"]
    assert timed == [(s, torch.float32, p, m) for s in CPU_SHAPES
                     for p, m in [(p, m) for p in providers for m in MODES] + recompute]
    channels_last = bench._channels_last_cases("cpu", ["cpu"])
    assert channels_last == [(s, torch.float32, p, m) for s in CPU_SHAPES
                             for p, m in [(p, m) for p in ["bare_conv", "cpu"] for m in MODES] + recompute]
    assert (len(timed), len(channels_last)) == (70, 40)
    assert bench._ids(timed)[:2] == ["N4-32to32-k3-256x256-torch.float32-bare_conv-train_fwd",
                                     "N4-32to32-k3-256x256-torch.float32-bare_conv-fwd+bwd"]
    if bench.DEVICE == "cpu":
        assert bench.SHAPES == CPU_SHAPES
        assert bench.TIMED_CASES == bench._timed_cases("cpu", bench.FUSED)


def test_cuda_matrix_fits_the_budget(bench):
    fused = ["triton", "cuda"]  # both fused backends built: the longest run
    timed = bench._timed_cases("cuda", fused)
    channels_last = bench._channels_last_cases("cuda", fused)
    compiled = [case for case in timed if case[2] == "compiled_reference"]
    # The Triton kernels compile once per shape, dtype and layout.
    jit_groups = ({(s, d, "contiguous") for s, d, _, _ in timed}
                  | {(s, d, "channels_last") for s, d, _, _ in channels_last})
    memory_cases = len(bench.CUDA_SHAPES)  # test_saved_for_backward
    cost = bench.CUDA_COST_S
    seconds = (cost["start"] + (len(timed) + len(channels_last) - len(compiled) + memory_cases) * cost["case"]
               + len(compiled) * cost["compile"] + len(jit_groups) * cost["jit"])
    assert seconds <= CUDA_BUDGET_S, f"estimated {seconds:.0f} s"
    # The counts the estimate in the benchmark module's comment is made of.
    assert (len(timed) + len(channels_last), len(compiled), memory_cases, len(jit_groups)) == (141, 6, 3, 9)
    # Trimmed, but every provider is still timed in every mode (the compiled reference in the
    # training modes), in both dtypes.
    recompute = {(f"{b}+recompute", m) for b in fused for m in MODES[:2]}
    every = {(p, m) for p in ["bare_conv", "reference", "compiled_reference"] + fused for m in MODES} | recompute
    assert {(p, m) for _, _, p, m in timed} == every - {("compiled_reference", "eval_fwd")}
    assert {d for _, d, _, _ in timed} == {torch.bfloat16, torch.float32}
    layout_providers = ["bare_conv"] + fused
    assert {(p, m) for _, _, p, m in channels_last} == {(p, m) for p in layout_providers for m in MODES} | recompute
