"""One timm and one Hugging Face model on a device, for the GPU check (issue 21, point 7): which method
method="auto" runs and whether it warns, its time against a gradient (float32, batch 8), and its exactness in
float64 against one Hessian-vector product per sampled entry (3 per parameter tensor and each tensor's largest).

The models are bench_zoo.py's small instances (random weights, eval mode): timm's ViT (vit_tiny, 2 blocks, width
48, patch 8, 32 x 32 images) and Hugging Face BERT (2 layers, width 32, 16 tokens, a dict batch with padding in
one sample, cross-entropy on out.logits). A library that is not installed is reported as skipped.

    python benchmarks/gpu_zoo.py --device cuda [--out DIR] [--only NAME]

Writes DIR/gpu_zoo_<device>.json and .md.
"""

import argparse
import copy
import os
import platform
import sys
import warnings

import torch
import torch.nn.functional as F
from timing import measured_commit, median_seconds, write_json, write_markdown

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH, TOKENS, VOCABULARY = 8, 16, 100
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "torchvision_loader"))
import sitecustomize  # noqa: E402, F401  (torchvision's model definitions without its C ops, where they fail to load)


def logits_cross_entropy(out, y):
    return F.cross_entropy(out.logits, y)


def timm_vit(device):
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3
    )
    return model, torch.randn(BATCH, 3, 32, 32, device=device), F.cross_entropy


def hugging_face_bert(device):
    import transformers as t

    config = t.BertConfig(
        vocab_size=VOCABULARY, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=10,
    )  # fmt: skip
    ids = torch.randint(1, VOCABULARY, (BATCH, TOKENS), device=device)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long, device=device)
    mask[1, TOKENS // 2 :] = 0  # padding in one sample
    return t.BertForSequenceClassification(config), {"input_ids": ids, "attention_mask": mask}, logits_cross_entropy


MODELS = {
    "timm ViT (vit_tiny, 2 blocks, width 48, patch 8)": timm_vit,
    "Hugging Face BERT (2 layers, width 32), 16 tokens": hugging_face_bert,
}


def _call(model, x):
    return model(**x) if isinstance(x, dict) else model(x)


def _as_double(x):
    if isinstance(x, dict):
        return {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    return x.double()


def measure(name, device):
    from torch_secorder import explain_method, model_hessian_diagonal
    from torch_secorder.testing import model_loss_of_params, sampled_hessian_diagonal

    torch.manual_seed(0)
    try:
        model, x, loss_fn = MODELS[name](device)
    except ImportError as error:
        return {"model": name, "skipped": f"not installed: {error}"}
    model = model.to(device).eval()
    y = torch.randint(0, 10, (BATCH,), device=device)
    params = list(model.parameters())
    row = {"model": name, "parameters": sum(p.numel() for p in params)}
    row["explain"] = explain_method(model, loss_fn, x, targets=y).method
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_hessian_diagonal(model, loss_fn, x, y)
    row["auto_warnings"] = [str(w.message)[:300] for w in caught if "torch_secorder" in str(w.message)]
    row["gradient_seconds"] = median_seconds(
        lambda: torch.autograd.grad(loss_fn(_call(model, x), y), params), device, repeats=10, warmup=2
    )
    row["auto_seconds"] = median_seconds(lambda: model_hessian_diagonal(model, loss_fn, x, y), device, 2, warmup=0)

    wide, wide_x = copy.deepcopy(model).double(), _as_double(x)
    wide_params = list(wide.parameters())
    actual = model_hessian_diagonal(wide, loss_fn, wide_x, y, method="backprop")
    generator = torch.Generator().manual_seed(1)
    picks = [(i, k) for i, p in enumerate(wide_params) for k in torch.randperm(p.numel(), generator=generator)[:3]]
    picks += [(i, int(a.reshape(-1).abs().argmax())) for i, a in enumerate(actual)]

    loss_of_params = model_loss_of_params(wide, loss_fn, wide_x, y)
    expected = sampled_hessian_diagonal(loss_of_params, wide_params, [(i, int(k)) for i, k in picks])
    scale = max(abs(v) for v in expected.values())
    row["sampled_entries"] = len(expected)
    row["float64_relative_error"] = max(
        abs(actual[i].reshape(-1)[k].item() - v) for (i, k), v in expected.items()
    ) / max(scale, 1e-300)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--only", default=None, help="the models whose name contains this")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [measure(name, device) for name in MODELS if args.only is None or args.only in name]
    meta = {
        "commit": measured_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "batch": BATCH,
    }
    write_json(args.out, f"gpu_zoo_{device.type}.json", meta, rows)
    lines = [
        "| model | auto runs | auto warned | gradient | auto | auto / gradient | float64 error (sampled) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['model']} | {row['skipped'][:120]} | - | - | - | - | - |")
            continue
        lines.append(
            f"| {row['model']} | {row['explain']} | {len(row['auto_warnings'])} | "
            f"{row['gradient_seconds'] * 1e3:.1f} ms | {row['auto_seconds'] * 1e3:.0f} ms | "
            f"{row['auto_seconds'] / row['gradient_seconds']:.0f}x | "
            f"{row['float64_relative_error']:.1e} ({row['sampled_entries']} entries) |"
        )
    header = [
        f"# timm and Hugging Face models on {meta['device']}",
        "",
        f"Commit {meta['commit']}, torch {meta['torch']}, float32 timings (median of warm runs), batch {BATCH}; "
        "exactness in float64. Written by `benchmarks/gpu_zoo.py`.",
        "",
    ]
    write_markdown(args.out, f"gpu_zoo_{device.type}.md", header, lines)
    failed = [r for r in rows if "skipped" not in r and (r["auto_warnings"] or r["float64_relative_error"] > 1e-10)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
