"""Timing shared by the benchmarks: CUDA events on the GPU (no host timing of queued work), a wall clock on the CPU."""

import json
import os
import statistics
import subprocess
import time

import torch


def time_once(run, device):
    """Seconds of one call of run()."""
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def median_seconds(run, device, repeats=20, warmup=3):
    """Median seconds of `repeats` calls after `warmup` calls (allocator, kernels, caches)."""
    for _ in range(warmup):
        run()
    return statistics.median(time_once(run, device) for _ in range(repeats))


def measured_commit():
    """The commit the numbers belong to (with '+changes' when the tree had uncommitted edits)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("+changes" if dirty else "")


def time_cell(row, method, digits=2, say_why=False):
    """A table cell: milliseconds of row[method] and its ratio to row["gradient"], or why it was skipped."""
    result = row[method]
    if "seconds" not in result:
        return result.get("skipped", "skipped") if say_why else "skipped"
    text = f"{result['seconds'] * 1e3:.{digits}f} ms"
    gradient = row["gradient"].get("seconds")
    if gradient and method != "gradient":
        text += f" ({result['seconds'] / gradient:.1f}x grad)"
    return text


def memory_cell(row, method, digits=1):
    """A table cell: the peak extra MiB of row[method], or '-'."""
    result = row[method]
    return f"{result['peak_extra_bytes'] / 2**20:.{digits}f}" if "peak_extra_bytes" in result else "-"


def cpu_run_meta(**extra):
    """What every CPU results file says about its run: the commit, the versions, the threads; then `extra`."""
    import platform

    import torch

    return {
        "commit": measured_commit(),
        "device": "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        **extra,
    }


def write_json(folder, name, meta, rows):
    """folder/name as {"meta": meta, "rows": rows}, the folder made if needed."""
    import json

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=2)


def write_markdown(folder, name, header, lines):
    """folder/name: the header lines, then the table lines (also printed)."""
    with open(os.path.join(folder, name), "w") as handle:
        handle.write("\n".join(header + lines) + "\n")
    print("\n".join(lines))


def run_child(command):
    """What a child measuring process printed last (JSON), or {"skipped": why it failed}."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"skipped": "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def combine_rounds(results, keys=()):
    """One (workload, method) cell from its rounds: the median seconds, every round's, the largest peak and the
    largest value of each of `keys`; the first result (why it was skipped) when no round was timed."""
    timed = [r for r in results if "seconds" in r]
    if not timed:
        return results[0] if results else {"skipped": "not run"}
    cell = {
        "seconds": statistics.median(r["seconds"] for r in timed),
        "round_seconds": [r["seconds"] for r in timed],
        "peak_extra_bytes": max(r["peak_extra_bytes"] for r in timed),
    }
    for key in keys:
        if key in timed[0]:
            cell[key] = max(r[key] for r in timed)
    return cell
