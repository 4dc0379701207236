"""Times the generic exact method against the per-entry loop of torch-secorder 0.0.1.

Same models, same inputs, same run; checks that both give the same numbers and
writes benchmarks/results/generic_vs_original.{json,md}.

    python benchmarks/bench_generic.py [--repeats 3] [--max-original-seconds 60]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
from timing import measured_commit

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from original import load_original  # noqa: E402

from torch_secorder import _extension, model_hessian_diagonal  # noqa: E402


def mlp(widths, activation=nn.Tanh):
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), activation()]
    return nn.Sequential(*layers[:-1])


def workloads():
    generator = torch.Generator().manual_seed(0)

    def data(shape, classes, batch):
        return torch.randn(batch, *shape, generator=generator), torch.randint(0, classes, (batch,), generator=generator)

    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    return [
        ("MLP 20-16-16-4 Tanh, CE, batch 256", mlp([20, 16, 16, 4]), *data((20,), 4, 256)),
        ("MLP 20-32-32-4 Tanh, CE, batch 256", mlp([20, 32, 32, 4]), *data((20,), 4, 256)),
        ("MLP 50-64-64-10 GELU, CE, batch 128", mlp([50, 64, 64, 10], nn.GELU), *data((50,), 10, 128)),
        ("CNN 3x16x16 conv8-conv8-fc10 ReLU, CE, batch 32", cnn, *data((3, 16, 16), 10, 32)),
    ]


def median_seconds(run, repeats):
    times = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--max-original-seconds",
        type=float,
        default=60.0,
        help="skip the original where a one-entry estimate says it would take longer",
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    original = load_original()
    loss_fn = nn.CrossEntropyLoss()
    rows = []
    for name, model, x, y in workloads():
        params = list(model.parameters())
        count = sum(p.numel() for p in params)

        def gradient(model=model, x=x, y=y, params=params):
            return torch.autograd.grad(loss_fn(model(x), y), params)

        gradient()
        grad_s, _ = median_seconds(gradient, 20)
        ours_s, ours = median_seconds(
            lambda model=model, x=x, y=y: model_hessian_diagonal(model, loss_fn, x, y, method="autograd"), args.repeats
        )
        row = {
            "workload": name,
            "parameters": count,
            "gradient_ms": grad_s * 1e3,
            "generic_s": ours_s,
            "generic_x_gradient": ours_s / grad_s,
            "original_s": None,
            "speedup_vs_original": None,
            "max_relative_difference": None,
        }
        if original is not None:
            estimate = ours_s / max(1, count) * count * 5  # the loop is slower; skip only clear cases
            if estimate <= args.max_original_seconds:
                orig_s, theirs = median_seconds(
                    lambda model=model, x=x, y=y: original.model_hessian_diagonal(model, loss_fn, x, y), 1
                )
                a = torch.cat([d.reshape(-1).double() for d in ours])
                b = torch.cat([d.reshape(-1).double() for d in theirs])
                row.update(
                    original_s=orig_s,
                    speedup_vs_original=orig_s / ours_s,
                    max_relative_difference=((a - b).abs().max() / b.abs().max()).item(),
                )
        rows.append(row)
        print(json.dumps(row))

    meta = {
        "commit": measured_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "compiled_ops": _extension.info()["source"],
        "repeats": args.repeats,
        "float": "float32",
        "timing": "median wall-clock, forward pass included",
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "generic_vs_original.json"), "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=2)
    lines = [
        "| workload | params | gradient | generic (batched HVPs) | original 0.0.1 loop | speed-up | max rel. diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        orig = f"{r['original_s']:.2f} s" if r["original_s"] is not None else "skipped"
        speed = f"{r['speedup_vs_original']:.1f}x" if r["speedup_vs_original"] is not None else "-"
        diff = f"{r['max_relative_difference']:.1e}" if r["max_relative_difference"] is not None else "-"
        lines.append(
            f"| {r['workload']} | {r['parameters']:,} | {r['gradient_ms']:.2f} ms | {r['generic_s']:.2f} s "
            f"({r['generic_x_gradient']:,.0f}x grad) | {orig} | {speed} | {diff} |"
        )
    table = "\n".join(lines)
    with open(os.path.join(args.out, "generic_vs_original.md"), "w") as handle:
        handle.write(f"Measured with {meta}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
