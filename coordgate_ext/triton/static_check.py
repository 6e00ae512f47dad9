"""The static GPU check (DESIGN.md section 5): every kernel, for every configuration of its
list and for float16 and bfloat16, compiled ahead of time for sm_80 and sm_90 without a GPU;
the cubin's resources are read with the cuobjdump and nvdisasm shipped in the triton wheel.

    from coordgate_ext.triton import static_check
    for row in static_check.report(): print(row)

A row holds the kernel, variant, configuration, dtype and arch, and what the cubin says:
registers, shared memory (static + Triton's dynamic allocation), local memory and stack per
thread, the spill instructions (LDL / STL) and the tensor-core instructions (HMMA / HGMMA).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import kernels
from .configs import CONFIGS, TileConfig

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16")
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
#: Pointers that are float32 whatever the storage dtype (encoder weights, split partials).
_FP32_POINTERS = ("enc_", "db_ptr", "dw_ptr")

_MLP = dict(GATE_MODE=1, N_LAYERS=3, BLOCK_E=32, HIDDEN_ACT=1, GATE_ACT=2)
_MAP = dict(GATE_MODE=0, N_LAYERS=1, BLOCK_E=16, HIDDEN_ACT=0, GATE_ACT=0)
_COMMON = dict(UPCAST=False, ALLOW_TF32=False)

#: (config-list key, kernel name, variant, constexprs other than the tile sizes).
VARIANTS = (
    ("fwd", "_gated_conv2d_fwd_kernel", "map-gate", dict(HAS_BIAS=True, SAVE_Y=True, **_MAP)),
    ("fwd", "_gated_conv2d_fwd_kernel", "mlp-gate", dict(HAS_BIAS=True, SAVE_Y=False, **_MLP)),
    ("mix_fwd", "_gated_conv2d_mix_fwd_kernel", "map-gate",
     dict(HAS_BIAS=True, HAS_MIX_BIAS=True, SAVE_Y=True, BLOCK_O=64, **_MAP)),
    ("bwd_gate", "_gated_conv2d_bwd_gate_kernel", "recompute",
     dict(HAS_BIAS=True, NEED_DG=True, NEED_DB=True, RECOMPUTE=True)),
    ("bwd_input", "_gated_conv2d_bwd_input_kernel", "-", {}),
    ("bwd_weight", "_gated_conv2d_bwd_weight_kernel", "-", {}),
)


@dataclasses.dataclass
class Row:
    kernel: str
    variant: str
    config: str
    dtype: str
    arch: int
    registers: int
    shared_bytes: int
    local_bytes: int
    stack_bytes: int
    spill_loads: int
    spill_stores: int
    hmma: int
    hgmma: int

    @property
    def spills(self) -> bool:
        """Local memory in use: a stack frame or local loads / stores (register spills)."""
        return bool(self.local_bytes or self.stack_bytes or self.spill_loads or self.spill_stores)

    @property
    def tensor_core_instructions(self) -> int:
        return self.hmma + self.hgmma


def _signature(fn, constexprs: dict, dtype: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name.startswith(_FP32_POINTERS) else f"*{dtype}"
        elif name.startswith("scale_"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _tool(name: str, *args: str) -> str:
    result = subprocess.run([os.path.join(_BIN, name), *args], capture_output=True, text=True, check=True)
    return result.stdout


def compile_one(kernel: str, variant: str, constexprs: dict, cfg: TileConfig, dtype: str, arch: int) -> Row:
    """Compiles one kernel variant for sm_<arch> and reads its cubin."""
    fn = getattr(kernels, kernel)
    const = dict(constexprs, **_COMMON, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
    # 16-byte aligned pointers, as torch's allocations are: what the launcher specialises on.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name.endswith("_ptr")}
    compiled = triton.compile(
        ASTSource(fn, _signature(fn, const, dtype), const, attrs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = _tool("cuobjdump", "-res-usage", path)
        sass = _tool("nvdisasm", "-c", path)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"could not read the resource usage of {kernel}: {usage!r}")
    regs, stack, shared, local = map(int, m.groups())

    def count(op: str) -> int:
        return len(re.findall(rf"\b{op}\b", sass))

    return Row(kernel, variant, str(cfg), dtype, arch, regs, shared + compiled.metadata.shared, local, stack,
               count("LDL"), count("STL"), count("HMMA"), count("HGMMA"))


def jobs():
    """Every (kernel, variant, constexprs, config, dtype, arch) the check compiles."""
    for key, kernel, variant, constexprs in VARIANTS:
        for cfg in CONFIGS[key]:
            for dtype in DTYPES:
                for arch in ARCHS:
                    yield kernel, variant, constexprs, cfg, dtype, arch


def report(max_workers: int | None = None) -> list[Row]:
    """Compiles every job (in worker processes) and returns the rows in job order."""
    todo = list(jobs())
    workers = max_workers or min(len(todo), os.cpu_count() or 1)
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_compile_job, todo))


def _compile_job(job) -> Row:
    return compile_one(*job)


def format_table(rows: list[Row]) -> str:
    """A markdown table of the rows."""
    head = ("| kernel | variant | config | dtype | sm | regs | smem (B) | local (B) | stack (B) | "
            "LDL/STL | HMMA | HGMMA |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r.kernel} | {r.variant} | {r.config} | {r.dtype} | {r.arch} | {r.registers} | "
            f"{r.shared_bytes} | {r.local_bytes} | {r.stack_bytes} | {r.spill_loads}/{r.spill_stores} | "
            f"{r.hmma} | {r.hgmma} |"
        )
    return "\n".join(lines)
