"""scripts/gpu_check.py (`make gpu-check`) where there is no GPU: it stops at once and says
why; its helpers (architecture string, performance model, stage runner, wheels, summary) and
its timing loop, run on CPU tensors with a CPU clock; its selection of the GPU tests."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")

# The test names here avoid the selection's keyword, so that the check does not run them.
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the check would run")


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@no_gpu
def test_without_a_gpu_it_stops_at_once_and_says_why():
    start = time.monotonic()
    proc = subprocess.run([sys.executable, SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device is visible to torch" in proc.stdout
    assert "run it on a machine with one CUDA GPU" in proc.stdout
    assert "Nothing was built or written" in proc.stdout


def test_without_torch_the_probe_says_so():
    # -S: no site-packages, so no torch.
    proc = subprocess.run([sys.executable, "-S", SCRIPT, "--stage", "probe"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "torch cannot be imported" in json.loads(proc.stdout.splitlines()[-1])["error"]


def test_arch_of_a_capability(gc):
    assert gc.arch_of((9, 0)) == "9.0"
    assert gc.arch_of((8, 6)) == "8.6"
    assert gc.arch_of((10, 0)) == "10.0"


def test_performance_model_of_the_target_shape(gc):
    # DESIGN.md section 7: 154.6 GFLOP forward; x, W and out are about 537 MB in bfloat16.
    assert gc.flops(gc.TARGET_SHAPE, "fwd") == 2 * 8 * 512 * 512 * 64 * 64 * 9 == 154_618_822_656
    assert gc.flops(gc.TARGET_SHAPE, "fwd+bwd") == 3 * gc.flops(gc.TARGET_SHAPE, "fwd")
    x = out = 8 * 64 * 512 * 512
    assert gc.model_bytes(gc.TARGET_SHAPE, "bfloat16", "fwd") == 2 * (x + 64 * 64 * 9 + out) == 536_944_640
    assert gc.model_bytes(gc.TARGET_SHAPE, "float32", "fwd+bwd") == 3 * 4 * (x + 64 * 64 * 9 + out)
    assert gc.case_id(gc.TARGET_SHAPE) == "N8-64to64-k3-512x512"


def test_timing_shapes_are_the_benchmarks_shapes(gc):
    source = open(os.path.join(ROOT, "benchmarks", "bench_gated_conv2d.py")).read()
    lists = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(source).body
             if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) in ("CPU_SHAPES", "CUDA_SHAPES")}
    assert sorted(gc.BENCH_SHAPES) == sorted(lists["CPU_SHAPES"])
    assert gc.BENCH_SHAPES[:len(lists["CUDA_SHAPES"])] == lists["CUDA_SHAPES"]
    assert gc.TIMING_SHAPES == [gc.TARGET_SHAPE] + gc.BENCH_SHAPES
    assert gc.TARGET_SHAPE == (8, 64, 64, 3, 512, 512)


def test_stage_limits_fit_the_total_budget(gc):
    open_ended = [s for s in gc.STAGES if s.limit_s is None]
    assert [s.name for s in open_ended] == ["timing"]
    fixed = sum(s.limit_s for s in gc.STAGES if s.limit_s is not None)
    assert fixed + gc.PROBE_LIMIT_S + gc.TIMING_MIN_S + gc.SUMMARY_RESERVE_S <= gc.TOTAL_BUDGET_S == 480
    assert [s.name for s in gc.STAGES if s.fatal] == ["build", "backends"]


def _records(gc, dtype="bfloat16", layout="channels_last", mode="fwd"):
    base = dict(case=gc.case_id(gc.TARGET_SHAPE), shape=list(gc.TARGET_SHAPE), dtype=dtype, layout=layout,
                mode=mode)
    timed = {"cudnn": 1.0, "compiled_reference": 2.0, "reference": 4.0, "triton": 0.5}
    records = [gc.with_rates(dict(base, provider=p, status="ok", ms=ms)) for p, ms in timed.items()]
    records.append(dict(base, provider="cuda", status="FAIL", reason="differs from the reference"))
    return records


def test_summary_rows_and_ratios(gc, tmp_path):
    records = _records(gc) + _records(gc, "float32", "NCHW", "fwd+bwd")
    with open(tmp_path / gc.RAW_FILE, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write('{"case": "cut short')  # the line a killed stage leaves
    stages = [gc.StageResult("build", 150, 61.5, "pass"), gc.StageResult("timing", 230, 230.4, "TIMEOUT", "x")]
    gc.write_summary(str(tmp_path), stages)
    text = (tmp_path / "summary.md").read_text()
    assert "| build | 150 | 61.5 | pass |  |" in text
    assert "| timing | 230 | 230.4 | TIMEOUT | x |" in text
    assert "### bfloat16, channels_last, fwd\n" in text
    assert "### float32, NCHW, fwd+bwd\n" in text
    # 154.6 GFLOP in 0.5 ms; 536.9 MB in 0.5 ms; 0.5 / 1.0 of cuDNN, 0.5 / 2.0 of compiled.
    assert "| N8-64to64-k3-512x512 | triton | 0.5000 | 309.2 | 1074 | 0.50 | 0.25 |  |" in text
    assert "| N8-64to64-k3-512x512 | cudnn | 1.0000 | 154.6 | 537 | 1.00 | 0.50 |  |" in text
    assert "| N8-64to64-k3-512x512 | reference | 4.0000 | 38.7 | 134 | 4.00 | 2.00 |  |" in text
    assert "| N8-64to64-k3-512x512 | cuda | FAIL | - | - | - | - | differs from the reference |" in text
    # forward+backward: 3x the FLOPs and bytes of the float32 forward.
    assert "| N8-64to64-k3-512x512 | triton | 0.5000 | 927.7 | 6443 | 0.50 | 0.25 |  |" in text
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["records"]) == len(records)
    assert saved["records"][3]["x_cudnn"] == 0.5 and saved["records"][3]["x_compiled"] == 0.25
    assert saved["stages"][1]["result"] == "TIMEOUT"


def test_stage_runner_goes_on_after_a_timeout(gc, tmp_path):
    pid_file = tmp_path / "grandchild"
    commands = {
        # a stage whose own child outlives it unless the whole group is killed
        "slow": [sys.executable, "-c", "import subprocess, sys, time; "
                 f"p = subprocess.Popen(['sleep', '60']); open({str(pid_file)!r}, 'w').write(str(p.pid)); "
                 "time.sleep(60)"],
        "fails": [sys.executable, "-c", "raise SystemExit(1)"],
        "after": [sys.executable, "-c", "print('ran')"],
        "skips": [sys.executable, "-c", f"raise SystemExit({gc.EXIT_SKIPPED})"],
    }
    stages = [gc.Stage("slow", 1.0), gc.Stage("fails", 10.0, fatal=True), gc.Stage("after", 10.0)]
    start = time.monotonic()
    results = gc.run_stages(stages, dict(os.environ), time.monotonic() + 100,
                            argv_of=lambda stage: commands[stage.name])
    assert time.monotonic() - start < 20
    assert [(r.name, r.result) for r in results] == [("slow", "TIMEOUT"), ("fails", "FAIL"), ("after", "skipped")]
    assert results[0].wall_s < 10 and results[2].note == "fails failed"
    grandchild = int(pid_file.read_text())
    time.sleep(0.5)
    status = f"/proc/{grandchild}/status"
    assert not os.path.exists(status) or "zombie" in open(status).read(), "the stage's child survived"

    (skipped,) = gc.run_stages([gc.Stage("skips", 10.0)], dict(os.environ), time.monotonic() + 100,
                               argv_of=lambda stage: commands[stage.name])
    assert skipped.result == "skipped"
    (late,) = gc.run_stages([gc.Stage("after", None)], dict(os.environ), time.monotonic() + 10)
    assert late.result == "skipped" and "left" in late.note


def test_parallel_runner_kills_at_the_deadline(gc, tmp_path):
    commands = {"quick": [sys.executable, "-c", "print('done')"],
                "slow": [sys.executable, "-c", "import time; time.sleep(60)"]}
    start = time.monotonic()
    done = gc.run_parallel(commands, time.monotonic() + 2, log_dir=str(tmp_path))
    assert time.monotonic() - start < 15
    assert done["quick"][0] == 0 and open(done["quick"][2]).read() == "done\n"
    assert done["slow"][0] is None


def test_time_limit_interrupts_a_block(gc):
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        with gc.time_limit(0.3):
            time.sleep(10)
    assert time.monotonic() - start < 3


def test_missing_wheels_say_what_and_how(gc, tmp_path):
    assert gc.missing_wheels_message((), None) is None
    unset = gc.missing_wheels_message(("nvidia-cutlass",), None)
    assert "COORDGATE_WHEELS is not set" in unset and "pip download --no-deps -d wheels nvidia-cutlass" in unset
    assert "is not a folder" in gc.missing_wheels_message(("nvidia-cutlass",), str(tmp_path / "absent"))
    (tmp_path / "other-1.0-py3-none-any.whl").write_text("")
    absent = gc.missing_wheels_message(("nvidia-cutlass>=3.5",), str(tmp_path))
    assert "holds no wheel of nvidia-cutlass (it holds: other-1.0-py3-none-any.whl)" in absent
    with pytest.raises(gc.MissingWheelsError, match="holds no wheel of nvidia-cutlass"):
        gc.install_build_wheels(("nvidia-cutlass",), str(tmp_path), str(tmp_path / "deps"))
    (tmp_path / "nvidia_cutlass-3.5.0-py3-none-any.whl").write_text("")
    assert gc.missing_wheels_message(("nvidia-cutlass>=3.5",), str(tmp_path)) is None


def test_compute_sanitizer_is_found_on_path_or_in_the_toolkit(gc, tmp_path, monkeypatch):
    tool = tmp_path / "bin" / "compute-sanitizer"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert gc.find_compute_sanitizer() == str(tool)
    monkeypatch.setenv("PATH", str(tool.parent))
    assert gc.find_compute_sanitizer() == str(tool)


def _cpu_timer(fn, grad_to_none):
    """(p20, median, p80) ms of three runs: the CPU stand-in for triton.testing.do_bench."""
    times = []
    for _ in range(3):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[0], statistics.median(times), times[-1]


def test_timing_loop_on_cpu_tensors(gc, tmp_path):
    """The GPU timing loop, run on CPU tensors with the C++ CPU backend as the fused one."""
    raw = str(tmp_path / gc.RAW_FILE)
    now = time.monotonic()
    records = gc.run_timing(raw, device=torch.device("cpu"), fused=["cpu"], timer=_cpu_timer,
                            deadline=now + 600, compile_deadline=now, shapes=[(2, 4, 6, 3, 9, 11)],
                            dtypes=("float32",))
    assert gc.read_records(raw) == records
    order = [(r["layout"], r["mode"], r["provider"]) for r in records]
    assert order == [(layout, mode, p) for layout in ("channels_last", "NCHW") for mode in ("fwd", "fwd+bwd")
                     for p in ("cudnn", "compiled_reference", "reference", "cpu")]
    for r in records:
        if r["provider"] == "compiled_reference":
            assert (r["status"], r["reason"]) == ("skipped", "the compile budget was spent")
        else:
            assert r["status"] == "ok" and r["ms"] > 0 and r["ms_p20"] <= r["ms"] <= r["ms_p80"], r
            assert r["tflops"] == pytest.approx(gc.flops(r["shape"], r["mode"]) / r["ms"] / 1e9)
    with_ratios = gc.add_ratios(records)
    assert all(r["x_cudnn"] is not None and r["x_compiled"] is None for r in with_ratios
               if r["status"] == "ok")

    late = gc.run_timing(str(tmp_path / "late.jsonl"), device=torch.device("cpu"), fused=["cpu"],
                         timer=_cpu_timer, deadline=now - 1, compile_deadline=now - 1,
                         shapes=[(1, 2, 2, 3, 5, 5)], dtypes=("float32",), layouts=("NCHW",))
    assert [(r["status"], r["reason"]) for r in late] == [("skipped", "the stage's time was spent")] * 8


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_compile_budget_stops_a_compile_and_the_loop_goes_on(gc, tmp_path, monkeypatch):
    """A compile that outlasts its budget (here one that would take a minute) is stopped at
    the budget, and the next case compiles nothing."""

    def slow_compile(module, **options):
        def compiled(x):
            time.sleep(60)
            return module(x)

        return compiled

    monkeypatch.setattr(torch, "compile", slow_compile)
    now = time.monotonic()
    records = gc.run_timing(str(tmp_path / gc.RAW_FILE), device=torch.device("cpu"), fused=[],
                            timer=_cpu_timer, deadline=now + 600, compile_deadline=now + 1,
                            shapes=[(1, 2, 2, 3, 5, 5)], dtypes=("float32",), modes=("fwd",))
    assert time.monotonic() - now < 15
    compiled = [(r["status"], r["reason"]) for r in records if r["provider"] == "compiled_reference"]
    assert compiled == [("skipped", "compile stopped: the compile budget was spent (1 s left)"),
                        ("skipped", "the compile budget was spent")]
    assert all(r["status"] == "ok" for r in records if r["provider"] != "compiled_reference")


def test_timing_loop_records_a_wrong_backend_instead_of_timing_it(gc, tmp_path, monkeypatch):
    class OffByOne(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x) + 1

    monkeypatch.setattr(gc._Group, "fused", lambda group, backend: OffByOne(group.layer))
    now = time.monotonic()
    records = gc.run_timing(str(tmp_path / gc.RAW_FILE), device=torch.device("cpu"), fused=["cpu"],
                            timer=_cpu_timer, deadline=now + 600, compile_deadline=now,
                            shapes=[(1, 2, 2, 3, 5, 5)], dtypes=("bfloat16",), layouts=("NCHW",), modes=("fwd",))
    (wrong,) = [r for r in records if r["provider"] == "cpu"]
    assert wrong["status"] == "FAIL" and "differs from the reference beyond rtol = atol = 0.02" in wrong["reason"]
    assert "ms" not in wrong


COLLECTOR = '''
import json, os

DESELECTED = []


def _gpu_only(item):
    """Whether a missing CUDA device skips the item (its skip condition was computed here)."""
    return any(mark.args and mark.args[0] is True and "CUDA" in str(mark.kwargs.get("reason", ""))
               for mark in item.iter_markers("skipif"))


def pytest_deselected(items):
    DESELECTED.extend(items)


def pytest_collection_finish(session):
    with open(os.environ["COLLECTED"], "w") as f:
        json.dump({"selected": {i.nodeid: _gpu_only(i) for i in session.items},
                   "deselected": {i.nodeid: _gpu_only(i) for i in DESELECTED}}, f)
'''


@no_gpu
def test_selection_is_exactly_the_gpu_variants(gc, tmp_path):
    """The script's selection collects the tests that a missing CUDA device skips, all of
    them outside the files it ignores, and nothing else: on a GPU machine it runs each
    backend's CUDA-device variants."""
    (tmp_path / "collector.py").write_text(COLLECTOR)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), COLLECTED=str(tmp_path / "collected.json"))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "collector",
                           *gc.TEST_SELECTION], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = json.loads((tmp_path / "collected.json").read_text())
    selected, deselected = collected["selected"], collected["deselected"]
    assert len(selected) > 100
    assert [test for test, gpu_only in selected.items() if not gpu_only] == [], "selected, yet run without a GPU"
    assert [test for test, gpu_only in deselected.items() if gpu_only] == [], "GPU-only, yet left out"
    assert not any(test.startswith(gc.TEST_IGNORED) for test in selected)
