"""Builds coordgate_ext._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

COORDGATE_CUDA=1 forces the CUDA part on (and fails if it cannot be built), COORDGATE_CUDA=0
forces it off; unset, it is built when csrc/cuda holds sources, torch is a CUDA build and a
CUDA toolkit is found. A GPU is not needed to build.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root():
    """A CUDA toolkit folder holding nvcc and libcudart, or None.

    torch.utils.cpp_extension guesses CUDA_HOME from the nvcc on PATH; where that nvcc is a
    wrapper outside the toolkit the guess lacks the runtime library, so look for it.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in filter(None, candidates):
        has_nvcc = os.path.exists(os.path.join(root, "bin", "nvcc"))
        has_cudart = any(
            os.path.exists(os.path.join(root, lib, "libcudart.so")) for lib in ("lib64", "lib")
        )
        if has_nvcc and has_cudart:
            return root
    return None


def _cuda_plan():
    """(build_cuda, reason)."""
    forced = os.environ.get("COORDGATE_CUDA", "").strip().lower()
    sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    if forced in ("0", "off", "false", "no"):
        return False, "COORDGATE_CUDA=0"
    reasons = []
    if not sources:
        reasons.append("csrc/cuda holds no CUDA sources yet")
    if torch.version.cuda is None:
        reasons.append("torch is not a CUDA build")
    if _toolkit_root() is None:
        reasons.append("no CUDA toolkit (nvcc and libcudart) found")
    if reasons:
        if forced in ("1", "on", "true", "yes"):
            sys.exit("COORDGATE_CUDA=1 but the CUDA part cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, "toolkit at " + _toolkit_root()


def _extension():
    build_cuda, reason = _cuda_plan()
    sources = [os.path.join("csrc", "ops.cpp")] + sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    # -fopenmp: at::parallel_for is header code that parallelises only when compiled with
    # OpenMP (torch is built with it; its libgomp provides the runtime).
    cxx_flags = ["-O3", "-fopenmp", "-fdiagnostics-color=always"]
    print(f"coordgate_ext build: torch {torch.__version__}, C++ CPU kernels: yes")
    if not build_cuda:
        print(f"coordgate_ext build: CUDA kernels: no ({reason})")
        return cpp_extension.CppExtension(
            "coordgate_ext._C", sources, extra_compile_args={"cxx": cxx_flags}
        )
    root = _toolkit_root()
    os.environ["CUDA_HOME"] = root
    cpp_extension.CUDA_HOME = root
    cu_sources = sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    )
    include_dirs = glob.glob(
        os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include")
    )
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    print(f"coordgate_ext build: CUDA kernels: yes ({reason}; TORCH_CUDA_ARCH_LIST={arch})")
    return cpp_extension.CUDAExtension(
        "coordgate_ext._C",
        sources + cu_sources,
        include_dirs=[os.path.abspath(d) for d in include_dirs],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-Xptxas", "-v"]},
    )


setup(
    name="coordgate_ext",
    version="0.1.0",
    packages=find_packages(include=["coordgate_ext", "coordgate_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
