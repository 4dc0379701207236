"""benchmarks/gpu_check.sh, the one-call GPU check: its plumbing in a dry run here (CUDA steps skipped)."""

import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_dry_run_leaves_a_summary_and_one_tar_file(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(os.listdir(out)) == ["gpu_check.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    for step in ("device", "build", "tests", "kernel-benchmarks", "engine-benchmarks", "zoo-models", "sophia-example"):
        assert f"=== {step}: ok, " in summary, summary  # each step says how it ended and how long it took
    assert "=== memcheck: skipped (dry run: no GPU)" in summary
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        names = {os.path.basename(name) for name in archive.getnames()}
    assert {
        "summary.txt",
        "build.log",
        "tests.log",
        "kernels_cpu.json",
        "backprop_cpu_batch4.json",
        "sophia_training.json",
        "gpu_zoo_cpu.json",
    } <= names, names


def test_a_step_that_runs_out_of_time_is_told_apart_from_a_failure(tmp_path):
    script = f"""
        WORK={tmp_path}; SUMMARY={tmp_path}/summary.txt; started=$(date +%s)
        source benchmarks/gpu_check_steps.sh
        step slow 1 sleep 5; step broken 5 false; step fine 5 true
        cat $SUMMARY
    """
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "=== slow: TIMED OUT after 1 s" in result.stdout, result.stdout + result.stderr
    assert "=== broken: FAILED (exit 1)" in result.stdout
    assert "=== fine: ok" in result.stdout
