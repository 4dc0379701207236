"""One call for a curvature step (backward=True) against what it replaces: loss.backward() plus a separate call
for the diagonal, in one run, on the same models and batches.

Each timed run is one curvature step: zero the gradients, then either (separate) a forward and backward() and a
model_*_diagonal call, or (one call) the same call with backward=True, which also leaves the gradient in .grad.
A plain forward and backward() is timed beside them. Float32, CPU, median of warm runs, the methods interleaved
round by round so that machine noise falls on all of them alike.

    python benchmarks/bench_step.py [--rounds 5]

Writes benchmarks/results/step_cpu.json and .md.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from timing import cpu_run_meta, write_json, write_markdown

from torch_secorder import model_ggn_diagonal, model_hessian_diagonal

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))


def workloads():
    from synthetic import TinyTransformer, small_cnn

    def data(shape, classes, batch):
        generator = torch.Generator().manual_seed(0)
        return torch.randn(batch, *shape, generator=generator), torch.randint(0, classes, (batch,), generator=generator)

    def tokens(batch):
        generator = torch.Generator().manual_seed(0)
        x = torch.randint(0, 16, (batch, 12), generator=generator)
        return x, torch.randint(0, 4, (batch,), generator=generator)

    return {
        "MLP 784-128-ReLU-64-ReLU-10, batch 128": (
            lambda: nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)),
            lambda: data((784,), 10, 128),
        ),
        "MLP 784-128-Tanh-64-Tanh-10, batch 128": (
            lambda: nn.Sequential(nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10)),
            lambda: data((784,), 10, 128),
        ),
        "small CNN (examples/synthetic.py), 3x32x32, batch 32": (small_cnn, lambda: data((3, 32, 32), 10, 32)),
        "two-block transformer (examples/synthetic.py), 12 tokens, batch 32": (TinyTransformer, lambda: tokens(32)),
    }


CURVATURES = {"GGN": model_ggn_diagonal, "Hessian": model_hessian_diagonal}


def steps(model, x, y, function):
    params = list(model.parameters())

    def gradient():
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y).backward()

    def separate():
        gradient()
        function(model, F.cross_entropy, x, y)

    def one_call():
        for p in params:
            p.grad = None
        function(model, F.cross_entropy, x, y, backward=True)

    return {"gradient": gradient, "separate": separate, "one call": one_call}


def measure(name, curvature, rounds):
    make_model, make_data = workloads()[name]
    torch.manual_seed(0)
    model = make_model().eval()
    x, y = make_data()
    runs = steps(model, x, y, CURVATURES[curvature])
    for run in runs.values():  # warm: plans cached, allocator settled
        run()
        run()
    first = time.perf_counter()
    runs["separate"]()
    repeats = int(max(3, min(50, 0.5 / max(time.perf_counter() - first, 1e-6))))
    samples = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            samples[key].append((time.perf_counter() - start) / repeats)
    return {key: statistics.median(values) for key, values in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    rows = []
    for name in workloads():
        for curvature in CURVATURES:
            seconds = measure(name, curvature, args.rounds)
            rows.append({"workload": name, "curvature": curvature, **seconds})
            print(rows[-1], flush=True)
    meta = cpu_run_meta(
        dtype="float32",
        rounds=args.rounds,
        timing="median over rounds of the mean of repeated steps, methods interleaved within each round",
    )
    write_json(args.out, "step_cpu.json", meta, rows)
    lines = [
        "| workload | curvature | forward + backward() | backward() + separate call | one call (backward=True) | "
        "one call / separate |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['workload']} | {row['curvature']} | {row['gradient'] * 1e3:.2f} ms | "
            f"{row['separate'] * 1e3:.2f} ms | {row['one call'] * 1e3:.2f} ms | "
            f"{row['one call'] / row['separate']:.2f} |"
        )
    header = [
        "# One call for a curvature step against backward() plus a separate call",
        "",
        f"Commit {meta['commit']}, cpu, torch {meta['torch']}, {meta['threads']} threads, float32, eval mode. "
        f"{meta['timing']}; {args.rounds} rounds. Written by `benchmarks/bench_step.py`.",
        "",
    ]
    write_markdown(args.out, "step_cpu.md", header, lines)


if __name__ == "__main__":
    main()
