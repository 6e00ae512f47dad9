"""Side-by-side ratios for the benchmarks: every benchmark records its median under
(case, mode, provider), and the terminal summary prints each provider's ratio to the bare
convolution and to the eager reference of the same case and mode."""

from __future__ import annotations

import collections

import pytest

MEDIANS: dict[tuple[str, str], dict[str, float]] = collections.defaultdict(dict)


@pytest.fixture
def record_median():
    def record(case: str, mode: str, provider: str, benchmark) -> None:
        MEDIANS[(case, mode)][provider] = benchmark.stats.stats.median

    return record


def pytest_terminal_summary(terminalreporter):
    if not MEDIANS:
        return
    write = terminalreporter.write_line
    write("")
    write("coordgate_ext benchmark ratios (medians; < 1 is faster than the baseline)")
    write(f"{'case':<28} {'mode':<10} {'provider':<12} {'median ms':>10} {'/ bare conv':>12} {'/ eager ref':>12}")
    for (case, mode), providers in sorted(MEDIANS.items()):
        conv = providers.get("bare_conv")
        ref = providers.get("reference")
        for provider, median in sorted(providers.items()):
            ratio_conv = f"{median / conv:12.2f}" if conv else f"{'-':>12}"
            ratio_ref = f"{median / ref:12.2f}" if ref else f"{'-':>12}"
            write(f"{case:<28} {mode:<10} {provider:<12} {median * 1e3:10.1f} {ratio_conv} {ratio_ref}")
