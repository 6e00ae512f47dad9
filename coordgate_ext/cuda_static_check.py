"""The static GPU check of the CUDA C++ kernels (DESIGN.md section 5): what the built
extension coordgate_ext._C holds, per kernel and architecture, read from its fatbinary with
cuobjdump --dump-resource-usage, no GPU needed.

Registers, shared memory, and the per-thread local memory and stack: register spills go to
local memory, so LOCAL 0 and STACK 0 mean ptxas spilled nothing (no spill stores or loads).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_ARCH = re.compile(r"^arch = (sm_\d+\w*)")


@dataclasses.dataclass(frozen=True)
class KernelResources:
    kernel: str  # demangled, without namespace and parameters: "gated_conv2d_fwd_kernel<float, true>"
    arch: str  # "sm_80"
    registers: int
    stack: int  # bytes per thread
    shared: int  # bytes per block, static
    local: int  # bytes per thread

    @property
    def base_name(self) -> str:
        """The kernel's name without its template arguments."""
        return self.kernel.split("<", 1)[0]


def extension_path() -> Path:
    """The built coordgate_ext._C shared library."""
    from . import _C

    return Path(_C.__file__)


def find_tool(name: str) -> str | None:
    """cuobjdump / nvdisasm: the triton wheel's copy, the CUDA toolkit's, or one on PATH."""
    candidates = []
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / name)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def _short(demangled: str) -> str:
    """"void coordgate::(anonymous namespace)::k<float, true>(args...)" -> "k<float, true>"."""
    name = demangled.removeprefix("void ")
    name = name.replace("(anonymous namespace)::", "")
    name = name.split("(", 1)[0]
    return name.rsplit("::", 1)[-1] if "<" not in name else _strip_namespace(name)


def _strip_namespace(name: str) -> str:
    head, _, args = name.partition("<")
    return head.rsplit("::", 1)[-1] + "<" + args.replace("c10::", "")


def resource_usage(path: str | os.PathLike | None = None) -> list[KernelResources]:
    """Every kernel of every architecture in the library's fatbinary."""
    tool = find_tool("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (it ships with triton and with the CUDA toolkit)")
    target = str(path or extension_path())
    text = subprocess.run([tool, "--dump-resource-usage", target], capture_output=True, text=True,
                          check=True).stdout
    mangled, arches, usages = [], [], []
    arch, function = None, None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := _FUNCTION.match(line):
            function = m.group(1)
        elif function is not None and (m := _USAGE.search(line)):
            mangled.append(function)
            arches.append(arch)
            usages.append(tuple(int(v) for v in m.groups()))
            function = None
    names = [_short(d) for d in _demangle(mangled)]
    return [
        KernelResources(name, a, reg, stack, shared, local)
        for name, a, (reg, stack, shared, local) in zip(names, arches, usages)
    ]


def markdown_table(rows: list[KernelResources]) -> str:
    lines = [
        "| kernel | arch | registers | shared bytes | local bytes | stack bytes |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r.base_name, r.kernel, r.arch)):
        lines.append(f"| `{r.kernel}` | {r.arch} | {r.registers} | {r.shared} | {r.local} | {r.stack} |")
    return "\n".join(lines)
