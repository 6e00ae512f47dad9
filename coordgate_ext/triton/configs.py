"""Tile configurations of the Triton kernels, in plain lists.

``@triton.autotune`` needs a GPU to time candidates, and the kernels must also run under the
Triton interpreter and compile ahead of time without one, so each kernel has a fixed list that
its launcher chooses from (``choose``) and that the tests and the static GPU check walk one by
one. The first entry of each list is the large-problem choice.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """BLOCK_M x BLOCK_N output tile, BLOCK_K reduction step, launch warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}-w{self.num_warps}-s{self.num_stages}"


#: _gated_conv2d_fwd_kernel: M = pixels, N = channels of a group. Each entry compiles without
#: spills for sm_80 and sm_90 (tests/triton/test_static_gpu.py; docs/triton_static_report.md).
FWD_CONFIGS = (
    TileConfig(64, 64, 32, 8, 3),
    TileConfig(128, 32, 32, 8, 3),
    TileConfig(64, 32, 32, 4, 2),
)
#: _gated_conv2d_mix_fwd_kernel: M = pixels, N = channels per step of the channel loop; the
#: mix output width BLOCK_O is the next power of two >= Cout (at most MAX_MIX_CHANNELS). Two
#: accumulators live at once, so the tiles are small.
MIX_CONFIGS = (
    TileConfig(32, 32, 32, 8, 2),
    TileConfig(32, 16, 16, 4, 2),
)
MAX_MIX_CHANNELS = 64
#: _gated_conv2d_bwd_gate_kernel (dg, db partials).
BWD_GATE_CONFIGS = (
    TileConfig(64, 32, 32, 8, 2),
    TileConfig(32, 32, 32, 4, 2),
)
#: _gated_conv2d_bwd_input_kernel: M = input pixels, N = input channels of a group.
BWD_INPUT_CONFIGS = (
    TileConfig(128, 64, 32, 8, 3),
    TileConfig(64, 64, 32, 8, 3),
)
#: _gated_conv2d_bwd_weight_kernel: M = output channels, N = input channels of one tap,
#: K = N * Ho * Wo.
BWD_WEIGHT_CONFIGS = (
    TileConfig(64, 64, 64, 8, 3),
    TileConfig(64, 64, 32, 4, 3),
)

CONFIGS = {
    "fwd": FWD_CONFIGS,
    "mix_fwd": MIX_CONFIGS,
    "bwd_gate": BWD_GATE_CONFIGS,
    "bwd_input": BWD_INPUT_CONFIGS,
    "bwd_weight": BWD_WEIGHT_CONFIGS,
}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def choose(configs, m: int, n: int) -> TileConfig:
    """The heuristic that stands in for autotuning: the configuration whose tiles waste the
    fewest padded elements on an m x n output, the earlier entry (larger tiles) on a tie."""
    def padded(cfg: TileConfig) -> int:
        return _cdiv(m, cfg.block_m) * cfg.block_m * _cdiv(n, cfg.block_n) * cfg.block_n

    return min(configs, key=padded)
