"""The CUDA C++ kernels (csrc/cuda) are compiled into coordgate_ext._C whenever this machine
can build them (build_config.cuda_plan), registered for every operator, present for every
architecture of TORCH_CUDA_ARCH_LIST, and free of register spills. No GPU needed: this reads
the extension's fatbinary (coordgate_ext.cuda_static_check)."""

from __future__ import annotations

import pytest
import torch

import build_config
import coordgate_ext as cg
from coordgate_ext import cuda_static_check
from coordgate_ext.ops import _library

try:
    BUILT, REASON = build_config.cuda_plan()
except build_config.BuildConfigError as exc:  # COORDGATE_CUDA=1 on a machine that cannot
    BUILT, REASON = False, str(exc)

needs_cuda_build = pytest.mark.skipif(not BUILT, reason=f"the CUDA part is not built here: {REASON}")

DTYPES = ["float", "double", "Half", "BFloat16"]
#: Every kernel the build must hold, per architecture (a new kernel is added here).
EXPECTED_KERNELS = (
    {f"gated_conv2d_fwd_kernel<{t}, false>" for t in DTYPES}
    | {f"gated_conv2d_fwd_kernel<{t}, true>" for t in ("float", "Half", "BFloat16")}
    | {f"gated_conv2d_{k}_kernel<{t}>" for k in ("mix_fwd", "bwd_gate", "bwd_input", "bwd_weight")
       for t in DTYPES}
    | {f"{k}<{t}>" for k in ("encoder_layer_fwd_kernel", "encoder_layer_bwd_kernel",
                             "encoder_output_delta_kernel", "grid_coordinates_kernel")
       for t in ("float", "double")}
)
#: Static shared memory a block may use, plus what sm_90 reserves per block beside it.
STATIC_SHARED_LIMIT = 48 * 1024
SYSTEM_SHARED = {"sm_90": 1024}


def _arches() -> set[str]:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0", "8.0 9.0+PTX", ...) as cubin architectures."""
    names = build_config.arch_list().replace(";", " ").split()
    return {"sm_" + name.removesuffix("+PTX").replace(".", "") for name in names}


@pytest.fixture(scope="module")
def resources():
    return cuda_static_check.resource_usage()


@needs_cuda_build
def test_every_op_has_a_cuda_kernel():
    missing = [op for op in _library.OPS if not _library.has_kernel(op, "CUDA")]
    assert not missing, f"operators without a CUDA kernel: {missing}"


@needs_cuda_build
def test_every_kernel_compiled_for_every_arch(resources):
    got = {(r.kernel, r.arch) for r in resources}
    want = {(k, a) for k in EXPECTED_KERNELS for a in _arches()}
    assert want - got == set(), f"kernels missing from the build: {sorted(want - got)}"
    assert got - want == set(), f"kernels the test does not know: {sorted(got - want)}"


@needs_cuda_build
def test_no_register_spills(resources):
    """ptxas spills to local memory through the stack: neither is used by any kernel."""
    spilling = [(r.kernel, r.arch, r.local, r.stack) for r in resources if r.local or r.stack]
    assert not spilling, f"kernels using local memory or a stack frame: {spilling}"


@needs_cuda_build
def test_shared_memory_within_the_static_limit(resources):
    over = [(r.kernel, r.arch, r.shared) for r in resources
            if r.shared - SYSTEM_SHARED.get(r.arch, 0) > STATIC_SHARED_LIMIT]
    assert not over, over


@needs_cuda_build
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_built_cuda_backend_says_it_needs_a_device():
    assert cg.available_backends()["cuda"] == "no CUDA device is visible to torch"


def test_build_plan_without_toolkit_skips_cuda_and_says_why(monkeypatch):
    monkeypatch.setattr(build_config, "toolkit_root", lambda: None)
    monkeypatch.delenv("COORDGATE_CUDA", raising=False)
    built, reason = build_config.cuda_plan()
    assert not built and "no CUDA toolkit (nvcc and libcudart) found" in reason
    monkeypatch.setenv("COORDGATE_CUDA", "1")
    with pytest.raises(build_config.BuildConfigError, match="COORDGATE_CUDA=1 but the CUDA part cannot be built"):
        build_config.cuda_plan()
    monkeypatch.setenv("COORDGATE_CUDA", "0")
    assert build_config.cuda_plan() == (False, "COORDGATE_CUDA=0")


def test_arch_list_default_covers_a100_and_h100(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert _arches() == {"sm_80", "sm_90"}
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6 9.0+PTX")
    assert _arches() == {"sm_86", "sm_90"}
