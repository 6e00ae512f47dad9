"""Prints the static GPU check's per-kernel table (markdown): every Triton kernel of
coordgate_ext, for each configuration of its list, float16 and bfloat16, compiled ahead of
time for sm_80 and sm_90 without a GPU; registers, shared memory, local memory / stack,
spill instructions and tensor-core instruction counts read from the cubin.

    PYTHONPATH=. .venv/bin/python scripts/triton_static_report.py > docs/triton_static_report.md
"""

from __future__ import annotations

import sys

import triton

from coordgate_ext.triton import static_check


def main() -> int:
    rows = static_check.report()
    print("# Static GPU check of the Triton kernels\n")
    print(f"triton {triton.__version__}; produced by `scripts/triton_static_report.py`; checked by "
          "`tests/triton/test_static_gpu.py`. smem = static + Triton's dynamic shared memory per "
          "block; local / stack = per-thread local memory; LDL/STL = local loads / stores (spills); "
          "HMMA / HGMMA = tensor-core instructions in the SASS.\n")
    print(static_check.format_table(rows))
    bad = [r for r in rows if r.spills or r.tensor_core_instructions == 0]
    print(f"\n{len(rows)} compilations, {len(bad)} with spills or without tensor-core instructions.")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
