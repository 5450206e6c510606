"""The one-call GPU check (benchmarks/gpu_check.sh) and its scripts, tested without a GPU: the schedule in
dry-run mode (deadline, caps, files brought back), cuda_exercise.py and gpu_perf.py on the CPU kernels,
and gpu_report.py on what gpu_perf.py wrote."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import requires_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
MAX_FILES_BACK = 8  # the device tool brings back at most 8 files, none deeper than 2 folders


def dry_run(out, **env):
    start = time.monotonic()
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OUT": str(out), "DRY_RUN": "1", **{k: str(v) for k, v in env.items()}})
    return proc, time.monotonic() - start


def assert_fits_device_tool(out):
    entries = list(out.iterdir())
    assert all(e.is_file() for e in entries), entries
    assert len(entries) <= MAX_FILES_BACK, sorted(e.name for e in entries)


def test_dry_run_every_step_in_order(tmp_path):
    proc, _ = dry_run(tmp_path, BUDGET=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.txt").read_text()
    steps = ["build", "exercise", "perf", "memcheck", "racecheck", "pytest", "ncu"]
    positions = [summary.index(f"{step}: ok") for step in steps]
    assert positions == sorted(positions), summary
    assert "every step that ran passed" in summary
    sanitizer = (tmp_path / "sanitizer.log").read_text()
    assert "compute-sanitizer --tool memcheck" in sanitizer and "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in sanitizer
    assert "--tool racecheck" in sanitizer
    assert "-k cuda" in (tmp_path / "pytest.log").read_text()
    assert_fits_device_tool(tmp_path)


def test_dry_run_caps_and_deadline(tmp_path):
    """A step past its cap is stopped; the next gets only what is left of the budget; once too little is
    left, the rest are skipped; the call ends within the budget; the failure's log tail is in the summary."""
    proc, took = dry_run(tmp_path, BUDGET=10, MIN_STEP=2, DRY_SLEEP_perf=60, CAP_perf=3, DRY_SLEEP_memcheck=60)
    assert proc.returncode == 1
    summary = (tmp_path / "summary.txt").read_text()
    assert "perf: TIMED OUT after 3 s (cap 3 s)" in summary, summary
    assert "memcheck: TIMED OUT" in summary
    for step in ("racecheck", "pytest", "ncu"):
        assert f"{step}: skipped" in summary
    assert "dry run: python3 -m benchmarks.gpu_perf" in summary  # the failed step's log tail
    assert took < 10 + 8, took
    assert_fits_device_tool(tmp_path)


def test_dry_run_no_time_for_the_build_is_a_failure(tmp_path):
    proc, _ = dry_run(tmp_path, BUDGET=1)
    assert proc.returncode == 1
    assert "nothing else can run" in (tmp_path / "summary.txt").read_text()


@requires_extension()
def test_cuda_exercise_logic_on_cpu_kernels():
    proc = subprocess.run([sys.executable, "benchmarks/cuda_exercise.py", "--device", "cpu", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for op in ("centered", "masked_uniform_", "linear_act"):
        assert f"{op}: ok" in proc.stdout


@requires_extension()
def test_gpu_perf_smoke_and_report(tmp_path):
    perf = tmp_path / "perf.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_perf", "--device", "cpu", "--smoke", "--no-compile",
                           "--min-run-time", "0.01", "--out", str(perf)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(perf.read_text())["results"]
    assert not [r for r in results if r["name"] == "error"], results
    assert {r["section"] for r in results} == {"bandwidth", "gemm", "centered", "masked_uniform_", "linear_act"}
    (tmp_path / "summary.txt").write_text("gpu: NVIDIA H200, 580.00, 143771 MiB\nbuild: ok (5 s)\n")
    (tmp_path / "sanitizer.log").write_text("=== memcheck (cap 120 s): ...\n========= ERROR SUMMARY: 0 errors\n")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_report", str(tmp_path), "--results-dir",
                           str(tmp_path / "results")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "results" / "gpu_check.md").read_text()
    assert "| hand-written GEMM vs cuBLAS, float32 4096³ (TF32 off) |" in md
    assert "NVIDIA H200, 580.00" in md and "ERROR SUMMARY: 0 errors" in md and "smoke run" in md
    assert json.loads((tmp_path / "results" / "gpu_check.json").read_text())["results"] == results
