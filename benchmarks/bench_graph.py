"""The graph engine on models as people write them, against a gradient, BackPACK and the generic method.

Workloads: torchvision's ResNet-18 (as tests/torchvision_style.py writes it; CIFAR 3x32x32, 10 classes,
eval mode), an MLP written as a class next to the same nn.Sequential, and a pre-norm residual
LayerNorm/GELU MLP. BackPACK runs DiagGGNExact with use_converter=True (its DiagHessian refuses the
residual sum); for ReLU / BatchNorm-eval / pooling networks that is the exact Hessian diagonal, and
the script checks that both agree. Every (workload, method) runs in a process of its own so that its
peak memory is that process's high-water mark; rounds interleave the methods.

    python benchmarks/bench_graph.py [--device cpu|cuda] [--only NAME] [--batch B] [--rounds 3]

Writes benchmarks/results/graph_<device>[_batch<B>].json and .md.
"""

import argparse
import copy
import json
import os
import platform
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from timing import combine_rounds, measured_commit, median_seconds, memory_cell, run_child, time_cell

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
METHODS = ["gradient", "engine", "backpack", "generic"]


class ClassMLP(nn.Module):
    """The chain workload of bench_backprop.py, written as people write it."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class PreNormMLP(nn.Module):
    def __init__(self, width=64, hidden=128, depth=2, classes=10, inputs=784):
        super().__init__()
        self.embed = nn.Linear(inputs, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.ups = nn.ModuleList(nn.Linear(width, hidden) for _ in range(depth))
        self.downs = nn.ModuleList(nn.Linear(hidden, width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.embed(x)
        for norm, up, down in zip(self.norms, self.ups, self.downs):
            x = x + down(F.gelu(up(norm(x))))
        return self.head(x)


def workloads():
    from torchvision_style import resnet18

    def sequential_mlp():
        return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)), (
            128,
            784,
        )

    return {
        "ResNet-18 (torchvision), CIFAR 3x32x32, 10 classes, eval, batch 32": (lambda: resnet18(10), (32, 3, 32, 32)),
        "MLP 784-128-ReLU-64-ReLU-10 as nn.Sequential, batch 128": (sequential_mlp, None),
        "MLP 784-128-ReLU-64-ReLU-10 as a class (F.relu), batch 128": (lambda: (ClassMLP(), (128, 784)), None),
        "Pre-norm residual MLP (LayerNorm, GELU), width 64, 2 blocks, batch 64": (
            lambda: (PreNormMLP(), (64, 784)),
            None,
        ),
    }


def build(name, device, batch=None):
    torch.manual_seed(0)
    make, shape = workloads()[name]
    made = make()
    model, shape = (made, shape) if shape is not None else made
    if batch is not None:
        shape = (batch,) + tuple(shape[1:])
    x = torch.randn(*shape)
    y = torch.randint(0, 10, (shape[0],))
    return model.eval().to(device), x.to(device), y.to(device), nn.CrossEntropyLoss()


def _rss_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name, method, device_name, generic_limit, batch):
    device = torch.device(device_name)
    model, x, y, loss_fn = build(name, device, batch)
    params = list(model.parameters())
    from torch_secorder import model_hessian_diagonal

    compare = None  # for BackPACK: its largest relative difference to the engine
    if method == "gradient":

        def run():
            return torch.autograd.grad(loss_fn(model(x), y), params)
    elif method == "engine":

        def run():
            return model_hessian_diagonal(model, loss_fn, x, y, method="backprop")
    elif method == "backpack":
        try:
            from backpack import backpack, extend
            from backpack.extensions import DiagGGNExact
        except ImportError as error:
            return {"skipped": f"BackPACK not installed ({error})"}
        if any(isinstance(m, (nn.LayerNorm, nn.GELU)) for m in model.modules()) or "GELU" in name:
            return {"skipped": "BackPACK has no LayerNorm / GELU"}
        reference = model_hessian_diagonal(model, loss_fn, x, y, method="backprop")
        extended = extend(copy.deepcopy(model), use_converter=True)
        extended_loss = extend(nn.CrossEntropyLoss())

        def run():
            extended.zero_grad()
            with backpack(DiagGGNExact()):
                extended_loss(extended(x), y).backward()
            return [p.diag_ggn_exact for p in extended.parameters()]

        def compare(result):
            errors = [((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(result, reference)]
            return max(errors)
    else:
        started, guarding = [time.perf_counter()], [True]

        def guard(done, total):
            elapsed = time.perf_counter() - started[0]
            if guarding[0] and elapsed > 3 and elapsed / done * total > generic_limit:
                raise TimeoutError(f"projected {elapsed / done * total:.0f} s > {generic_limit:.0f} s")

        def run():
            return model_hessian_diagonal(model, loss_fn, x, y, method="autograd", progress=guard)

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
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ) - base
    measured = {"peak_extra_bytes": max(peak, 0)}
    if compare is not None:
        measured["max_relative_difference_to_engine"] = compare(result)
    del result
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    repeats = int(max(3, min(20, 3.0 / max(first, 1e-6))))
    measured["seconds"] = median_seconds(run, device, repeats=repeats, warmup=1)
    measured["repeats"] = repeats
    return measured


def measure_in_child(name, method, args):
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
    if args.batch:
        command += ["--batch", str(args.batch)]
    return run_child(command)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--generic-limit", type=float, default=60.0)
    parser.add_argument("--only", default=None)
    parser.add_argument("--batch", type=int, default=None, help="override every workload's batch size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.device, args.generic_limit, args.batch)))
        return
    rows = []
    for name in workloads():
        if args.only and args.only not in name:
            continue
        measured = {method: [] for method in METHODS}
        for round_index in range(args.rounds):
            for method in METHODS:
                if measured[method] and "skipped" in measured[method][0]:
                    continue
                result = measure_in_child(name, method, args)
                measured[method].append(result)
                print(name, "| round", round_index, "|", method, "|", result, flush=True)
        row = {"workload": name if not args.batch else name.rsplit("batch", 1)[0] + f"batch {args.batch}"}
        for method, results in measured.items():
            row[method] = combine_rounds(results, ("max_relative_difference_to_engine",))
        rows.append(row)
    write_results(rows, args)


def write_results(rows, args):
    meta = {
        "commit": measured_commit(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "rounds": args.rounds,
        "timing": "median over rounds of the median of warm runs, forward pass included, one process per "
        "(workload, method)",
        "memory": "peak extra bytes over the state before the first call (CPU: process high-water mark; "
        "CUDA: max_memory_allocated)",
        "backpack": "DiagGGNExact with extend(model, use_converter=True)",
    }
    tag = ("cpu" if args.device == "cpu" else "cuda") + (f"_batch{args.batch}" if args.batch else "")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"graph_{tag}.json"), "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=2)

    def cell(row, method):
        return time_cell(row, method, digits=1, say_why=True)

    def memory(row, method):
        return memory_cell(row, method, digits=0)

    lines = [
        "| workload | gradient | engine | BackPACK DiagGGNExact (converter) | generic | engine vs BackPACK | "
        "peak MiB gradient / engine / BackPACK |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        engine, other = row["engine"], row["backpack"]
        speedup = (
            f"{other['seconds'] / engine['seconds']:.1f}x faster" if "seconds" in engine and "seconds" in other else "-"
        )
        lines.append(
            f"| {row['workload']} | {cell(row, 'gradient')} | {cell(row, 'engine')} | "
            f"{cell(row, 'backpack')} | {cell(row, 'generic')} | {speedup} | "
            f"{memory(row, 'gradient')} / {memory(row, 'engine')} / {memory(row, 'backpack')} |"
        )
    table = "\n".join(lines)
    with open(os.path.join(args.out, f"graph_{tag}.md"), "w") as handle:
        handle.write(f"Measured with {json.dumps(meta)}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
