"""Auto's cost choice, measured: the engine's predicted time (backprop/cost.py, priced with this machine's speed)
against its measured time, the generic method's time, and which method auto ran, in one run.

The models of bench_zoo.py plus two where the engine does much more work than the generic method (wide smooth
activations, few parameters) or about as much (an MLP-Mixer). Float32, batch 8, one process per model: a
gradient (median of warm runs), the prediction, method="backprop" (median of warm runs), method="auto" (its first
call makes the choice; then timed), the generic method (stopped when its progress projects more than
--generic-limit seconds: the projection is reported).

    python benchmarks/bench_cost.py [--only NAME] [--generic-limit 60]
    python benchmarks/bench_cost.py --published

Writes benchmarks/results/cost_cpu.json and .md. With --published, the prediction alone for bench_zoo.py's
published-size models, against the engine times of their run in results/zoo_published_cpu.json (minutes each):
results/cost_published_cpu.json and .md.
"""

import argparse
import json
import os
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from bench_zoo import BATCH, _torchvision, build, published_models, workloads
from timing import cpu_run_meta, median_seconds, run_child, write_json, write_markdown

HERE = os.path.dirname(os.path.abspath(__file__))


def extra_models():
    def wide_smooth():
        return nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Conv2d(4, 4, 3), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip

    def mixer():
        _torchvision()
        import timm

        return timm.models.mlp_mixer.MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32)

    return {
        "small CNN, SiLU on 48x48 maps (910 parameters)": wide_smooth,
        "timm MLP-Mixer (2 blocks, width 32, patch 8)": mixer,
    }


def built(name):
    if name in extra_models():
        torch.manual_seed(0)
        size = 48 if "48x48" in name else 32
        return (
            extra_models()[name]().eval(),
            torch.randn(BATCH, 3, size, size),
            torch.randint(0, 10, (BATCH,)),
            F.cross_entropy,
        )
    return build(name)


def predict(name):
    """The prediction alone (the engine's time comes from the published run of bench_zoo.py)."""
    from torch_secorder.backprop import predicted_cost
    from torch_secorder.core._batched_hvp import DEFAULT_MEMORY_BUDGET
    from torch_secorder.core._validation import model_call
    from torch_secorder.core.method_choice import backprop_plan

    model, x, y, loss_fn = built(name)
    called, inputs = model_call(model, x)
    plan, reason = backprop_plan(called, loss_fn, inputs)
    if plan is None:
        return {"skipped": f"no engine plan: {reason[:200]}"}
    cost = predicted_cost(plan, inputs, DEFAULT_MEMORY_BUDGET)
    return {
        "predicted_seconds": cost.seconds(torch.device("cpu"), torch.float32),
        "columns": cost.columns,
        "multiply_adds": cost.multiply_adds,
        "merge_multiply_adds": cost.merge_multiply_adds,
        "steps": cost.steps,
    }


def published(args):
    with open(os.path.join(args.out, "zoo_published_cpu.json")) as handle:
        measured = {row["workload"]: row for row in json.load(handle)["rows"]}
    rows = []
    for name in published_models():
        command = [sys.executable, os.path.abspath(__file__), "--predict", name]
        row = {
            "workload": name,
            **run_child(command),
            "engine_seconds": measured.get(name, {}).get("auto", {}).get("seconds"),
        }
        print(row, flush=True)
        rows.append(row)
    meta = cpu_run_meta(dtype="float32", batch=BATCH)
    write_json(args.out, "cost_published_cpu.json", meta, rows)
    lines = [
        "| model (batch 8) | engine predicted | engine measured (zoo_published_cpu.md) | predicted / measured |",
        "|---|---|---|---|",
    ]
    for row in rows:
        if "predicted_seconds" not in row or not row["engine_seconds"]:
            lines.append(f"| {row['workload']} | {row.get('skipped', '-')} | - | - |")
            continue
        lines.append(
            f"| {row['workload']} | {_seconds(row['predicted_seconds'])} ({row['columns']} columns, "
            f"{row['multiply_adds']:.2g} multiply-adds, {row['merge_multiply_adds']:.2g} in merges, {row['steps']} "
            f"steps) | {_seconds(row['engine_seconds'])} | {row['predicted_seconds'] / row['engine_seconds']:.2f} |"
        )
    header = [
        "# The engine's predicted time on the published-size models against its measured time",
        "",
        f"Commit {meta['commit']}, cpu, torch {meta['torch']}, {meta['threads']} threads, float32, batch {BATCH}. "
        "Predicted here (backprop/cost.py, this machine's speed measured in the same process); measured: method "
        "'auto' on the engine in `zoo_published_cpu.md`'s run. Written by `benchmarks/bench_cost.py --published`.",
        "",
    ]
    write_markdown(args.out, "cost_published_cpu.md", header, lines)


def measure(name, generic_limit):
    from torch_secorder import model_hessian_diagonal
    from torch_secorder.backprop import predicted_cost
    from torch_secorder.backprop.cost import machine_speed
    from torch_secorder.core._batched_hvp import DEFAULT_MEMORY_BUDGET
    from torch_secorder.core._validation import model_call
    from torch_secorder.core.method_choice import backprop_plan

    model, x, y, loss_fn = built(name)
    params = list(model.parameters())
    row = {"parameters": sum(p.numel() for p in params)}

    def gradient():
        output = model(**x) if isinstance(x, dict) else model(x)
        return torch.autograd.grad(loss_fn(output, y), params)

    row["gradient_seconds"] = median_seconds(gradient, torch.device("cpu"), repeats=10, warmup=2)
    called, inputs = model_call(model, x)
    plan, reason = backprop_plan(called, loss_fn, inputs)
    if plan is None:
        return {**row, "skipped": f"no engine plan: {reason[:200]}"}
    start = time.perf_counter()
    cost = predicted_cost(plan, inputs, DEFAULT_MEMORY_BUDGET)
    row["predicted_seconds"] = cost.seconds(torch.device("cpu"), torch.float32)  # includes the speed's measurement
    row["prediction_seconds"] = time.perf_counter() - start
    row.update(columns=cost.columns, multiply_adds=cost.multiply_adds, steps=cost.steps)
    speed = machine_speed(torch.device("cpu"), torch.float32)
    row["product_multiply_adds_per_second"], row["tiny_operation_seconds"] = speed
    try:
        start = time.perf_counter()
        model_hessian_diagonal(model, loss_fn, x, y, method="backprop")
        first = time.perf_counter() - start
    except NotImplementedError as error:
        return {**row, "skipped": f"the engine steps aside: {str(error)[:200]}"}
    repeats = 1 if first > 20 else 3  # a run of minutes varies less than the machine does between them
    row["engine_seconds"] = median_seconds(
        lambda: model_hessian_diagonal(model, loss_fn, x, y, method="backprop"), torch.device("cpu"), repeats, 0
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        model_hessian_diagonal(model, loss_fn, x, y)
        row["auto_first_seconds"] = time.perf_counter() - start
    ours = [str(w.message) for w in caught if "torch_secorder" in str(w.message)]
    row["auto_method"] = "generic" if ours else "engine"
    row["auto_warning"] = ours[0][:400] if ours else None
    row["auto_seconds"] = median_seconds(
        lambda: model_hessian_diagonal(model, loss_fn, x, y), torch.device("cpu"), repeats, 0
    )
    started = [time.perf_counter()]

    def guard(done, total):
        elapsed = time.perf_counter() - started[0]
        if elapsed > 5 and elapsed / done * total > generic_limit:
            raise TimeoutError(elapsed / done * total)

    try:
        model_hessian_diagonal(model, loss_fn, x, y, method="autograd", progress=guard)
        row["generic_seconds"] = time.perf_counter() - started[0]
    except TimeoutError as error:
        row["generic_projected_seconds"] = float(error.args[0])
    except RuntimeError as error:  # PyTorch has no second derivative of hardsigmoid: the engine is the only way
        row["generic_fails"] = f"{type(error).__name__}: {str(error)[:150]}"
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generic-limit", type=float, default=60.0)
    parser.add_argument("--only", default=None)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--published", action="store_true", help="predictions for bench_zoo.py's published sizes")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--predict", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.generic_limit)))
        return
    if args.predict:
        print(json.dumps(predict(args.predict)))
        return
    if args.published:
        published(args)
        return
    rows = []
    for name in list(workloads()) + list(extra_models()):
        if args.only and args.only not in name:
            continue
        command = [sys.executable, os.path.abspath(__file__), "--generic-limit", str(args.generic_limit)]
        row = {"workload": name, **run_child(command + ["--child", name])}
        print(row, flush=True)
        rows.append(row)
    write_results(rows, args)


def _seconds(value):
    return "-" if value is None else (f"{value * 1e3:.0f} ms" if value < 1 else f"{value:.1f} s")


def write_results(rows, args):
    meta = cpu_run_meta(dtype="float32", batch=BATCH)
    write_json(args.out, "cost_cpu.json", meta, rows)
    lines = [
        "| model (batch 8) | parameters | gradient | engine predicted | engine measured | predicted / measured | "
        "generic | auto ran | auto (after its first call) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "skipped" in row or "error" in row:
            lines.append(f"| {row['workload']} | {row.get('parameters', '-')} | - | - | - | - | - | "
                         f"{row.get('skipped', row.get('error', ''))[:150]} | - |")  # fmt: skip
            continue
        predicted = row["predicted_seconds"]
        generic = row.get("generic_seconds")
        if "generic_fails" in row:
            generic_cell = f"fails: {row['generic_fails']}"
        elif generic is None:
            generic_cell = f"projected {_seconds(row['generic_projected_seconds'])}"
        else:
            generic_cell = _seconds(generic)
        lines.append(
            f"| {row['workload']} | {row['parameters']} | {_seconds(row['gradient_seconds'])} | "
            f"{_seconds(predicted)} ({row['columns']} columns, {row['multiply_adds']:.2g} multiply-adds, "
            f"{row['steps']} steps) | "
            f"{_seconds(row['engine_seconds'])} | {predicted / row['engine_seconds']:.2f} | {generic_cell} | "
            f"{row['auto_method']} | {_seconds(row['auto_seconds'])} |"
        )
    header = [
        "# Auto's cost choice: the engine's predicted time against its measured time and the generic method",
        "",
        f"Commit {meta['commit']}, cpu, torch {meta['torch']}, {meta['threads']} threads, float32, batch {BATCH}. "
        "Predicted: backprop/cost.py's multiply-adds and steps priced with this machine's measured speed (a matrix "
        "product, a tiny operation). Engine: method='backprop', median of "
        "warm runs. Generic: one run, or its projection when that passes "
        f"{args.generic_limit:.0f} s. Auto takes the generic method only where the engine is predicted above half "
        "a second and above the generic method's timed projection. Written by `benchmarks/bench_cost.py`.",
        "",
    ]
    write_markdown(args.out, "cost_cpu.md", header, lines)


if __name__ == "__main__":
    main()
