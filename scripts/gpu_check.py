"""`make gpu-check`: the whole check of coordgate_ext on one CUDA GPU, in at most 8 minutes.

    python3 scripts/gpu_check.py                 # every stage (what `make gpu-check` runs)
    python3 scripts/gpu_check.py --stage NAME    # one stage's body, as the check runs it

Without arguments it checks that torch sees a CUDA device (else it exits with code 2 and says
why), then runs each stage of STAGES in a child process of the same Python, in its own process
group and under its own time limit: info, build (in place, for this GPU's architecture only),
backends, tests (the CUDA-device tests), stream, sanitizer (compute-sanitizer), timing (against
cuDNN and the compiled reference). The timing stage gets what the others left of the 8 minutes.
It prints a table of the stages and writes results/gpu/: summary.md, results.json, raw.jsonl
(one line per timed case, written as each is measured), info.json and logs/. The exit code is
0 when no stage failed, 1 otherwise, 2 when there is no GPU or no torch.

This file imports only the standard library at the top: torch is imported inside the stages,
which run in child processes, so that the check can say what is missing before anything else.
docs/gpu_check.md says what each stage proves.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.abspath(__file__)
RESULTS_DIR = os.path.join(ROOT, "results", "gpu")
LOGS_DIR = os.path.join(RESULTS_DIR, "logs")
RAW_FILE = "raw.jsonl"
INFO_FILE = "info.json"

#: The whole check's wall time: stage limits, the probe's and the summary's reserve fit in it.
TOTAL_BUDGET_S = 480.0
#: The probe (is there a GPU?) and the summary written at the end.
PROBE_LIMIT_S = 20.0
SUMMARY_RESERVE_S = 5.0
#: The timing stage runs only with at least this much time left; run alone, it takes this long.
TIMING_MIN_S = 30.0
TIMING_ALONE_S = 240.0
#: A stage's child reads its own time limit here (to stop cleanly before it is killed).
LIMIT_ENV = "COORDGATE_GPU_CHECK_LIMIT_S"
#: A stage's child exits with this code when it has nothing to do here (said why).
EXIT_SKIPPED = 3
#: The check's exit code when there is no GPU or no torch.
EXIT_NO_GPU = 2

#: Wheels the build needs beyond the given Python, installed with pip from the folder named by
#: WHEELS_ENV into DEPS_DIR (the machine has no network). The CUDA backend's CUTLASS
#: convolutions will add the CUTLASS headers wheel, "nvidia-cutlass".
BUILD_WHEELS: tuple[str, ...] = ()
WHEELS_ENV = "COORDGATE_WHEELS"
DEPS_DIR = os.path.join(ROOT, "build", "gpu_check_deps")
#: Inductor's cache for the timing stage: a compile stopped by its budget may leave a partial
#: artifact there, which stays out of the user's own cache.
INDUCTOR_CACHE_DIR = os.path.join(ROOT, "build", "gpu_check_inductor")

#: The CUDA-device tests: the variants of a test parametrized with a CUDA device or the CUDA
#: backend have a parameter id "cuda", first or after a dash ("[cuda-float32]", "[train-cuda]";
#: tests/support.py CUDA, tests/conftest.py DEVICES, tests/triton TRITON_DEVICES,
#: tests/test_gated_conv2d.py FUSED_BACKENDS). Two files have such ids without running on a
#: GPU and are not collected: test_onnx exports CPU tensors under every backend name (and needs
#: onnx), test_triton_runtime checks in subprocesses which kernel copy each device gets (the
#: backends stage checks it on the GPU). tests/test_gpu_check.py checks that this selects every
#: test that a missing GPU skips, and nothing else.
TEST_KEYWORD = "[cuda or -cuda"
TEST_IGNORED = ("tests/test_onnx.py", "tests/triton/test_triton_runtime.py")
TEST_SELECTION = ["tests", "-k", TEST_KEYWORD] + [f"--ignore={path}" for path in TEST_IGNORED]

#: compute-sanitizer's tools, each run on the sample (one small forward+backward per backend).
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
#: The sample: a gated conv (SAMPLE_CHANNELS -> SAMPLE_CHANNELS, 3x3) and a block (conv to 16
#: channels, gate, fused 1x1 mix to 8) of each fused backend, in each dtype and layout, on an
#: input of SAMPLE_INPUT. Its sizes cross every tile edge of both backends' kernels (the
#: largest tile is 128 x 64 x 64), with a partial tile at the end: 2 x 19 x 23 = 874 pixels,
#: 72 channels in and out, reductions of 72 x 3 x 3 = 648 (forward, input gradient) and 874
#: (weight gradient); none is a multiple of 16.
SAMPLE_BACKENDS = ("cuda", "triton")
SAMPLE_DTYPES = ("float32", "bfloat16")
SAMPLE_LAYOUTS = ("NCHW", "channels_last")
SAMPLE_CHANNELS = 72
SAMPLE_INPUT = (2, SAMPLE_CHANNELS, 19, 23)
#: The sample on a side stream against the default stream: the same kernels on the same inputs
#: (a launch on the wrong stream reads the input before the side stream writes it: NaN).
STREAM_TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}

#: (N, Cin, C, kernel, H, W), padding kernel // 2. The design's target shape first, then the
#: five shapes of benchmarks/bench_gated_conv2d.py CPU_SHAPES, its three CUDA_SHAPES first
#: (copied: that file is a pytest module; tests/test_gpu_check.py checks the copy).
TARGET_SHAPE = (8, 64, 64, 3, 512, 512)
BENCH_SHAPES = [
    (8, 64, 64, 3, 128, 128),
    (1, 32, 32, 3, 1024, 1024),
    (2, 3, 64, 3, 512, 512),
    (4, 32, 32, 3, 256, 256),
    (16, 16, 16, 5, 128, 128),
]
TIMING_SHAPES = [TARGET_SHAPE] + BENCH_SHAPES
TIMING_DTYPES = ("bfloat16", "float32")
TIMING_LAYOUTS = ("channels_last", "NCHW")
TIMING_MODES = ("fwd", "fwd+bwd")
#: Baselines first, so that each fused backend's line can print its ratios.
BASELINES = ("cudnn", "compiled_reference", "reference")
FUSED_BACKENDS = ("cuda", "triton")
ENCODER_HIDDEN = 32
#: The fused output against the reference before timing: float32 runs cuDNN in TF32.
CHECK_TOLERANCE = {"float32": 1e-2, "bfloat16": 2e-2}
#: The max-autotune compiles (tens of seconds each) take at most this share of the stage.
COMPILE_SHARE = 0.5
#: The timing stage starts no case with less than this left, to write what it has and exit.
TIMING_MARGIN_S = 10.0
TIMING_METHOD = (
    "Times are medians of triton.testing.do_bench (CUDA events, the L2 cache cleared before "
    "each run, 25 ms of warm-up, 100 ms of runs). TFLOP/s counts 2*N*Ho*Wo*C*(Cin/groups)*kh*kw "
    "per forward, and 3 times that for forward+backward (dgrad and wgrad); GB/s counts the "
    "minimum bytes, x and the weights read once and out written once, also 3 times for "
    "forward+backward. x cuDNN and x compiled are times divided by cuDNN's bare convolution "
    "and by the compiled reference on the same case: below 1 is faster. 'fwd' is a training "
    "forward (input and parameters require grad); 'fwd+bwd' adds the backward of a fixed "
    "output gradient. float32 runs with torch.backends.cudnn.allow_tf32 = True (its default): "
    "cuDNN's convolutions use TF32. compiled_reference is torch.compile(mode='max-autotune') "
    "of the reference layer, compiled and warmed up outside the timer; its CUDA graphs copy "
    "the input into the graph's buffer on each call, as they do for any caller."
)


@dataclasses.dataclass
class Stage:
    """One stage: a child process of this script (``--stage name``) under ``limit_s``
    seconds; ``None`` means whatever the total budget has left. A failure of a ``fatal``
    stage stops the check (nothing else can run without the build)."""

    name: str
    limit_s: float | None
    fatal: bool = False

    def argv(self) -> list[str]:
        """The command of the stage's child process."""
        return [sys.executable, SCRIPT, "--stage", self.name]


STAGES = [
    Stage("info", 15.0),
    Stage("build", 150.0, fatal=True),
    Stage("backends", 15.0, fatal=True),
    Stage("tests", 110.0),
    Stage("stream", 60.0),
    Stage("sanitizer", 75.0),
    Stage("timing", None),
]


@dataclasses.dataclass
class StageResult:
    """What a stage did: result is "pass", "FAIL", "TIMEOUT" or "skipped"."""

    name: str
    limit_s: float
    wall_s: float
    result: str
    note: str = ""


# --------------------------------------------------------------------------------------------
# The orchestrator (standard library only)
# --------------------------------------------------------------------------------------------


def arch_of(capability) -> str:
    """TORCH_CUDA_ARCH_LIST for a compute capability: (9, 0) -> "9.0"."""
    major, minor = capability
    return f"{major}.{minor}"


def no_gpu_message(python: str, reason: str) -> str:
    """The one paragraph printed when the check cannot run here."""
    return (
        f"gpu_check: {reason}, for {python}. `make gpu-check` builds coordgate_ext for the "
        "GPU of this machine and runs the device tests, compute-sanitizer and the timings "
        "against cuDNN on it: run it on a machine with one CUDA GPU and a Python that has a "
        "CUDA build of torch, triton, pytest, hypothesis and ninja, with nvcc (for instance "
        "`PYTHON=python3 make gpu-check`). Nothing was built or written."
    )


def probe(timeout_s: float = PROBE_LIMIT_S) -> dict:
    """{"error": why} when torch or a CUDA device is missing, else the GPU's name, its
    capability and torch's version, from a child process (``--stage probe``)."""
    try:
        proc = subprocess.run([sys.executable, SCRIPT, "--stage", "probe"], capture_output=True, text=True,
                              timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"torch did not answer whether a CUDA device is visible within {timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"the probe failed (exit code {proc.returncode}): {proc.stderr.strip()[-500:]}"}


def child_env(arch: str) -> dict[str, str]:
    """The environment of every stage: this GPU's architecture (the build compiles only it,
    and the tests read it), and the folder of wheels installed for the build, if any."""
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch)
    env.pop("TRITON_INTERPRET", None)
    if BUILD_WHEELS:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [DEPS_DIR, env.get("PYTHONPATH")]))
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's process group, SIGKILL 5 s later if it is still there."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(name: str, argv: list[str], limit_s: float, env: dict[str, str] | None = None) -> StageResult:
    """Runs one stage's command in its own process group, its output going to ours, and
    kills the group at ``limit_s``."""
    print(f"\n== {name} (limit {limit_s:.0f} s)", flush=True)
    env = dict(env if env is not None else os.environ, **{LIMIT_ENV: f"{limit_s:.1f}"})
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        code = None
    except KeyboardInterrupt:
        _kill_group(proc)
        raise
    wall = time.monotonic() - start
    if code is None:
        result, note = "TIMEOUT", f"stopped at its limit of {limit_s:.0f} s"
    elif code == 0:
        result, note = "pass", ""
    elif code == EXIT_SKIPPED:
        result, note = "skipped", "nothing to run here (see its output)"
    else:
        result, note = "FAIL", f"exit code {code}"
    print(f"== {name}: {result} in {wall:.1f} s", flush=True)
    return StageResult(name, limit_s, wall, result, note)


def run_stages(stages: list[Stage], env: dict[str, str], deadline: float,
               argv_of=Stage.argv) -> list[StageResult]:
    """Runs the stages in order, each under its limit (a stage without one gets the time left
    before ``deadline``, less the summary's reserve); after a fatal stage fails, the rest are
    skipped."""
    results = []
    stopped_by = None
    for stage in stages:
        limit = stage.limit_s
        if limit is None:
            limit = deadline - SUMMARY_RESERVE_S - time.monotonic()
        if stopped_by is not None:
            results.append(StageResult(stage.name, limit, 0.0, "skipped", f"{stopped_by} failed"))
            continue
        if limit < TIMING_MIN_S and stage.limit_s is None:
            results.append(StageResult(stage.name, limit, 0.0, "skipped", f"only {limit:.0f} s left"))
            continue
        result = run_stage(stage.name, argv_of(stage), limit, env)
        results.append(result)
        if stage.fatal and result.result != "pass":
            stopped_by = stage.name
    return results


def stage_table(results: list[StageResult]) -> str:
    """The stages as a plain-text table."""
    lines = [f"{'stage':<10} {'limit (s)':>9} {'wall (s)':>9}  result", "-" * 48]
    for r in results:
        note = f"  ({r.note})" if r.note else ""
        lines.append(f"{r.name:<10} {r.limit_s:>9.0f} {r.wall_s:>9.1f}  {r.result}{note}")
    return "\n".join(lines)


def check() -> int:
    """The whole check; the exit code of the script."""
    start = time.monotonic()
    found = probe()
    if "error" in found:
        print(no_gpu_message(f"{sys.executable} (Python {sys.version.split()[0]})", found["error"]), flush=True)
        return EXIT_NO_GPU
    arch = arch_of(found["capability"])
    print(f"gpu_check: {found['name']} (compute capability {arch}), torch {found['torch']}, "
          f"Python {sys.version.split()[0]} at {sys.executable}; budget {TOTAL_BUDGET_S:.0f} s", flush=True)
    shutil.rmtree(RESULTS_DIR, ignore_errors=True)
    os.makedirs(LOGS_DIR)
    results = run_stages(STAGES, child_env(arch), start + TOTAL_BUDGET_S)
    print("\n" + stage_table(results))
    write_summary(RESULTS_DIR, results)
    print(f"\nwrote {os.path.relpath(RESULTS_DIR, ROOT)}/summary.md and results.json "
          f"({time.monotonic() - start:.0f} s in all)")
    return 0 if all(r.result in ("pass", "skipped") for r in results) else 1


# --------------------------------------------------------------------------------------------
# Helpers of the stages (standard library; the stages import torch themselves)
# --------------------------------------------------------------------------------------------


class MissingWheelsError(RuntimeError):
    """The build needs wheels that the folder named by WHEELS_ENV does not provide."""


def missing_wheels_message(requirements, wheels_dir: str | None) -> str | None:
    """None when every requirement has a wheel in ``wheels_dir``, else what is missing and
    how to provide it."""
    if not requirements:
        return None
    names = [re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0] for req in requirements]
    how = (f"on a machine with network, `pip download --no-deps -d wheels {' '.join(requirements)}`, "
           f"copy the folder here and set {WHEELS_ENV}=/path/to/wheels")
    if not wheels_dir:
        return (f"the build needs {', '.join(names)} and this check downloads nothing: {WHEELS_ENV} "
                f"is not set. To provide it: {how}.")
    if not os.path.isdir(wheels_dir):
        return f"{WHEELS_ENV}={wheels_dir} is not a folder. To provide the wheels: {how}."
    wheels = sorted(f for f in os.listdir(wheels_dir) if f.endswith(".whl"))
    absent = [name for name in names
              if not any(f.lower().startswith(re.sub(r"[-_.]+", "_", name).lower() + "-") for f in wheels)]
    if absent:
        return (f"{WHEELS_ENV}={wheels_dir} holds no wheel of {', '.join(absent)} "
                f"(it holds: {', '.join(wheels) or 'no wheels'}). To provide them: {how}.")
    return None


def install_build_wheels(requirements, wheels_dir: str | None, target: str) -> None:
    """Installs ``requirements`` from the local folder ``wheels_dir`` into ``target`` (on the
    stages' PYTHONPATH, see child_env); raises MissingWheelsError saying what is missing."""
    message = missing_wheels_message(requirements, wheels_dir)
    if message is not None:
        raise MissingWheelsError(message)
    if not requirements:
        return
    # --no-deps: the build uses the wheels' files (the CUTLASS headers), not their Python code.
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--upgrade", "--find-links", wheels_dir, "--target", target, *requirements], check=True)


def find_compute_sanitizer() -> str | None:
    """compute-sanitizer on PATH, else in the toolkit (CUDA_HOME, CUDA_PATH, /usr/local/cuda,
    the newest /usr/local/cuda-*)."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    roots += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in filter(None, roots):
        candidate = os.path.join(root, "bin", "compute-sanitizer")
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def stage_limit(name: str) -> float:
    """A stage's time limit, as the orchestrator set it; when the stage is run alone, its
    limit in STAGES (TIMING_ALONE_S for the timing stage)."""
    default = next(stage.limit_s for stage in STAGES if stage.name == name)
    return float(os.environ.get(LIMIT_ENV, default or TIMING_ALONE_S))


def run_parallel(commands: dict[str, list[str]], deadline: float, env: dict[str, str] | None = None,
                 log_dir: str = LOGS_DIR) -> dict[str, tuple[int | None, float, str]]:
    """Runs the commands at once, each writing to ``log_dir``/<label>.log; prints a line as
    each ends; kills those still running at ``deadline``. {label: (exit code, or None when
    killed at the deadline; wall s; log path)}."""
    os.makedirs(log_dir, exist_ok=True)
    running, done = {}, {}
    start = time.monotonic()
    for label, argv in commands.items():
        log_path = os.path.join(log_dir, re.sub(r"[^\w.+-]", "_", label) + ".log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        running[label] = (proc, log_path)
    try:
        while running:
            for label, (proc, log_path) in list(running.items()):
                code = proc.poll()
                if code is None and time.monotonic() < deadline:
                    continue
                if code is None:
                    _kill_group(proc)
                done[label] = (code, time.monotonic() - start, log_path)
                del running[label]
                verdict = "killed at the stage's limit" if code is None else f"exit code {code}"
                print(f"  [{label}] {verdict} after {done[label][1]:.0f} s: {_last_line(log_path)}", flush=True)
            time.sleep(0.2)
    finally:
        for proc, _ in running.values():
            _kill_group(proc)
    return done


def _last_line(path: str) -> str:
    """The last non-empty line of a log."""
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "(no output)"


def _tail(path: str, n: int = 40) -> str:
    """The last ``n`` lines of a log."""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises TimeoutError in the main thread if the block runs longer than ``seconds``; the
    object it yields says whether it did (``expired``), also when the code it interrupted
    wrapped the error in another."""
    state = types.SimpleNamespace(expired=False)

    def expire(signum, frame):
        state.expired = True
        raise TimeoutError(f"stopped after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------
# Performance model and report (standard library)
# --------------------------------------------------------------------------------------------

ITEM_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
#: fwd+bwd = forward + dgrad + wgrad, each the forward's FLOPs and minimum bytes.
MODE_FACTOR = {"fwd": 1, "fwd+bwd": 3}


def case_id(shape) -> str:
    """(N, Cin, C, k, H, W) -> "N8-64to64-k3-512x512", as the CPU benchmarks name it."""
    n, cin, c, k, h, w = shape
    return f"N{n}-{cin}to{c}-k{k}-{h}x{w}"


def flops(shape, mode: str) -> float:
    """2*N*Ho*Wo*C*Cin*k*k per forward (stride 1, padding k // 2, groups 1: Ho, Wo = H, W)."""
    n, cin, c, k, h, w = shape
    return 2.0 * n * h * w * c * cin * k * k * MODE_FACTOR[mode]


def model_bytes(shape, dtype: str, mode: str) -> float:
    """The minimum bytes per forward: x and the weights read once, out written once."""
    n, cin, c, k, h, w = shape
    elements = n * cin * h * w + c * cin * k * k + n * c * h * w
    return float(elements * ITEM_SIZE[dtype] * MODE_FACTOR[mode])


def with_rates(record: dict) -> dict:
    """A timed record with its TFLOP/s and GB/s (by flops and model_bytes)."""
    if record["status"] == "ok":
        record["tflops"] = flops(record["shape"], record["mode"]) / record["ms"] / 1e9
        record["gbps"] = model_bytes(record["shape"], record["dtype"], record["mode"]) / record["ms"] / 1e6
    return record


def add_ratios(records: list[dict]) -> list[dict]:
    """Each timed record with ``x_cudnn`` and ``x_compiled``: its time divided by cuDNN's and
    by the compiled reference's on the same shape, dtype, layout and mode (None without one)."""
    def key(r):
        return (r["case"], r["dtype"], r["layout"], r["mode"])

    times = {(key(r), r["provider"]): r["ms"] for r in records if r.get("status") == "ok"}
    out = []
    for r in records:
        r = dict(r)
        for field, baseline in (("x_cudnn", "cudnn"), ("x_compiled", "compiled_reference")):
            base = times.get((key(r), baseline))
            r[field] = r["ms"] / base if r.get("status") == "ok" and base else None
        out.append(r)
    return out


def _fmt(value, spec: str) -> str:
    """``value`` formatted, or "-" for None."""
    return "-" if value is None else format(value, spec)


def format_record(r: dict) -> str:
    """One measured case as a line of the timing stage's output."""
    head = f"{r['dtype']:<8} {r['layout']:<13} {r['mode']:<7} {r['case']:<22} {r['provider']:<18}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('reason', '')}"
    return (f"{head} {r['ms']:8.4f} ms {r['tflops']:7.1f} TFLOP/s {r['gbps']:7.0f} GB/s "
            f"x cuDNN {_fmt(r.get('x_cudnn'), '.2f')}  x compiled {_fmt(r.get('x_compiled'), '.2f')}")


def read_records(path: str) -> list[dict]:
    """The records of raw.jsonl (a line cut short by a killed stage is left out)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def summary_markdown(info: dict, stages: list[dict], records: list[dict]) -> str:
    """results/gpu/summary.md: the GPU and versions, the stages, one timing table per dtype,
    layout and mode (rows: shape, provider; a case not timed says why in its note)."""
    lines = ["# coordgate_ext GPU check", ""]
    if info:
        lines += [f"- GPU: {info.get('gpu')} (compute capability {info.get('capability')}, "
                  f"{info.get('sm_count')} SMs, {info.get('memory_gib')} GiB), driver {info.get('driver')}",
                  f"- Python {info.get('python')}, torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), "
                  f"cuDNN {info.get('cudnn')}, triton {info.get('triton')}, nvcc {info.get('nvcc')}",
                  f"- {info.get('cpus')} CPU cores; run at {info.get('date')}", ""]
    lines += ["## Stages", "", "| stage | limit (s) | wall (s) | result | note |", "|---|---:|---:|---|---|"]
    lines += [f"| {s['name']} | {s['limit_s']:.0f} | {s['wall_s']:.1f} | {s['result']} | {s['note']} |"
              for s in stages]
    lines += ["", "## Timings", "", TIMING_METHOD, ""]
    records = add_ratios(records)
    if not records:
        lines.append("No case was timed.")
    tables: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        tables.setdefault((r["dtype"], r["layout"], r["mode"]), []).append(r)
    for (dtype, layout, mode), rows in tables.items():
        lines += [f"### {dtype}, {layout}, {mode}", "",
                  "| shape | provider | ms | TFLOP/s | GB/s | x cuDNN | x compiled | note |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if r["status"] == "ok":
                cells = [f"{r['ms']:.4f}", f"{r['tflops']:.1f}", f"{r['gbps']:.0f}",
                         _fmt(r["x_cudnn"], ".2f"), _fmt(r["x_compiled"], ".2f"), ""]
            else:
                cells = [r["status"], "-", "-", "-", "-", r.get("reason", "").replace("|", "\\|")]
            lines.append("| " + " | ".join([r["case"], r["provider"], *cells]) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def write_summary(results_dir: str, stages: list[StageResult]) -> None:
    """Writes summary.md and results.json from info.json, the stages and raw.jsonl."""
    info_path = os.path.join(results_dir, INFO_FILE)
    info = {}
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
    records = read_records(os.path.join(results_dir, RAW_FILE))
    stage_dicts = [dataclasses.asdict(s) for s in stages]
    with open(os.path.join(results_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(info, stage_dicts, records))
    with open(os.path.join(results_dir, "results.json"), "w") as f:
        json.dump({"info": info, "stages": stage_dicts, "method": TIMING_METHOD,
                   "records": add_ratios(records)}, f, indent=1)


# --------------------------------------------------------------------------------------------
# Stages (child processes; these import torch)
# --------------------------------------------------------------------------------------------


def stage_probe() -> int:
    """Prints one JSON line: the GPU's name and capability, or {"error": why not}."""
    import warnings

    try:
        import torch
    except ImportError as exc:
        print(json.dumps({"error": f"torch cannot be imported ({exc})"}))
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if not available:
        build = (f"a CUDA {torch.version.cuda} build" if torch.version.cuda
                 else "a CPU-only build: install a CUDA build of torch")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        notes = [f"CUDA_VISIBLE_DEVICES={visible!r}"] if visible is not None else []
        notes += [f"torch warned: {' '.join(str(w.message).split())}" for w in caught]
        print(json.dumps({"error": f"no CUDA device is visible to torch {torch.__version__} "
                                   f"({'; '.join([build, *notes])})"}))
        return 0
    print(json.dumps({"name": torch.cuda.get_device_name(0), "capability": torch.cuda.get_device_capability(0),
                      "torch": torch.__version__}))
    return 0


def _command_output(argv: list[str], pattern: str = "") -> str | None:
    """The last line of a command's output that contains ``pattern``, or None when it cannot
    run."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in proc.stdout.splitlines() if pattern in line]
    return lines[-1] if proc.returncode == 0 and lines else None


def stage_info() -> int:
    """Prints the versions, the GPU and its compute capability; writes results/gpu/info.json."""
    import platform

    import torch

    import build_config

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    props = torch.cuda.get_device_properties(0)
    toolkit = build_config.toolkit_root()
    info = {
        "gpu": props.name,
        "capability": arch_of(torch.cuda.get_device_capability(0)),
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "device_count": torch.cuda.device_count(),
        "driver": _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "triton": triton_version,
        "cuda_toolkit": toolkit,
        "nvcc": _command_output([os.path.join(toolkit, "bin", "nvcc"), "--version"], "release") if toolkit else None,
        "compute_sanitizer": find_compute_sanitizer(),
        "cpus": os.cpu_count(),
        "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    for key, value in info.items():
        print(f"  {key:<20} {value}")
    if info["device_count"] > 1:
        print("  (more than one GPU is visible: the check uses device 0)")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, INFO_FILE), "w") as f:
        json.dump(info, f, indent=1)
    ok = triton_version is not None and toolkit is not None
    if not ok:
        print("  missing: " + ", ".join(n for n, v in (("triton", triton_version), ("a CUDA toolkit (nvcc)", toolkit))
                                       if v is None))
    return 0 if ok else 1


def stage_build() -> int:
    """Builds coordgate_ext._C in place with the CUDA kernels for TORCH_CUDA_ARCH_LIST only,
    on every core, after installing BUILD_WHEELS from the local folder of wheels."""
    try:
        install_build_wheels(BUILD_WHEELS, os.environ.get(WHEELS_ENV), DEPS_DIR)
    except MissingWheelsError as exc:
        print(f"gpu_check: {exc}")
        return 1
    env = dict(os.environ, COORDGATE_CUDA="1", MAX_JOBS=str(os.cpu_count()))
    print(f"  TORCH_CUDA_ARCH_LIST={env.get('TORCH_CUDA_ARCH_LIST')} MAX_JOBS={env['MAX_JOBS']} "
          f"COORDGATE_CUDA=1 {sys.executable} setup.py --quiet build_ext --inplace", flush=True)
    return subprocess.call([sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"], cwd=ROOT, env=env)


def stage_backends() -> int:
    """The build has CUDA kernels for this GPU's architecture; the cuda and triton backends
    are available; the Triton kernels for CUDA tensors are compiled, not interpreted."""
    import torch

    import coordgate_ext as cg
    from coordgate_ext.triton import _runtime

    info = cg.build_info()
    available = cg.available_backends()
    print(f"  build_info: {info}")
    print(f"  available_backends: {available}")
    module, interpreted = _runtime.kernels_for(torch.device("cuda"))
    checks = {
        "the extension is loaded": info.get("loaded"),
        "the build has CUDA kernels": info.get("cuda_kernels"),
        "backend 'cuda' is available": available["cuda"] is None,
        "backend 'triton' is available": available["triton"] is None,
        "CUDA tensors get compiled Triton kernels": not interpreted and not _runtime.is_interpreted(module),
    }
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch:
        checks[f"the build is for TORCH_CUDA_ARCH_LIST={arch}"] = info.get("cuda_arch_list") == arch
    for what, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    return 0 if all(checks.values()) else 1


def stage_tests() -> int:
    """The CUDA-device tests (TEST_SELECTION), one pytest process per test file, all at once."""
    deadline = time.monotonic() + stage_limit("tests") - 5.0
    collect = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                              "--continue-on-collection-errors", *TEST_SELECTION],
                             cwd=ROOT, capture_output=True, text=True, timeout=max(deadline - time.monotonic(), 1))
    ids = [line for line in collect.stdout.splitlines() if "::" in line]
    # A file that cannot be imported may hold CUDA tests: the stage fails, after running the rest.
    collect_failed = collect.returncode != 0
    if collect_failed:
        print(collect.stdout[-3000:] + collect.stderr[-3000:])
        print("gpu_check: collecting the CUDA tests failed (above); running those collected")
    if not ids:
        return 1
    counts: dict[str, int] = {}
    for test_id in ids:
        path = test_id.split("::")[0]
        counts[path] = counts.get(path, 0) + 1
    print(f"  {len(ids)} CUDA tests in {len(counts)} files (pytest {' '.join(TEST_SELECTION)}), run in parallel")
    # The files run at once: share the cores among them.
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // len(counts))))
    commands = {path: [sys.executable, "-m", "pytest", path, "-q", "-k", TEST_KEYWORD, "-rfEs", "--durations=5"]
                for path in sorted(counts, key=counts.get, reverse=True)}
    done = run_parallel(commands, deadline, env, os.path.join(LOGS_DIR, "tests"))
    failed = [path for path, (code, _, _) in done.items() if code != 0]
    for path in failed:
        print(f"\n  --- {path}: the end of {os.path.relpath(done[path][2], ROOT)}\n{_tail(done[path][2])}")
    return 1 if failed or collect_failed else 0


def sample_run(device, stream=None, fill_first: bool = False) -> dict:
    """One forward+backward of the sample's conv and block (SAMPLE_*) per fused backend, dtype
    and layout, on ``stream`` (the current one if None). With ``fill_first`` the input is
    first filled with NaN and, after a few large matmuls on the same stream, overwritten with
    its values: a kernel launched on another stream reads NaN. {name: tensor} of outputs and
    gradients."""
    import torch

    import coordgate_ext as cg

    results = {}
    stream = stream or torch.cuda.current_stream(device)
    for backend in SAMPLE_BACKENDS:
        for dtype_name in SAMPLE_DTYPES:
            for layout in SAMPLE_LAYOUTS:
                dtype = getattr(torch, dtype_name)
                memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                torch.manual_seed(0)
                layers = {
                    "conv": cg.FusedCoordGateConv2d(SAMPLE_CHANNELS, SAMPLE_CHANNELS, 3, padding=1,
                                                    gate_init="default", backend=backend),
                    "block": cg.FusedCoordGateBlock2d(SAMPLE_CHANNELS, 16, 8, 3, padding=1, gate_init="default",
                                                      backend=backend),
                }
                source = torch.randn(SAMPLE_INPUT, device=device, dtype=dtype).contiguous(
                    memory_format=memory_format)
                for name, layer in layers.items():
                    layer.to(device=device, dtype=dtype)
                    stream.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(stream):
                        if fill_first:
                            x = torch.full_like(source, float("nan"))
                            delay = torch.ones(4096, 4096, device=device)
                            for _ in range(4):
                                delay = delay @ delay
                            x.copy_(source)
                        else:
                            x = source.clone()
                        x.requires_grad_()
                        out = layer(x)
                        out.backward(torch.randn_like(out))
                    key = f"{backend}/{dtype_name}/{layout}/{name}"
                    results[f"{key}/out"] = out.detach()
                    results[f"{key}/grad_input"] = x.grad
                    results.update({f"{key}/grad_{p}": t.grad for p, t in layer.named_parameters()})
    torch.cuda.synchronize(device)
    return results


def stage_sample() -> int:
    """The sample that compute-sanitizer runs."""
    import torch

    results = sample_run(torch.device("cuda"))
    print(f"sample: {len(results)} outputs and gradients of backends {', '.join(SAMPLE_BACKENDS)}")
    return 0


def stage_stream() -> int:
    """The sample on a non-default stream equals the sample on the default stream (the first
    run also compiles the sample's Triton kernels, which compute-sanitizer's runs then load
    from Triton's cache)."""
    import torch

    device = torch.device("cuda")
    expected = sample_run(device)
    side = torch.cuda.Stream(device)
    assert side != torch.cuda.default_stream(device)
    got = sample_run(device, stream=side, fill_first=True)
    failed = []
    for name, want in expected.items():
        tol = STREAM_TOLERANCE[name.split("/")[1]]
        try:
            torch.testing.assert_close(got[name], want, rtol=tol, atol=tol)
        except AssertionError as exc:
            failed.append(f"{name}: {str(exc).splitlines()[0]}")
    print(f"  {len(expected)} outputs and gradients on stream {side.cuda_stream:#x} against the default stream: "
          f"{len(expected) - len(failed)} equal")
    for line in failed:
        print(f"  FAIL {line}")
    return 1 if failed else 0


def stage_sanitizer() -> int:
    """compute-sanitizer's memcheck, racecheck and synccheck on the sample, all at once."""
    exe = find_compute_sanitizer()
    if exe is None:
        print("  compute-sanitizer was found neither on PATH nor under CUDA_HOME, CUDA_PATH or "
              "/usr/local/cuda*/bin: install the CUDA toolkit's compute-sanitizer to run this stage")
        return EXIT_SKIPPED
    deadline = time.monotonic() + stage_limit("sanitizer") - 5.0
    # API errors are left out: torch itself makes calls that fail by design (queries of events
    # not yet complete); a failed launch of ours raises in Python and fails the sample anyway.
    commands = {tool: [exe, "--tool", tool, "--error-exitcode", "1", "--report-api-errors", "no",
                       "--target-processes", "application-only", sys.executable, SCRIPT, "--stage", "sample"]
                for tool in SANITIZER_TOOLS}
    # Without the caching allocator each tensor is its own allocation, whose end memcheck sees.
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    print(f"  {exe}: {', '.join(SANITIZER_TOOLS)} on the sample, in parallel", flush=True)
    done = run_parallel(commands, deadline, env, os.path.join(LOGS_DIR, "sanitizer"))
    failed = [tool for tool, (code, _, _) in done.items() if code != 0]
    for tool in failed:
        print(f"\n  --- {tool}: the end of {os.path.relpath(done[tool][2], ROOT)}\n{_tail(done[tool][2])}")
    return 1 if failed else 0


def gpu_timer(fn, grad_to_none) -> tuple[float, float, float]:
    """(p20, median, p80) ms of ``fn`` by triton.testing.do_bench."""
    from triton.testing import do_bench

    p20, p50, p80 = do_bench(fn, grad_to_none=grad_to_none, quantiles=[0.2, 0.5, 0.8])
    return p20, p50, p80


def _first_line(exc: BaseException) -> str:
    """An exception's type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


class _Group:
    """One shape, dtype and layout: the reference layer, the input (requiring grad), a fixed
    output gradient and the reference output for the fused backends' check."""

    def __init__(self, shape, dtype: str, layout: str, device):
        import torch

        import coordgate_ext as cg

        n, cin, c, k, h, w = shape
        torch.manual_seed(0)
        self.dtype = getattr(torch, dtype)
        # nn.Linear's initialisation: a gate that varies over the field, as a trained one does.
        self.layer = cg.FusedCoordGateConv2d(cin, c, k, padding=k // 2, encoder_hidden=ENCODER_HIDDEN,
                                             gate_init="default", device=device, dtype=self.dtype,
                                             backend="reference")
        memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        self.x = torch.randn(n, cin, h, w, device=device, dtype=self.dtype).contiguous(
            memory_format=memory_format).requires_grad_()
        with torch.no_grad():
            self.expected = self.layer(self.x)
        self.grad = torch.randn_like(self.expected)

    def fused(self, backend: str):
        """A copy of the layer on ``backend``."""
        import copy

        layer = copy.deepcopy(self.layer)
        layer.backend = backend
        return layer

    def check(self, module, dtype: str) -> tuple[str, str] | None:
        """None when ``module``'s output matches the reference within CHECK_TOLERANCE, else
        ("FAIL", what differs) or ("error", the exception)."""
        import torch

        tol = CHECK_TOLERANCE[dtype]
        try:
            with torch.no_grad():
                got = module(self.x)
            torch.testing.assert_close(got, self.expected, rtol=tol, atol=tol)
        except AssertionError as exc:
            return "FAIL", f"differs from the reference beyond rtol = atol = {tol}: " + " ".join(str(exc).split())[:300]
        except Exception as exc:  # noqa: BLE001 (recorded; the other providers run)
            return "error", _first_line(exc)
        return None


def _step(module, x, grad, mode: str, mark_step: bool = False):
    """The timed call: a training forward, or forward and backward."""
    import torch

    def run():
        if mark_step:
            # CUDA graphs of the compiled module: each call starts a new step (no pending backward).
            torch.compiler.cudagraph_mark_step_begin()
        out = module(x)
        if mode == "fwd+bwd":
            out.backward(grad)

    return run


def run_timing(raw_path: str, *, device, fused, timer, deadline: float, compile_deadline: float,
               shapes=TIMING_SHAPES, dtypes=TIMING_DTYPES, layouts=TIMING_LAYOUTS, modes=TIMING_MODES,
               clock=time.monotonic) -> list[dict]:
    """Times every case, most informative first (shape, then dtype and layout, then mode,
    then provider: BASELINES, then ``fused``), appending one JSON line per case to
    ``raw_path`` as soon as it is measured, and printing it. A fused backend whose output
    differs from the reference is recorded FAIL, not timed; an exception is recorded as an
    error. The max-autotune compiles stop at ``compile_deadline`` (compiled_reference is then
    recorded skipped); cases not started by ``deadline`` are recorded skipped.
    ``timer(fn, grad_to_none)`` returns (p20, median, p80) ms."""
    import torch

    records = []
    providers = BASELINES + tuple(fused)
    with open(raw_path, "a") as raw:
        def emit(base: dict, provider: str, **fields) -> None:
            record = with_rates(dict(base, provider=provider, **fields))
            raw.write(json.dumps(record) + "\n")
            raw.flush()
            records.append(record)
            print("  " + format_record(add_ratios(records)[-1]), flush=True)

        for shape in shapes:
            for dtype in dtypes:
                for layout in layouts:
                    bases = [dict(case=case_id(shape), shape=list(shape), dtype=dtype, layout=layout, mode=mode)
                             for mode in modes]
                    if clock() > deadline:
                        not_timed = {p: ("skipped", "the stage's time was spent") for p in providers}
                        modules = {}
                    else:
                        modules, not_timed, compile_deadline = _group_modules(
                            shape, dtype, layout, device, fused, compile_deadline, clock)
                    group = modules.pop("group", None)
                    for base in bases:
                        for provider in providers:
                            if provider in not_timed:
                                status, reason = not_timed[provider]
                                emit(base, provider, status=status, reason=reason)
                            elif clock() > deadline:
                                emit(base, provider, status="skipped", reason="the stage's time was spent")
                            else:
                                emit(base, provider, **_measure(modules[provider], group, base["mode"], timer,
                                                                 mark_step=provider == "compiled_reference"))
                    del group, modules
                    torch.compiler.reset()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return records


def _group_modules(shape, dtype: str, layout: str, device, fused, compile_deadline: float, clock):
    """({provider: callable module, "group": its _Group}, {provider: (status, reason) of those
    not to time}, the compile deadline after this group's compile)."""
    import torch.nn.functional as F

    try:
        group = _Group(shape, dtype, layout, device)
    except Exception as exc:  # noqa: BLE001 (out of memory, for one: the next group may fit)
        reason = f"setting up the case failed: {_first_line(exc)}"
        return {}, {p: ("error", reason) for p in BASELINES + tuple(fused)}, compile_deadline
    layer = group.layer
    modules = {
        "group": group,
        "cudnn": lambda inp: F.conv2d(inp, layer.weight, layer.bias, layer.stride, layer.padding,
                                      layer.dilation, layer.groups),
        "reference": layer,
    }
    not_timed = {}
    compiled, why_not, compile_deadline = _compile(group, compile_deadline, clock)
    if compiled is None:
        not_timed["compiled_reference"] = why_not
    else:
        modules["compiled_reference"] = compiled
    for backend in fused:
        modules[backend] = group.fused(backend)
        verdict = group.check(modules[backend], dtype)
        if verdict is not None:
            not_timed[backend] = verdict
    return modules, not_timed, compile_deadline


def _compile(group: _Group, compile_deadline: float, clock):
    """(compiled module or None, (status, reason) or None, the compile deadline after it): the
    reference layer under torch.compile(mode="max-autotune"), compiled and warmed up by one
    forward and backward, stopped at ``compile_deadline``."""
    import torch

    left = compile_deadline - clock()
    if left <= 0:
        return None, ("skipped", "the compile budget was spent"), compile_deadline
    torch.compiler.reset()  # a fresh compile per case, under no recompile limit
    compiled = torch.compile(group.layer, mode="max-autotune")
    start = clock()
    try:
        with time_limit(left) as limit:
            _step(compiled, group.x, group.grad, "fwd+bwd", mark_step=True)()
            if group.x.is_cuda:
                torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 (any compile error is recorded, not raised)
        torch.compiler.reset()
        if limit.expired:
            return None, ("skipped", f"compile stopped: the compile budget was spent ({left:.0f} s left)"), clock()
        return None, ("error", f"compile failed: {_first_line(exc)}"), compile_deadline
    print(f"  compiled the reference with max-autotune for x of {tuple(group.x.shape)} {group.x.dtype} "
          f"in {clock() - start:.1f} s", flush=True)
    return compiled, None, compile_deadline


def _measure(module, group: _Group, mode: str, timer, mark_step: bool) -> dict:
    """{status, ms, ms_p20, ms_p80, first_call_s} of one provider, or {status: "error", reason}."""
    import torch

    run = _step(module, group.x, group.grad, mode, mark_step)
    params = list(module.parameters()) if isinstance(module, torch.nn.Module) else [group.layer.weight,
                                                                                    group.layer.bias]
    grads = [group.x, *params]
    try:
        start = time.perf_counter()
        run()
        if group.x.is_cuda:
            torch.cuda.synchronize()
        first = time.perf_counter() - start
        p20, p50, p80 = timer(run, grads)
    except Exception as exc:  # noqa: BLE001 (a provider's error is recorded, the others run)
        return {"status": "error", "reason": _first_line(exc)}
    finally:
        for t in grads:
            t.grad = None
    return {"status": "ok", "ms": p50, "ms_p20": p20, "ms_p80": p80, "first_call_s": first}


def stage_timing() -> int:
    """Times the cases of run_timing on the GPU, within this stage's limit; the compiles take
    at most COMPILE_SHARE of it."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", INDUCTOR_CACHE_DIR)
    import torch

    import coordgate_ext as cg

    limit = stage_limit("timing")
    start = time.monotonic()
    deadline = start + limit - TIMING_MARGIN_S
    torch.backends.cudnn.allow_tf32 = True
    available = cg.available_backends()
    fused = [b for b in FUSED_BACKENDS if available[b] is None]
    print(f"  fused backends: {', '.join(fused) or 'none'}; float32 with torch.backends.cudnn.allow_tf32 "
          f"= True (cuDNN's default: TF32 convolutions); compiles take at most {COMPILE_SHARE * limit:.0f} s",
          flush=True)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    records = run_timing(os.path.join(RESULTS_DIR, RAW_FILE), device=torch.device("cuda"), fused=fused,
                         timer=gpu_timer, deadline=deadline, compile_deadline=start + COMPILE_SHARE * limit)
    bad = [r for r in records if r["status"] in ("FAIL", "error")]
    print(f"  {sum(r['status'] == 'ok' for r in records)} cases timed, {len(bad)} failed, "
          f"{sum(r['status'] == 'skipped' for r in records)} skipped")
    return 1 if bad else 0


STAGE_BODIES = {
    "probe": stage_probe,
    "info": stage_info,
    "build": stage_build,
    "backends": stage_backends,
    "tests": stage_tests,
    "stream": stage_stream,
    "sample": stage_sample,
    "sanitizer": stage_sanitizer,
    "timing": stage_timing,
}


def main(argv: list[str] | None = None) -> int:
    """The whole check, or with --stage one stage's body; the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=sorted(STAGE_BODIES),
                        help="run one stage's body in this process (what the check runs in a child)")
    args = parser.parse_args(argv)
    if args.stage is None:
        return check()
    sys.path.insert(0, ROOT)
    return STAGE_BODIES[args.stage]()


if __name__ == "__main__":
    sys.exit(main())
