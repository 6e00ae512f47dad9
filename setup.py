"""Builds coordgate_ext._C: the C++ CPU kernels always, the CUDA kernels when they can be built
(build_config.py decides and says why)."""

import glob
import os
import sys

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

import build_config

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extension():
    try:
        build_cuda, reason = build_config.cuda_plan()
    except build_config.BuildConfigError as exc:
        sys.exit(str(exc))
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
    root = build_config.toolkit_root()
    os.environ["CUDA_HOME"] = root
    cpp_extension.CUDA_HOME = root
    cu_sources = sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    )
    include_dirs = glob.glob(
        os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include")
    )
    arch = build_config.arch_list()
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
