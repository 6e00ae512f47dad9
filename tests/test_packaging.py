"""The package installs the way Python users install it: an sdist made from a clean copy of
the repository holds everything a build needs; in a fresh venv with a CPU build of another
torch (so that only the C++ CPU kernels are compiled, in a few minutes), a wheel built from
the copy holds the package and its metadata and its build says what it built in pip's normal
output, and the package installed from the sdist computes what the reference computes.

COORDGATE_TEST_TORCH is the torch requirement of the fresh venv (default torch==2.13.0, the
CPU wheel on this machine's disk; on a machine without it, point it at another CPU build).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCH_REQUIREMENT = os.environ.get("COORDGATE_TEST_TORCH", "torch==2.13.0")
#: What a build needs from the sdist beside the Python package.
SDIST_MUST_HOLD = [
    "pyproject.toml", "setup.py", "build_config.py", "MANIFEST.in", "README.md", "LICENSE",
    "CITATION.cff", "csrc/ops.cpp", "csrc/ops.h", "csrc/common/coordgate_math.h",
    "csrc/common/conv_geometry.h", "csrc/cpu/kernels.h", "csrc/cpu/output_cache.h",
    "csrc/cuda/kernels.h", "coordgate_ext/__init__.py", "coordgate_ext/py.typed",
]

# Runs in the fresh venv, outside the repository: the installed package against its reference.
SMOKE = r"""
import json, torch, coordgate_ext as cg
torch.manual_seed(0)
layer = cg.FusedCoordGateConv2d(3, 4, 3, padding=1, gate_init="default", backend="cpu").double()
x = torch.randn(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
out = layer(x)
out.square().sum().backward()
grad_cpu = x.grad.clone()
x.grad = None
layer.backend = "reference"
ref = layer(x)
ref.square().sum().backward()
print(json.dumps({
    "file": cg.__file__,
    "build": cg.build_info(),
    "torch": torch.__version__,
    "forward_err": (out - ref).abs().max().item(),
    "grad_err": (grad_cpu - x.grad).abs().max().item(),
    "backends": cg.available_backends(),
}))
"""


def _run(cmd, cwd, env=None, timeout=900):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
        f"{proc.stderr[-4000:]}"
    )
    return proc.stdout + proc.stderr


def _clean_copy(dest: Path) -> None:
    """The files a fresh clone of this checkout holds (tracked, or new and not ignored)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: there is no clean copy to make")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():  # a tracked file deleted in the work tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


@dataclass
class Built:
    sdist: Path
    wheel: Path  # built from the clean copy's folder
    wheel_log: str  # pip's normal output of that build
    python: Path  # the fresh venv's, with the package installed from the sdist
    env: dict


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    tmp = tmp_path_factory.mktemp("packaging")
    src, dist, wheels = tmp / "src", tmp / "dist", tmp / "wheels"
    _clean_copy(src)
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", dist, src], tmp)
    (sdist,) = dist.glob("coordgate_ext-*.tar.gz")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", python]
    install = subprocess.run(
        pip + ["install", "--quiet", TORCH_REQUIREMENT, "numpy", "setuptools>=77", "wheel", "ninja"],
        cwd=tmp, capture_output=True, text=True, timeout=900,
    )
    if install.returncode != 0:
        pytest.skip(f"cannot install {TORCH_REQUIREMENT} into a fresh venv (set "
                    f"COORDGATE_TEST_TORCH): {install.stderr[-2000:]}")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COORDGATE_CUDA")}
    # pip shows a build backend's warnings (the build summary) for a local folder only.
    log = _run(pip + ["wheel", "--no-build-isolation", "--no-deps", "--wheel-dir", wheels, src],
               tmp, env=env)
    (wheel,) = wheels.glob("coordgate_ext-*.whl")
    # Its requirements are already met: nothing more is installed.
    _run(pip + ["install", "--no-build-isolation", "--no-cache-dir", sdist], tmp, env=env)
    _run(pip + ["check"], tmp, env=env)
    return Built(sdist, wheel, log, python, env)


def test_sdist_holds_what_a_build_needs_and_no_build_output(built):
    with tarfile.open(built.sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = [name for name in SDIST_MUST_HOLD if name not in names]
    assert not missing, f"the sdist lacks {missing}"
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert sources <= names, f"the sdist lacks {sorted(sources - names)}"
    outputs = [n for n in names if n.endswith((".so", ".pyc")) or "_build_info" in n]
    assert not outputs, f"the sdist holds build outputs: {outputs}"


def test_wheel_holds_the_package_its_extension_and_metadata(built):
    with zipfile.ZipFile(built.wheel) as whl:
        names = set(whl.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = whl.read(metadata).decode()
    assert any(n.startswith("coordgate_ext/_C") and n.endswith(".so") for n in names)
    for name in ("coordgate_ext/_build_info.json", "coordgate_ext/py.typed",
                 "coordgate_ext/nn/conv.py", "coordgate_ext/triton/kernels.py"):
        assert name in names, f"the wheel lacks {name}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not [n for n in names if n.startswith(("tests/", "csrc/", "benchmarks/"))]
    assert "License-Expression: BSD-3-Clause" in meta
    assert "Requires-Python: >=3.10" in meta
    assert "Requires-Dist: torch>=2.13" in meta and "Requires-Dist: numpy" in meta
    for extra in ("experiments", "test"):
        assert f"Provides-Extra: {extra}" in meta
    assert "Requires-Dist: matplotlib" in meta and "; extra == \"experiments\"" in meta
    assert "Description-Content-Type: text/markdown" in meta
    assert "# coordgate_ext" in meta  # the README is the long description


def test_build_says_what_it_built_in_pips_normal_output(built):
    log = built.wheel_log
    assert "coordgate_ext:0: BuildBackendWarning: built against torch" in log, log[-3000:]
    assert "C++ CPU kernels, no CUDA kernels (torch is not a CUDA build)" in log, log[-3000:]


def test_package_installed_from_the_sdist_runs_against_the_torch_it_was_built_with(built, tmp_path):
    # Run outside the repository so that the source tree cannot be imported instead.
    output = _run([built.python, "-c", SMOKE], tmp_path, env=built.env)
    result = json.loads(output.strip().splitlines()[-1])
    assert Path(result["file"]).is_relative_to(built.python.parent.parent), result["file"]
    build = result["build"]
    assert build["loaded"] and build["load_error"] is None
    assert build["torch"] == result["torch"]
    assert build["cpu_kernels"] and not build["cuda_kernels"]
    assert result["backends"]["cpu"] is None and result["backends"]["reference"] is None
    assert result["forward_err"] < 1e-12 and result["grad_err"] < 1e-12


def test_build_record_matches_the_loaded_extension():
    import torch

    import coordgate_ext as cg
    from coordgate_ext.ops import _library

    info = cg.build_info()
    assert info["loaded"] and info["load_error"] is None
    assert info["torch"] == torch.__version__
    assert info["cpu_kernels"] and _library.has_kernel("gated_conv2d", "CPU")
    assert info["cuda_kernels"] == _library.has_kernel("gated_conv2d", "CUDA")
    assert (info["cuda_reason"] is None) == info["cuda_kernels"]


def test_extension_built_against_another_torch_is_not_loaded(monkeypatch):
    from coordgate_ext.ops import _library

    monkeypatch.setattr(_library, "BUILD_INFO", {**(_library.BUILD_INFO or {}), "torch": "2.0.0"})
    module, reason = _library._load()
    assert module is None
    assert "built against torch 2.0.0 but torch" in reason
    assert "pip install --no-build-isolation ." in reason


def test_build_summary_says_what_was_built(monkeypatch):
    import build_config  # the repository root is on pytest's pythonpath
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    monkeypatch.setattr(build_config, "toolkit_root", lambda: "/opt/cuda")
    with_cuda = build_config.build_info("2.14.1+cu130", True, "toolkit at /opt/cuda")
    assert build_config.summary(with_cuda) == (
        "built against torch 2.14.1+cu130: C++ CPU kernels, CUDA kernels for "
        "TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX (toolkit /opt/cuda)"
    )
    without = build_config.build_info("2.13.0+cpu", False, "COORDGATE_CUDA=0")
    assert without["cuda_arch_list"] is None and without["cuda_toolkit"] is None
    assert build_config.summary(without) == (
        "built against torch 2.13.0+cpu: C++ CPU kernels, no CUDA kernels (COORDGATE_CUDA=0)"
    )
