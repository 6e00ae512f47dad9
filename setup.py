"""Builds coordgate_ext._C: the C++ CPU kernels always, the CUDA kernels when they can be built
(build_config.py decides and says why). The project's metadata is in pyproject.toml.

What was built is written beside the extension (coordgate_ext/_build_info.json, read by
`coordgate_ext.build_info()`), printed, and announced as a build warning under pip, the one
kind of build output that pip (26 and newer) shows without -v.
"""

import glob
import json
import os
import sys
import warnings

import setuptools
from setuptools import setup

# pyproject.toml's SPDX `license` string needs setuptools 77; older ones fail with a schema
# error that does not say so.
if int(setuptools.__version__.split(".")[0]) < 77:
    sys.exit(f"coordgate_ext needs setuptools>=77 to build, found {setuptools.__version__}: "
             "pip install -U setuptools")

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
# setuptools' PEP 517 backend runs this file without its folder on sys.path.
sys.path.insert(0, ROOT)
import build_config  # noqa: E402

EXTENSION = "coordgate_ext._C"


class BuildSummary(UserWarning):
    """What this build compiled (a warning so that pip shows it)."""


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension(build_cuda):
    sources = [os.path.join("csrc", "ops.cpp")] + _sources(os.path.join("csrc", "cpu", "*.cpp"))
    # -fopenmp: at::parallel_for is header code that parallelises only when compiled with
    # OpenMP (torch is built with it; its libgomp provides the runtime).
    cxx_flags = ["-O3", "-fopenmp", "-fdiagnostics-color=always"]
    if not build_cuda:
        return cpp_extension.CppExtension(EXTENSION, sources, extra_compile_args={"cxx": cxx_flags})
    root = build_config.toolkit_root()
    os.environ["CUDA_HOME"] = root
    cpp_extension.CUDA_HOME = root
    os.environ["TORCH_CUDA_ARCH_LIST"] = build_config.arch_list()
    include_dirs = glob.glob(
        os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include")
    )
    return cpp_extension.CUDAExtension(
        EXTENSION,
        sources + _sources(os.path.join("csrc", "cuda", "*.cu")),
        include_dirs=[os.path.abspath(d) for d in include_dirs],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-Xptxas", "-v"]},
    )


class BuildExt(cpp_extension.BuildExtension):
    """torch's BuildExtension (ninja), deciding the CUDA part when it runs (not when an sdist
    or the metadata is made) and recording what it built."""

    def run(self):
        try:
            self._cuda, self._reason = build_config.cuda_plan()
        except build_config.BuildConfigError as exc:
            sys.exit(str(exc))
        # Fill in the placeholder that setuptools has already registered under its name.
        (placeholder,) = self.extensions
        for name, value in vars(_extension(self._cuda)).items():
            if not name.startswith("_"):
                setattr(placeholder, name, value)
        super().run()
        info = build_config.build_info(torch.__version__, self._cuda, self._reason)
        folder = os.path.dirname(self.get_ext_fullpath(EXTENSION))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, build_config.INFO_FILE), "w") as f:
            json.dump(info, f, indent=1)
        summary = build_config.summary(info)
        print(f"coordgate_ext build: {summary}", flush=True)
        # pip shows a build's output only with -v, but a build backend's warnings without, for
        # a local folder (not for an sdist). pyproject_hooks, which every PEP 517 frontend
        # uses, names the backend in this variable.
        if "_PYPROJECT_HOOKS_BUILD_BACKEND" in os.environ:
            warnings.warn_explicit(summary, BuildSummary, "coordgate_ext", 0)


setup(
    # A placeholder that BuildExt fills in: the sources and flags are decided at build time.
    ext_modules=[cpp_extension.CppExtension(EXTENSION, [])],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
