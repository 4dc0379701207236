"""The main job: `python -m torch_secorder` (or the `torch-secorder` command).

Trains a small classifier on a deterministic synthetic dataset, computes the
exact Hessian diagonal of its loss, prints a per-parameter summary and how long
each method took.
"""

import argparse
import statistics
import sys
import time

import torch
import torch.nn as nn

from . import __version__, _extension
from .core.hessian_diagonal import model_hessian_diagonal
from .core.method_choice import explain_method
from .plot import plot_path_problem, plot_report
from .progress import progress_bar
from .testing import loop_hessian_diagonal


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m torch_secorder", description=__doc__.split("\n\n")[1])
    parser.add_argument("--features", type=int, default=20, help="input features (default 20)")
    parser.add_argument("--hidden", type=int, default=32, help="width of each hidden layer (default 32)")
    parser.add_argument("--depth", type=int, default=2, help="number of hidden layers (default 2)")
    parser.add_argument("--classes", type=int, default=4, help="number of classes (default 4)")
    parser.add_argument("--batch-size", type=int, default=256, help="samples in the loss (default 256)")
    parser.add_argument("--train-steps", type=int, default=100, help="SGD steps before the Hessian (default 100)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument(
        "--method",
        choices=["auto", "backprop", "autograd", "loop", "all"],
        default="auto",
        help="'backprop' is exact Hessian backpropagation, 'autograd' the generic batched method, "
        "'loop' one double backward per entry as in torch-secorder 0.0.1; "
        "'all' runs every method and compares them",
    )
    parser.add_argument("--memory-budget-mb", type=int, default=1024, help="memory budget per chunk (default 1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars on stderr (tqdm when installed)")
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help="save a picture (PNG, SVG, PDF by the suffix) of the diagonal "
        "per parameter tensor and of each method's time (needs matplotlib)",
    )
    args = parser.parse_args(argv)
    if args.plot:
        try:
            problem = plot_path_problem(args.plot)
        except ImportError as error:
            problem = str(error)
        if problem:
            parser.error(problem)  # before any work, not after it
    return args


def synthetic_blobs(samples, features, classes, generator, dtype):
    """Gaussian blobs around fixed class centres: the same data for the same seed, on every machine."""
    centres = 2.0 * torch.randn(classes, features, generator=generator, dtype=dtype)
    labels = torch.arange(samples) % classes
    inputs = centres[labels] + torch.randn(samples, features, generator=generator, dtype=dtype)
    return inputs, labels


def classifier(features, hidden, depth, classes):
    layers, width = [], features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def timed(device, run, quick=0.1, repeats=5):
    """(result, seconds); calls that take under `quick` seconds are repeated and the median kept,
    so that a millisecond method is not judged by its first, cold call."""

    def once():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        value = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return value, time.perf_counter() - start

    result, seconds = once()
    if seconds < quick:
        seconds = statistics.median(once()[1] for _ in range(repeats))
    return result, seconds


def format_seconds(seconds):
    return f"{seconds * 1e3:9.2f} ms" if seconds < 1 else f"{seconds:9.2f} s "


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    inputs, labels = synthetic_blobs(args.batch_size, args.features, args.classes, generator, dtype)
    inputs, labels = inputs.to(device), labels.to(device)
    model = classifier(args.features, args.hidden, args.depth, args.classes).to(device=device, dtype=dtype)
    loss_fn = nn.CrossEntropyLoss()
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    count = sum(p.numel() for p in params)

    compiled = _extension.info()
    widths = "-".join(str(w) for w in [args.features] + [args.hidden] * args.depth + [args.classes])
    print(
        f"torch_secorder {__version__} | torch {torch.__version__} | device {device} | {args.dtype} | "
        f"compiled ops: {compiled['source'] or 'off (pure-torch references)'}"
    )
    print(
        f"model: MLP {widths} (Tanh), {count:,} parameters | data: {args.batch_size} synthetic samples, "
        f"{args.classes} classes | loss: cross-entropy (mean)"
    )

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    start_loss = loss_fn(model(inputs), labels).item()
    for _ in range(args.train_steps):
        optimizer.zero_grad()
        loss_fn(model(inputs), labels).backward()
        optimizer.step()
    print(f"trained {args.train_steps} SGD steps: loss {start_loss:.4f} -> {loss_fn(model(inputs), labels).item():.4f}")

    def gradient():
        return torch.autograd.grad(loss_fn(model(inputs), labels), params)

    _, gradient_seconds = timed(device, gradient)
    choice = explain_method(model, loss_fn, inputs)
    print(f"method 'auto' would use {choice}")
    methods = ["backprop", "autograd", "loop"] if args.method == "all" else [args.method]
    results, seconds = {}, {}
    for method in methods:
        report = progress_bar(method, not args.quiet)
        if method == "loop":

            def run(method=method, report=report):
                return loop_hessian_diagonal(lambda: loss_fn(model(inputs), labels), params, progress=report)
        else:

            def run(method=method, report=report):
                return model_hessian_diagonal(
                    model,
                    loss_fn,
                    inputs,
                    labels,
                    method=method,
                    memory_budget=args.memory_budget_mb << 20,
                    progress=report,
                )

        results[method], seconds[method] = timed(device, run)

    shown = methods[0]
    diag = results[shown]
    print(f"\nexact Hessian diagonal (method {shown}):")
    print(f"{'parameter':<12}{'shape':<12}{'min':>13}{'mean':>13}{'max':>13}{'trace':>13}")
    for name, d in zip(names, diag):
        d64 = d.double()
        print(
            f"{name:<12}{str(tuple(d.shape)):<12}{d64.min().item():>13.4e}{d64.mean().item():>13.4e}"
            f"{d64.max().item():>13.4e}{d64.sum().item():>13.4e}"
        )
    total_trace = sum(d.double().sum().item() for d in diag)
    print(f"{'total':<12}{str((count,)):<12}{'':>39}{total_trace:>13.4e}")

    print("\ntimings (median of 5 warm calls where a call takes under 0.1 s):")
    print(f"  {'gradient (forward + backward)':<34}{format_seconds(gradient_seconds)}")
    for method in methods:
        label = {
            "loop": "loop (one backward per entry)",
            "autograd": "autograd (batched HVPs)",
            "backprop": "backprop (Hessian backprop)",
            "auto": f"auto (uses {choice.method})",
        }[method]
        print(f"  {label:<34}{format_seconds(seconds[method])}  ({seconds[method] / gradient_seconds:,.0f}x gradient)")
    if len(methods) > 1:
        reference = torch.cat([d.double().reshape(-1) for d in results[methods[-1]]])
        for method in methods[:-1]:
            mine = torch.cat([d.double().reshape(-1) for d in results[method]])
            error = (mine - reference).abs().max().item() / max(reference.abs().max().item(), 1e-300)
            print(f"  {method} vs {methods[-1]}: max relative difference {error:.2e}")
    if args.plot:
        plot_report(
            args.plot,
            names,
            diag,
            seconds,
            gradient_seconds,
            f"MLP {widths} (Tanh), {count:,} parameters, batch {args.batch_size}, {args.dtype}, {device}; "
            f"torch_secorder {__version__}",
        )
        print(f"\npicture: {args.plot}")
    return 0
