"""The exact Hessian-backprop engine against the gradient, BackPACK DiagHessian and the generic method.

Every (workload, method) runs in its own process so that its peak memory can be read from the
process's high-water mark; --in-process measures everything in one process instead (on CUDA the
peak comes from max_memory_allocated, so nothing is lost; on CPU no peak is reported). Writes
benchmarks/results/backprop_<device>[_batch<B>].json and .md.

    python benchmarks/bench_backprop.py [--device cpu|cuda] [--generic-limit 60] [--only NAME]
                                        [--batch B [B ...]] [--in-process] [--rounds 3]

BackPACK is optional (`pip install --no-deps backpack-for-pytorch==1.7.1 einops unfoldNd`; its
torchvision requirement is not needed for DiagHessian).
"""

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
from timing import measured_commit, median_seconds, memory_cell, time_cell

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ["gradient", "engine (kernels)", "engine (pure torch)", "backpack", "generic"]


def workloads(device):
    """name -> (model, inputs, targets, loss) built from a fixed seed."""

    def mlp_relu():
        return (
            nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)),
            (128, 784),
            10,
            nn.CrossEntropyLoss(),
        )

    def mlp_smooth():
        return (
            nn.Sequential(nn.Linear(784, 256), nn.Sigmoid(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)),
            (64, 784),
            None,
            nn.MSELoss(),
        )

    def cnn():
        return (
            nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(2048, 10),
            ),
            (32, 3, 32, 32),
            10,
            nn.CrossEntropyLoss(),
        )

    def vgg():
        return (
            nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 16, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 32, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(2048, 64),
                nn.ReLU(),
                nn.Linear(64, 10),
            ),
            (128, 3, 32, 32),
            10,
            nn.CrossEntropyLoss(),
        )

    table = {
        "MLP 784-128-ReLU-64-ReLU-10, CE, batch 128": mlp_relu,
        "MLP 784-256-Sigmoid-256-Tanh-10, MSE, batch 64": mlp_smooth,
        "CNN conv16-pool-conv32-pool-fc10, CE, batch 32": cnn,
        "VGG-style conv16x2-pool-conv32x2-pool-fc64-fc10, CE, batch 128": vgg,
    }
    return table


def build(name, device, batch=None):
    torch.manual_seed(0)
    model, shape, classes, loss_fn = workloads(device)[name]()
    if batch is not None:
        shape = (batch,) + tuple(shape[1:])
    x = torch.randn(*shape)
    y = torch.randint(0, classes, (shape[0],)) if classes else torch.randn(shape[0], model[-1].out_features)
    return model.to(device), x.to(device), y.to(device), loss_fn


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name, method, device_name, generic_limit, batch, in_process=False):
    """Median seconds, repeats and peak extra memory of one method (in a child process of its own,
    unless in_process)."""
    device = torch.device(device_name)
    model, x, y, loss_fn = build(name, device, batch)
    params = list(model.parameters())
    from torch_secorder import model_hessian_diagonal, ops

    if method == "gradient":

        def run():
            return torch.autograd.grad(loss_fn(model(x), y), params)
    elif method == "engine (kernels)":

        def run():
            return model_hessian_diagonal(model, loss_fn, x, y, method="backprop")
    elif method == "engine (pure torch)":

        def run():
            with ops.references_only():
                return model_hessian_diagonal(model, loss_fn, x, y, method="backprop")
    elif method == "backpack":
        try:
            from backpack import backpack, extend
            from backpack.extensions import DiagHessian
        except ImportError as error:
            return {"skipped": f"BackPACK not installed ({error})"}
        extend(model)
        extend(loss_fn)

        def run():
            model.zero_grad()
            with backpack(DiagHessian()):
                loss_fn(model(x), y).backward()
            return [p.diag_h for p in params]
    else:

        def run():
            return model_hessian_diagonal(model, loss_fn, x, y, method="autograd", progress=guard)

        started, guarding = [None], [True]

        def guard(done, total):
            elapsed = time.perf_counter() - started[0]
            if guarding[0] and elapsed > 3 and elapsed / done * total > generic_limit:
                raise TimeoutError(f"projected {elapsed / done * total:.0f} s > {generic_limit:.0f} s")

        started[0] = time.perf_counter()
        try:
            run()
        except TimeoutError as error:
            return {"skipped": str(error)}
        guarding[0] = False  # it fits: the timed runs are not stopped

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_bytes()
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    first = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ) - base
    repeats = int(max(3, min(30, 3.0 / max(first, 1e-6))))
    seconds = median_seconds(run, device, repeats=repeats, warmup=2)
    del result
    measured = {"seconds": seconds, "repeats": repeats}
    if device.type == "cuda" or not in_process:  # a process's high-water mark says nothing about one method
        measured["peak_extra_bytes"] = max(peak, 0)
    return measured


def _rss_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--generic-limit", type=float, default=60.0, help="skip the generic method beyond this")
    parser.add_argument("--only", default=None, help="substring of the workload names to run")
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=None,
        help="override every workload's batch size (several: one table per size)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process (one CUDA context, no process start-up per measurement)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds over all methods; the reported time is the median of the rounds' medians, "
        "so that a slow spell of the machine does not land on one method only",
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        batch = args.batch[0] if args.batch else None
        print(json.dumps(measure(args.child[0], args.child[1], args.device, args.generic_limit, batch)))
        return
    for batch in args.batch or [None]:
        rows = [
            measure_workload(name, args, batch) for name in workloads(args.device) if not args.only or args.only in name
        ]
        write_results(rows, args, batch)


def measure_workload(name, args, batch):
    row = {"workload": re.sub(r"batch \d+", f"batch {batch}", name) if batch else name}
    measured = {method: [] for method in METHODS}
    for round_index in range(args.rounds):
        for method in METHODS:
            if measured[method] and "skipped" in measured[method][0]:
                continue  # skipped once (not installed, too slow): skipped every round
            result = (
                measure_here(name, method, args, batch)
                if args.in_process
                else measure_in_child(name, method, args, batch)
            )
            measured[method].append(result)
            print(name, "| batch", batch, "| round", round_index, "|", method, "|", result, flush=True)
    for method, results in measured.items():
        timed = [r for r in results if "seconds" in r]
        if not timed:
            row[method] = results[0]
            continue
        row[method] = {
            "seconds": statistics.median(r["seconds"] for r in timed),
            "round_seconds": [r["seconds"] for r in timed],
        }
        if all("peak_extra_bytes" in r for r in timed):
            row[method]["peak_extra_bytes"] = max(r["peak_extra_bytes"] for r in timed)
    return row


def measure_here(name, method, args, batch):
    try:
        return measure(name, method, args.device, args.generic_limit, batch, in_process=True)
    except Exception as error:
        return {"skipped": f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"}


def measure_in_child(name, method, args, batch):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--device",
        args.device,
        "--generic-limit",
        str(args.generic_limit),
        "--child",
        name,
        method,
    ]
    if batch:
        command += ["--batch", str(batch)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"skipped": "failed: " + done.stderr.strip().splitlines()[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_results(rows, args, batch):
    meta = {
        "commit": measured_commit(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "batch": batch or "as named",
        "processes": "one" if args.in_process else "one per measurement",
        "timing": f"median over {args.rounds} rounds of the median of warm runs (CUDA events on GPU, wall clock "
        "on CPU), forward pass included",
        "memory": "peak extra bytes over the state before the call (CPU: process high-water mark; "
        "CUDA: max_memory_allocated)",
    }
    if args.device != "cpu":
        meta["cuda"] = torch.version.cuda
    os.makedirs(args.out, exist_ok=True)
    tag = ("cpu" if args.device == "cpu" else "cuda") + (f"_batch{batch}" if batch else "")
    with open(os.path.join(args.out, f"backprop_{tag}.json"), "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=2)

    def cell(row, method):
        return time_cell(row, method, digits=2, say_why=False)

    def memory(row, method):
        return memory_cell(row, method, digits=1)

    lines = [
        "| workload | gradient | engine (kernels) | engine (pure torch) | BackPACK DiagHessian | generic | "
        "speed-up vs BackPACK | peak MiB engine / BackPACK |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        engine, other = row["engine (kernels)"], row["backpack"]
        speedup = f"{other['seconds'] / engine['seconds']:.1f}x" if "seconds" in engine and "seconds" in other else "-"
        lines.append(
            f"| {row['workload']} | {cell(row, 'gradient')} | {cell(row, 'engine (kernels)')} | "
            f"{cell(row, 'engine (pure torch)')} | {cell(row, 'backpack')} | {cell(row, 'generic')} | "
            f"{speedup} | {memory(row, 'engine (kernels)')} / {memory(row, 'backpack')} |"
        )
    table = "\n".join(lines)
    with open(os.path.join(args.out, f"backprop_{tag}.md"), "w") as handle:
        handle.write(f"Measured with {json.dumps(meta)}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
