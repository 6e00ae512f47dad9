"""The static GPU check: every Triton kernel, for each configuration of its list and for
float16 and bfloat16, compiles ahead of time for sm_80 and sm_90; its cubin has no local
memory spills and its main loop uses tensor-core instructions (HMMA on sm_80, HGMMA or HMMA on
sm_90). No GPU is needed: the cubin is read with the cuobjdump / nvdisasm of the triton wheel."""

from __future__ import annotations

import pytest

from coordgate_ext.triton import static_check


@pytest.fixture(scope="module")
def rows():
    return static_check.report()


def test_every_kernel_config_dtype_and_arch_is_compiled(rows):
    assert len(rows) == len(list(static_check.jobs()))
    kernels = {r.kernel for r in rows}
    assert kernels == {name for _, name, _, _ in static_check.VARIANTS}
    assert {(r.dtype, r.arch) for r in rows} == {(d, a) for d in static_check.DTYPES for a in static_check.ARCHS}


def test_no_local_memory_spills(rows):
    spilled = [f"{r.kernel} {r.variant} {r.config} {r.dtype} sm_{r.arch}: local {r.local_bytes} B, "
               f"stack {r.stack_bytes} B, LDL/STL {r.spill_loads}/{r.spill_stores}" for r in rows if r.spills]
    assert not spilled, "\n".join(spilled)


def test_main_loops_use_tensor_cores(rows):
    missing = [f"{r.kernel} {r.variant} {r.config} {r.dtype} sm_{r.arch}" for r in rows
               if (r.hmma if r.arch == 80 else r.hmma + r.hgmma) == 0]
    assert not missing, "no HMMA/HGMMA in:\n" + "\n".join(missing)
