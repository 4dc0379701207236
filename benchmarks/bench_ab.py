"""A/B of two checkouts of the package on the same machine, rounds alternating, one process per (round, tree):
for refactors that must keep every number and the speed.

    python benchmarks/bench_ab.py --base /path/to/old/checkout [--new .] [--rounds 3]

Each child imports torch_secorder from its tree (the compiled _C module must be in both: copy the .so when
the kernels did not change) and times each workload (median of warm calls); it also sums every diagonal in
float64, so the report says whether the two trees computed the same numbers. Writes
benchmarks/results/ab_<device>.json and .md naming both commits.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

# name -> (builder name, repeats)
WORKLOADS = {
    "Hessian, ResNet-18 CIFAR batch 32 (graph engine)": ("resnet", 5),
    "Hessian, MLP 784-128-64-10 nn.Sequential batch 128 (chain)": ("sequential_mlp", 40),
    "Hessian, the same MLP as a class with F.relu (traced chain)": ("class_mlp", 40),
    "Hessian, pre-norm residual MLP LayerNorm/GELU batch 64 (graph)": ("prenorm", 10),
    "GGN, Tanh CNN + pooling batch 32 (chain)": ("ggn_cnn", 10),
    "Monte-Carlo Fisher, the Sequential MLP (chain)": ("fisher_mlp", 40),
    "per-sample Hessian, small Tanh MLP batch 16 (chain)": ("per_sample", 20),
    "generic method, MLP with train-mode BatchNorm (fallback)": ("generic", 5),
}


def build(kind):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    import torch_secorder as ts

    ce = nn.CrossEntropyLoss()

    def mlp():
        return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))

    if kind == "resnet":
        from torchvision_style import resnet18

        model, x = resnet18(10).eval(), torch.randn(32, 3, 32, 32)
        y = torch.randint(0, 10, (32,))
        return lambda: ts.model_hessian_diagonal(model, ce, x, y, method="backprop")
    if kind in ("sequential_mlp", "fisher_mlp"):
        model, x, y = mlp(), torch.randn(128, 784), torch.randint(0, 10, (128,))
        if kind == "fisher_mlp":
            generator = torch.Generator().manual_seed(0)
            return lambda: ts.model_fisher_diagonal(
                model, ce, x, y, kind="mc", generator=generator.manual_seed(0), method="backprop"
            )
        return lambda: ts.model_hessian_diagonal(model, ce, x, y, method="backprop")
    if kind == "class_mlp":
        from bench_graph import ClassMLP

        model, x, y = ClassMLP(), torch.randn(128, 784), torch.randint(0, 10, (128,))
        return lambda: ts.model_hessian_diagonal(model, ce, x, y, method="backprop")
    if kind == "prenorm":
        from bench_graph import PreNormMLP

        model, x, y = PreNormMLP(), torch.randn(64, 784), torch.randint(0, 10, (64,))
        return lambda: ts.model_hessian_diagonal(model, ce, x, y, method="backprop")
    if kind == "ggn_cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 10),
        )
        x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
        return lambda: ts.model_ggn_diagonal(model, ce, x, y, method="backprop")
    if kind == "per_sample":
        model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5))
        x, y = torch.randn(16, 20), torch.randn(16, 5)
        return lambda: ts.model_hessian_diagonal(model, F.mse_loss, x, y, per_sample=True, method="backprop")
    if kind == "generic":
        model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).train()
        x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
        import warnings

        def run():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return ts.model_hessian_diagonal(model, ce, x, y, method="autograd")

        return run
    raise KeyError(kind)


def child(tree):
    sys.path.insert(0, tree)
    import torch

    import torch_secorder

    assert os.path.dirname(os.path.dirname(os.path.abspath(torch_secorder.__file__))) == os.path.abspath(tree)
    torch.set_num_threads(int(os.environ.get("AB_THREADS", torch.get_num_threads())))
    results = {}
    for name, (kind, repeats) in WORKLOADS.items():
        run = build(kind)
        diagonals = run()
        run()
        checksum = sum(float(d.double().abs().sum()) for d in diagonals)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        results[name] = {"seconds": statistics.median(times), "checksum": checksum}
    print(json.dumps(results))


def commit_of(tree):
    try:
        return subprocess.run(
            ["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--new", default=os.path.dirname(HERE))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    trees = {"base": os.path.abspath(args.base), "new": os.path.abspath(args.new)}
    runs = {"base": [], "new": []}
    for round_index in range(args.rounds):
        order = ["base", "new"] if round_index % 2 == 0 else ["new", "base"]
        for label in order:
            out = subprocess.run(
                [sys.executable, __file__, "--base", trees["base"], "--child", trees[label]],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_index + 1} {label} done", file=sys.stderr)
    import torch

    meta = {
        "base": commit_of(trees["base"]),
        "new": commit_of(trees["new"]),
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "timing": "median over rounds of the median of warm calls; rounds alternate base/new, a process each",
    }
    rows = []
    for name in WORKLOADS:
        base = statistics.median(r[name]["seconds"] for r in runs["base"])
        new = statistics.median(r[name]["seconds"] for r in runs["new"])
        checks = {r[name]["checksum"] for r in runs["base"] + runs["new"]}
        same = max(checks) - min(checks) <= 1e-9 * max(abs(c) for c in checks)
        rows.append(
            {
                "workload": name,
                "base_ms": base * 1e3,
                "new_ms": new * 1e3,
                "new_over_base": new / base,
                "same_numbers": same,
            }
        )
    results = os.path.join(HERE, "results")
    with open(os.path.join(results, "ab_cpu.json"), "w") as handle:
        json.dump({"meta": meta, "rows": rows, "runs": runs}, handle, indent=1)
    lines = [
        f"A/B measured with {json.dumps(meta)}",
        "",
        "| workload | base ms | new ms | new / base | same numbers |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['workload']} | {row['base_ms']:.2f} | {row['new_ms']:.2f} | "
            f"{row['new_over_base']:.3f} | {'yes' if row['same_numbers'] else 'NO'} |"
        )
    with open(os.path.join(results, "ab_cpu.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
