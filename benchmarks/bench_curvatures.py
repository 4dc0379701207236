"""Every curvature the library computes, against a gradient, BackPACK and curvlinops, in one run.

Workloads: the ReLU MLP and the CNN of bench_backprop.py, the sigmoid/tanh MLP with MSE (where the GGN
and the Hessian differ), and torchvision's ResNet-18 of bench_graph.py (CIFAR size, eval, batch 32).
Methods: our exact Hessian / GGN / per-sample Hessian / per-sample GGN diagonals, the Monte-Carlo (one
draw) and empirical Fisher, Hutchinson with 100 probes; BackPACK's DiagGGNExact, BatchDiagHessian,
BatchDiagGGNExact, DiagGGNMC (use_converter=True on the ResNet); curvlinops' hutchinson_diag on its
HessianLinearOperator with 100 matrix-vector products. Both Hutchinson estimates are compared with the
exact diagonal (relative error in norm), and ours also reports its own predicted error.

Every (workload, method) runs in a process of its own (its peak memory is that process's high-water
mark); rounds interleave the methods.

    python benchmarks/bench_curvatures.py [--device cpu|cuda] [--only NAME] [--methods a,b] [--rounds 3]

BackPACK and curvlinops are optional (pip install --no-deps backpack-for-pytorch==1.7.1 einops unfoldNd
curvlinops-for-pytorch==3.0.1 einconv linear_operator opt-einsum scipy tqdm). Writes
benchmarks/results/curvatures_<device>.json and .md.
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
from timing import combine_rounds, measured_commit, median_seconds, memory_cell, run_child, time_cell

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
PROBES = 100

# (name, what it computes, its counterpart elsewhere or None)
OURS = {
    "gradient": "plain gradient (forward + backward)",
    "hessian": "model_hessian_diagonal",
    "ggn": "model_ggn_diagonal",
    "per-sample hessian": "model_hessian_diagonal(per_sample=True)",
    "per-sample ggn": "model_ggn_diagonal(per_sample=True)",
    "mc fisher": "model_fisher_diagonal(kind='mc', mc_samples=1)",
    "empirical fisher": "model_fisher_diagonal(kind='empirical')",
    "hutchinson": f"model_hessian_diagonal_estimate(n_probes={PROBES})",
}
THEIRS = {
    "backpack ggn": ("BackPACK DiagGGNExact", "ggn"),
    "backpack per-sample hessian": ("BackPACK BatchDiagHessian", "per-sample hessian"),
    "backpack per-sample ggn": ("BackPACK BatchDiagGGNExact", "per-sample ggn"),
    "backpack mc fisher": ("BackPACK DiagGGNMC (mc_samples=1)", "mc fisher"),
    "curvlinops hutchinson": (f"curvlinops hutchinson_diag(HessianLinearOperator, {PROBES})", "hutchinson"),
}
METHODS = list(OURS) + list(THEIRS)
WORKLOADS = {
    "MLP 784-128-ReLU-64-ReLU-10, CE, batch 128": "backprop",
    "MLP 784-256-Sigmoid-256-Tanh-10, MSE, batch 64": "backprop",
    "CNN conv16-pool-conv32-pool-fc10, CE, batch 32": "backprop",
    "ResNet-18 (torchvision), CIFAR 3x32x32, 10 classes, eval, batch 32": "graph",
}


def build(name, device):
    import bench_backprop
    import bench_graph

    module = bench_backprop if WORKLOADS[name] == "backprop" else bench_graph
    return module.build(name, device)


def _rss_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def runner(method, model, x, y, loss_fn):
    """(run, extend_check): run() computes the method's result; None when it cannot run here (with why)."""
    import torch_secorder as ts

    params = list(model.parameters())
    ours = {
        "gradient": lambda: torch.autograd.grad(loss_fn(model(x), y), params),
        "hessian": lambda: ts.model_hessian_diagonal(model, loss_fn, x, y, method="backprop"),
        "ggn": lambda: ts.model_ggn_diagonal(model, loss_fn, x, y, method="backprop"),
        "per-sample hessian": lambda: ts.model_hessian_diagonal(
            model, loss_fn, x, y, method="backprop", per_sample=True
        ),
        "per-sample ggn": lambda: ts.model_ggn_diagonal(model, loss_fn, x, y, method="backprop", per_sample=True),
        "mc fisher": lambda: ts.model_fisher_diagonal(model, loss_fn, x, y, method="backprop"),
        "empirical fisher": lambda: ts.model_fisher_diagonal(model, loss_fn, x, y, "empirical", method="backprop"),
        "hutchinson": lambda: ts.model_hessian_diagonal_estimate(model, loss_fn, x, y, PROBES),
    }
    if method in ours:
        return ours[method]
    if method == "curvlinops hutchinson":
        from curvlinops import HessianLinearOperator
        from curvlinops.diagonal.hutchinson import hutchinson_diag

        operator = HessianLinearOperator(model, loss_fn, params, [(x, y)], check_deterministic=False)

        def run():
            flat = hutchinson_diag(operator, PROBES)
            return [part.reshape(p.shape) for part, p in zip(torch.split(flat, [p.numel() for p in params]), params)]

        return run
    from backpack import backpack, extend, extensions

    extension, attribute = {
        "backpack ggn": (extensions.DiagGGNExact, "diag_ggn_exact"),
        "backpack per-sample hessian": (extensions.BatchDiagHessian, "diag_h_batch"),
        "backpack per-sample ggn": (extensions.BatchDiagGGNExact, "diag_ggn_exact_batch"),
        "backpack mc fisher": (extensions.DiagGGNMC, "diag_ggn_mc"),
    }[method]
    graph = not isinstance(model, nn.Sequential)
    extended = extend(copy.deepcopy(model), use_converter=graph)
    extended_loss = extend(copy.deepcopy(loss_fn))

    def run():
        extended.zero_grad()
        with backpack(extension()):
            extended_loss(extended(x), y).backward()
        return [getattr(p, attribute) for p in extended.parameters()]

    return run


def measure(name, method, device_name):
    device = torch.device(device_name)
    model, x, y, loss_fn = build(name, device)
    try:
        run = runner(method, model, x, y, loss_fn)
    except ImportError as error:
        return {"skipped": f"not installed ({error})"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_bytes()
    start = time.perf_counter()
    try:
        result = run()
    except Exception as error:
        return {"skipped": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ) - base
    measured = {"peak_extra_bytes": max(peak, 0)}
    reference = _reference(method, model, x, y, loss_fn)
    if reference is not None:
        estimate = result.diagonal if hasattr(result, "diagonal") else result
        measured["error_vs_exact"] = _norm_error(estimate, reference)
        if hasattr(result, "relative_error"):
            measured["predicted_error"] = result.relative_error
    del result
    if first > 5:  # slow methods: one more timed run is enough
        measured["seconds"], measured["repeats"] = median_seconds(run, device, repeats=1, warmup=0), 1
        return measured
    repeats = int(max(3, min(20, 3.0 / max(first, 1e-6))))
    # warm-up for about half a second (3 to 50 calls): a fresh process runs its first dozens of calls slower
    # (measured on the sigmoid MLP: BackPACK 3.1 ms in calls 1-10, 2.6-2.9 ms after; ours 1.5 then 1.2-1.3)
    warmup = int(max(3, min(50, 0.5 / max(first, 1e-6))))
    measured["seconds"] = median_seconds(run, device, repeats=repeats, warmup=warmup)
    measured["repeats"] = repeats
    return measured


def _reference(method, model, x, y, loss_fn):
    """The exact result a method should match (ours for theirs; the exact Hessian for the estimators)."""
    import torch_secorder as ts

    if method in ("hutchinson", "curvlinops hutchinson"):
        return ts.model_hessian_diagonal(model, loss_fn, x, y)
    if method in THEIRS and THEIRS[method][1] in ("ggn", "per-sample hessian", "per-sample ggn"):
        counterpart = THEIRS[method][1]
        per_sample = counterpart.startswith("per-sample")
        if counterpart.endswith("hessian"):
            return ts.model_hessian_diagonal(model, loss_fn, x, y, per_sample=True)
        return ts.model_ggn_diagonal(model, loss_fn, x, y, per_sample=per_sample)
    return None


def _norm_error(actual, expected):
    squares = sum(float(((a.double() - e.double()) ** 2).sum()) for a, e in zip(actual, expected))
    norm = sum(float((e.double() ** 2).sum()) for e in expected)
    return (squares / norm) ** 0.5 if norm else 0.0


def measure_in_child(name, method, args):
    return run_child([sys.executable, os.path.abspath(__file__), "--device", args.device, "--child", name, method])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default=None, help="comma-separated parts of workload names to run")
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="measure (both libraries) with glibc keeping freed memory (MALLOC_MMAP_THRESHOLD_ and "
        "MALLOC_TRIM_THRESHOLD_ at 4 GiB) instead of unmapping it and faulting fresh pages in; "
        "results go to curvatures_<device>_retained.*",
    )
    parser.add_argument("--methods", default=None, help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.device)))
        return
    methods = METHODS if not args.methods else args.methods.split(",")
    if args.retain_freed_memory:  # read by glibc when each measuring child process starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = os.environ["MALLOC_TRIM_THRESHOLD_"] = str(4 << 30)
    rows = []
    for name in WORKLOADS:
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        measured = {method: [] for method in methods}
        for round_index in range(args.rounds):
            for method in methods:
                if measured[method] and "skipped" in measured[method][0]:
                    continue
                if measured[method] and measured[method][0].get("seconds", 0) > 5:
                    continue  # slow (the estimators on ResNet-18): one round
                result = measure_in_child(name, method, args)
                measured[method].append(result)
                print(name, "| round", round_index, "|", method, "|", result, flush=True)
        row = {"workload": name}
        for method, results in measured.items():
            row[method] = combine_rounds(results, ("error_vs_exact", "predicted_error"))
        rows.append(row)
    write_results(rows, args, methods)


def write_results(rows, args, methods):
    meta = {
        "commit": measured_commit(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "rounds": args.rounds,
        "timing": "median over rounds of the median of warm runs (after about 0.5 s of warm-up calls, 3 to 50), "
        "forward pass included, one process per (workload, method); methods slower than 5 s: one "
        "round, one timed run",
        "memory": "peak extra bytes over the state before the first call (CPU: process high-water mark; "
        "CUDA: max_memory_allocated)",
        "allocator": (
            "glibc keeping freed memory (MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=4 GiB)"
            if args.retain_freed_memory
            else "glibc defaults"
        )
        + "; ours with its CPU block cache on (the default, torch_secorder.memory)",
        "ours": OURS,
        "theirs": {key: value[0] for key, value in THEIRS.items()},
    }
    tag = ("cpu" if args.device == "cpu" else "cuda") + ("_retained" if args.retain_freed_memory else "")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"curvatures_{tag}.json"), "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=2)
    lines = []
    for row in rows:
        lines += [
            f"### {row['workload']}",
            "",
            f"gradient: {time_cell(row, 'gradient', digits=1)}",
            "",
            "| curvature | ours | theirs | ours vs theirs | peak MiB ours / theirs | error vs exact (ours / theirs) |",
            "|---|---|---|---|---|---|",
        ]
        for ours in [m for m in OURS if m != "gradient" and m in methods]:
            theirs = next(
                (key for key, (_, counterpart) in THEIRS.items() if counterpart == ours and key in methods), None
            )
            mine = row[ours]
            other = row[theirs] if theirs else {"skipped": "-"}
            speed = (
                f"{other['seconds'] / mine['seconds']:.1f}x faster" if "seconds" in mine and "seconds" in other else "-"
            )
            errors = "-"
            if "error_vs_exact" in mine or "error_vs_exact" in other:
                ours_error = (
                    f"{mine['error_vs_exact']:.1%} (predicted {mine['predicted_error']:.1%})"
                    if "error_vs_exact" in mine
                    else "-"
                )
                theirs_error = f"{other['error_vs_exact']:.2g}" if "error_vs_exact" in other else "-"
                if ours == "hutchinson" and "error_vs_exact" in other:
                    theirs_error = f"{other['error_vs_exact']:.1%}"
                errors = f"{ours_error} / {theirs_error}"
            label = THEIRS[theirs][0] if theirs else "-"
            lines.append(
                f"| {OURS[ours]} | {time_cell(row, ours, digits=1)} | "
                f"{label}: {time_cell(row, theirs, digits=1, say_why=True) if theirs else '-'} | {speed} | "
                f"{memory_cell(row, ours, 0)} / {memory_cell(row, theirs, 0) if theirs else '-'} | {errors} |"
            )
        lines.append("")
    table = "\n".join(lines)
    with open(os.path.join(args.out, f"curvatures_{tag}.md"), "w") as handle:
        handle.write(f"Measured with {json.dumps(meta)}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
