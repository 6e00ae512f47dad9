"""What the build of coordgate_ext._C compiles, decided in one place: setup.py builds by it,
records what it built in coordgate_ext/_build_info.json (INFO_FILE, read at import by
coordgate_ext.build_info()), and tests/test_cuda_build.py checks the built extension against it.

COORDGATE_CUDA=1 forces the CUDA part on (and fails if it cannot be built), COORDGATE_CUDA=0
forces it off; unset, it is built when csrc/cuda holds sources, torch is a CUDA build and a
CUDA toolkit is found. A GPU is not needed to build.
"""

import glob
import os

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
#: The architectures compiled when TORCH_CUDA_ARCH_LIST is not set: A100 and H100.
DEFAULT_ARCH_LIST = "8.0;9.0"
#: The record of a build, written beside the extension.
INFO_FILE = "_build_info.json"


class BuildConfigError(RuntimeError):
    """COORDGATE_CUDA=1 was set but the CUDA part cannot be built."""


def arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)


def toolkit_root():
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


def cuda_plan():
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
    if toolkit_root() is None:
        reasons.append("no CUDA toolkit (nvcc and libcudart) found")
    if reasons:
        if forced in ("1", "on", "true", "yes"):
            raise BuildConfigError("COORDGATE_CUDA=1 but the CUDA part cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, "toolkit at " + toolkit_root()


def build_info(torch_version: str, cuda: bool, reason: str) -> dict:
    """The record of a build: the torch it was compiled against (the extension loads only
    with that torch) and its CUDA part."""
    return {
        "torch": torch_version,
        "cpu_kernels": True,
        "cuda_kernels": cuda,
        "cuda_arch_list": arch_list() if cuda else None,
        "cuda_toolkit": toolkit_root() if cuda else None,
        "cuda_reason": None if cuda else reason,
    }


def summary(info: dict) -> str:
    """One line saying what a build compiled."""
    if info["cuda_kernels"]:
        cuda = (f"CUDA kernels for TORCH_CUDA_ARCH_LIST={info['cuda_arch_list']} "
                f"(toolkit {info['cuda_toolkit']})")
    else:
        cuda = f"no CUDA kernels ({info['cuda_reason']})"
    return f"built against torch {info['torch']}: C++ CPU kernels, {cuda}"
