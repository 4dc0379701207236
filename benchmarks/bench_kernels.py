"""Compiled kernels against their pure-torch references, at realistic shapes.

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--batch 256]

Writes benchmarks/results/kernels_<device>.{json,md}. The conv weight-diagonal shapes are those
of the CNN and VGG-style benchmark layers; timings are medians of warm runs (CUDA events on GPU).
The loss-curvature kernels only stream memory, so for them the table also gives the bytes they
must move and the rate achieved (compare with the device's memory bandwidth, ~3 TB/s on an H100).
"""

import argparse
import json
import os
import platform

import torch
from timing import measured_commit, median_seconds

from torch_secorder import ops, reference_ops

HERE = os.path.dirname(os.path.abspath(__file__))


def cases(batch, device):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    columns = 10  # cross-entropy over 10 classes
    for name, outs, ins, positions in [
        ("conv 3->16, 3x3, 32x32", 16, 27, 1024),
        ("conv 16->32, 3x3, 16x16", 32, 144, 256),
        ("conv 32->32, 3x3, 16x16", 32, 288, 256),
    ]:
        factors, inputs = randn(batch, columns, outs, positions), randn(batch, ins, positions)
        yield (
            f"affine_weight_diagonal, {name}, batch {batch}",
            lambda f=factors, x=inputs: torch.ops.torch_secorder.affine_weight_diagonal(f, None, x),
            lambda f=factors, x=inputs: reference_ops.affine_weight_diagonal(f, None, x),
            None,
        )
        selected = positions // 4
        compact = randn(batch, columns, outs, selected)
        indices = torch.randint(0, positions, (batch, outs, selected), generator=generator).to(device)
        yield (
            f"selected_weight_diagonal, {name} after 2x2 max pool, batch {batch}",
            lambda f=compact, i=indices, x=inputs: torch.ops.torch_secorder.selected_weight_diagonal(f, None, i, x),
            lambda f=compact, i=indices, x=inputs: reference_ops.selected_weight_diagonal(f, None, i, x),
            None,
        )
    wide = randn(batch, 266, 256)
    yield (
        f"factor_diagonal, 266 columns x 256 features, batch {batch}",
        lambda: torch.ops.torch_secorder.factor_diagonal(wide, None),
        lambda: reference_ops.factor_diagonal(wide, None),
        None,
    )
    # loss curvature: rows of logits (a batch of sequences' tokens, say), bytes = reads + writes
    rows = batch * 64
    for classes in (10, 1000):
        logits, scale = randn(rows, classes), randn(rows).abs()
        item = logits.element_size()
        yield (
            f"softmax_hessian_diag, {rows} rows x {classes} classes",
            lambda x=logits, s=scale: torch.ops.torch_secorder.softmax_hessian_diag(x, s),
            lambda x=logits, s=scale: reference_ops.softmax_hessian_diag(x, s),
            (2 * rows * classes + rows) * item,
        )
    logits, scale = randn(rows, 10), randn(rows).abs()
    yield (
        f"softmax_hessian_sqrt, {rows} rows x 10 classes",
        lambda: torch.ops.torch_secorder.softmax_hessian_sqrt(logits, scale),
        lambda: reference_ops.softmax_hessian_sqrt(logits, scale),
        (rows * 10 + rows + rows * 100) * logits.element_size(),
    )
    values, weights = randn(rows, 100), randn(rows, 100).abs()
    yield (
        f"sigmoid_hessian_diag, {rows} x 100",
        lambda: torch.ops.torch_secorder.sigmoid_hessian_diag(values, weights),
        lambda: reference_ops.sigmoid_hessian_diag(values, weights),
        3 * values.numel() * values.element_size(),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    assert ops.compiled_ops_loaded(), "compiled ops are not available"
    rows = []
    for name, kernel, reference, bytes_moved in cases(args.batch, device):
        error = ((kernel() - reference()).abs().max() / reference().abs().max()).item()
        kernel_s, reference_s = median_seconds(kernel, device), median_seconds(reference, device)
        rows.append(
            {
                "case": name,
                "kernel_ms": kernel_s * 1e3,
                "reference_ms": reference_s * 1e3,
                "speedup": reference_s / kernel_s,
                "max_relative_difference": error,
                "bytes_moved": bytes_moved,
                "kernel_gb_per_s": bytes_moved / kernel_s / 1e9 if bytes_moved else None,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    meta = {
        "commit": measured_commit(),
        "device": args.device if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
    }
    os.makedirs(args.out, exist_ok=True)
    tag = f"kernels_{device.type}"
    with open(os.path.join(args.out, tag + ".json"), "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=2)
    lines = [
        "| case | kernel | pure-torch reference | speed-up | max rel. diff | kernel GB/s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['kernel_ms']:.3f} ms | {r['reference_ms']:.3f} ms | {r['speedup']:.1f}x | "
        f"{r['max_relative_difference']:.1e} | "
        f"{'-' if r['kernel_gb_per_s'] is None else format(r['kernel_gb_per_s'], '.1f')} |"
        for r in rows
    ]
    with open(os.path.join(args.out, tag + ".md"), "w") as handle:
        handle.write(f"Measured with {json.dumps(meta)}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
