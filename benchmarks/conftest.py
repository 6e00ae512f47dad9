"""Side-by-side reporting for the benchmarks.

Every timing records its median under (case, mode, provider), and its paired ratio to the
bare convolution (the median over rounds that time the bare convolution and the provider back
to back, so that the machine's drift between tests, large on a shared 2-core machine, cancels);
every memory measurement its saved-for-backward bytes under (case, provider). The terminal
summary prints, per case, the performance model of DESIGN.md section 6, the medians with their
ratios to the bare convolution, the compiled reference and the eager reference, the paired
ratio, the bytes of pages faulted in by one call after the timed rounds, and the memory
table; it writes results/benchmarks.json and results/benchmarks.png.

The allocator is part of the measurement. With glibc's defaults, an allocation above the mmap
threshold (which glibc moves between 128 KiB and 32 MiB) is fresh pages from the kernel,
faulted in on first touch; on this virtual machine that costs about 0.5 ms per MiB, and ATen's
whole-batch convolution allocates such buffers on every call. `make bench-heap` runs the same
benchmarks with glibc told to serve every allocation from its reused heap (GLIBC_TUNABLES), as
jemalloc or tcmalloc would, and writes results/benchmarks-heap.{json,png}. The summary says
which allocator it ran under.
"""

from __future__ import annotations

import collections
import json
import os

import pytest

MEDIANS: dict[tuple[str, str], dict[str, float]] = collections.defaultdict(dict)
FAULTED: dict[tuple[str, str], dict[str, float]] = collections.defaultdict(dict)
PAIRED: dict[tuple[str, str], dict[str, float]] = collections.defaultdict(dict)
SAVED_BYTES: dict[str, dict[str, int]] = collections.defaultdict(dict)
MODELS: dict[str, dict[str, float]] = {}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
#: Suffix of the result files ("heap" for `make bench-heap`).
TAG = os.environ.get("COORDGATE_BENCH_TAG", "")
BASELINES = (("bare_conv", "/ bare conv"), ("compiled_reference", "/ compiled ref"), ("reference", "/ eager ref"))


@pytest.fixture
def record_median():
    def record(case: str, mode: str, provider: str, benchmark) -> None:
        # Under --benchmark-disable each case runs once, untimed (a smoke run): no median.
        if not benchmark.disabled:
            MEDIANS[(case, mode)][provider] = benchmark.stats.stats.median

    return record


@pytest.fixture
def record_faults():
    def record(case: str, mode: str, provider: str, nbytes: float) -> None:
        FAULTED[(case, mode)][provider] = nbytes

    return record


def _allocator() -> str:
    preload = os.environ.get("LD_PRELOAD")
    if preload:
        return f"LD_PRELOAD={preload} (glibc malloc unless that replaces it)"
    tunables = os.environ.get("GLIBC_TUNABLES")
    if tunables:
        return f"glibc malloc with GLIBC_TUNABLES={tunables}"
    return ("glibc malloc defaults (allocations above the mmap threshold are fresh pages, "
            "faulted in on first touch)")


def _result_path(ext: str) -> str:
    return os.path.join(RESULTS_DIR, f"benchmarks{'-' + TAG if TAG else ''}.{ext}")


@pytest.fixture
def record_paired():
    def record(case: str, mode: str, provider: str, ratio: float) -> None:
        PAIRED[(case, mode)][provider] = ratio

    return record


@pytest.fixture
def record_saved_bytes():
    def record(case: str, provider: str, nbytes: int) -> None:
        SAVED_BYTES[case][provider] = nbytes

    return record


@pytest.fixture
def record_model():
    def record(case: str, model: dict[str, float]) -> None:
        MODELS[case] = model

    return record


def _write_plot(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(MEDIANS)
    providers = sorted({p for v in MEDIANS.values() for p in v})
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(keys)), 5))
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        ratios = [MEDIANS[k].get(provider, float("nan")) / MEDIANS[k]["bare_conv"]
                  if "bare_conv" in MEDIANS[k] else float("nan") for k in keys]
        ax.bar([x + i * width for x in range(len(keys))], ratios, width, label=provider)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))])
    ax.set_xticklabels([f"{c}\n{m}" for c, m in keys], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("median time / bare F.conv2d")
    ax.set_title("coordgate_ext: gated convolution vs the bare convolution" + (f" ({TAG})" if TAG else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pytest_terminal_summary(terminalreporter):
    if not MEDIANS and not SAVED_BYTES:
        return
    write = terminalreporter.write_line
    write("")
    write("coordgate_ext benchmarks: medians and ratios (< 1 is faster than the baseline)")
    write(f"allocator: {_allocator()}")
    for case in sorted({c for c, _ in MEDIANS} | set(SAVED_BYTES)):
        write("")
        model = MODELS.get(case)
        if model:
            write(f"{case}: {model['gflop']:.2f} GFLOP, minimum {model['min_mb']:.1f} MB moved, "
                  f"unfused {model['unfused_mb']:.1f} MB (conv output written and read again, "
                  f"gate and encoder activations)")
        header = (f"  {'mode':<10} {'provider':<20} {'median ms':>10}" + "".join(f" {h:>15}" for _, h in BASELINES)
                  + f" {'paired / bare':>15} {'faulted MiB':>12}")
        write(header)
        for (c, mode), providers in sorted(MEDIANS.items()):
            if c != case:
                continue
            for provider, median in sorted(providers.items(), key=lambda kv: kv[1]):
                ratios = "".join(
                    f" {median / providers[b]:15.2f}" if b in providers else f" {'-':>15}" for b, _ in BASELINES
                )
                paired = PAIRED[(c, mode)].get(provider)
                paired_text = f" {paired:15.2f}" if paired is not None else f" {'-':>15}"
                faulted = FAULTED[(c, mode)].get(provider)
                faulted_text = f" {faulted / 2**20:12.0f}" if faulted is not None else f" {'-':>12}"
                write(f"  {mode:<10} {provider:<20} {median * 1e3:10.1f}{ratios}{paired_text}{faulted_text}")
        saved = SAVED_BYTES.get(case)
        if saved:
            ref = saved.get("reference")
            write("  saved for backward: " + ", ".join(
                f"{p} {b / 2**20:.1f} MiB" + (f" ({b / ref:.2f} x reference)" if ref and p != "reference" else "")
                for p, b in sorted(saved.items())))
    os.makedirs(RESULTS_DIR, exist_ok=True)
    json_path = _result_path("json")
    with open(json_path, "w") as f:
        json.dump({
            "allocator": _allocator(),
            "faulted_bytes_per_call": {f"{c} | {m}": v for (c, m), v in sorted(FAULTED.items())},
            "medians_s": {f"{c} | {m}": v for (c, m), v in sorted(MEDIANS.items())},
            "paired_ratio_to_bare_conv": {f"{c} | {m}": v for (c, m), v in sorted(PAIRED.items())},
            "saved_for_backward_bytes": SAVED_BYTES,
            "model": MODELS,
        }, f, indent=2)
    write("")
    write(f"wrote {json_path}")
    if MEDIANS:
        png_path = _result_path("png")
        _write_plot(png_path)
        write(f"wrote {png_path}")
