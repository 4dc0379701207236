"""Float32 accuracy on models as they come: the engine's and the generic method's float32 errors against a float64
reference, per parameter tensor, and their ratio (point 1 of issue 21: the engine within 10x of the generic method).

Small instances (random weights, eval mode), batch 4, cross-entropy (on out.logits for Hugging Face). Only the first
and last parameter tensors are asked for (requires_grad), so that the generic method stays cheap; the engine still
pulls their columns through the whole model. The reference is the engine in float64 (exact to 1e-10 against
Hessian-vector products in tests/test_model_zoo.py and tests/test_hugging_face.py). Error of a tensor:
|result - reference| / |reference| (2-norms); the ratio floors the generic method's error at 1e-7 (float32's
rounding of the result itself).

    python benchmarks/bench_float32.py [--only NAME]

Writes benchmarks/results/float32_cpu.json and .md (with --only, the other models' rows are kept from the file).
"""

import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F
from bench_zoo import _torchvision
from timing import cpu_run_meta, write_json, write_markdown

HERE = os.path.dirname(os.path.abspath(__file__))
ROUNDING = 1e-7
BATCH = 4


def models():
    def timm(name, **options):
        def make():
            _torchvision()
            import timm as library

            return library.create_model(name, num_classes=10, **options)

        return make

    def efficientnet():
        _torchvision()
        from torchvision.models.efficientnet import EfficientNet, MBConvConfig

        return EfficientNet([MBConvConfig(1, 3, 1, 16, 16, 1), MBConvConfig(4, 3, 2, 16, 24, 2)], 0.2, num_classes=10)

    def convnext():
        _torchvision()
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt

        return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], num_classes=10)

    def mixer():
        _torchvision()
        import timm as library

        return library.models.mlp_mixer.MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=16)

    def hugging_face(kind):
        def make():
            _torchvision()
            import transformers as t

            common = dict(vocab_size=100, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2)
            if kind == "bert":
                config = t.BertConfig(hidden_size=32, max_position_embeddings=32, num_labels=10, **common)
                return t.BertForSequenceClassification(config)
            if kind == "roberta":  # position ids from the padding mask (cumsum)
                config = t.RobertaConfig(hidden_size=32, max_position_embeddings=40, num_labels=10, **common)
                return t.RobertaForSequenceClassification(config)
            if kind == "distilbert":
                config = t.DistilBertConfig(
                    vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=32
                )
                config.num_labels = 10
                return t.DistilBertForSequenceClassification(config)
            if kind == "gpt2":
                config = t.GPT2Config(
                    vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2, num_labels=10, pad_token_id=0
                )
                return t.GPT2ForSequenceClassification(config)
            if kind == "vit":
                config = t.ViTConfig(
                    image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=10,
                )  # fmt: skip
                return t.ViTForImageClassification(config)
            config = t.LlamaConfig(hidden_size=32, max_position_embeddings=32, num_labels=10, pad_token_id=0, **common)
            return t.LlamaForSequenceClassification(config)

        return make

    return {
        "timm DeiT distilled (2 blocks, width 24, patch 8)": timm(
            "deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=24, num_heads=2
        ),
        "timm ViT (2 blocks, width 48, patch 8)": timm(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3
        ),
        "timm MLP-Mixer (2 blocks, width 16)": mixer,
        "torchvision EfficientNet (2 stages)": efficientnet,
        "torchvision ConvNeXt (2 stages, 16-32 channels)": convnext,
        "Hugging Face BERT (2 layers, width 32), 16 tokens": hugging_face("bert"),
        "Hugging Face Llama (2 layers, width 32), 16 tokens": hugging_face("llama"),
        "Hugging Face GPT-2 (2 layers, width 32), 16 tokens": hugging_face("gpt2"),
        "Hugging Face RoBERTa (2 layers, width 32), 16 tokens": hugging_face("roberta"),
        "Hugging Face DistilBERT (2 layers, width 32), 16 tokens": hugging_face("distilbert"),
        "Hugging Face ViT (2 layers, width 32, patch 8)": hugging_face("vit"),
    }


def logits_cross_entropy(out, y):
    return F.cross_entropy(out.logits, y)


def measure(name):
    from torch_secorder import model_hessian_diagonal

    torch.manual_seed(0)
    model = models()[name]().eval()
    y = torch.randint(0, 10, (BATCH,))
    if name.startswith("Hugging Face ViT"):
        pixels = torch.randn(BATCH, 3, 32, 32)
        x, wide_x, loss_fn = {"pixel_values": pixels}, {"pixel_values": pixels.double()}, logits_cross_entropy
    elif name.startswith("Hugging Face"):
        ids, mask = torch.randint(1, 100, (BATCH, 16)), torch.ones(BATCH, 16, dtype=torch.long)
        mask[1, 8:] = 0
        x, loss_fn = {"input_ids": ids, "attention_mask": mask}, logits_cross_entropy
        wide_x = x  # integer inputs: the float64 copy of the model makes its own embeddings
    else:
        x, loss_fn = torch.randn(BATCH, 3, 32, 32), F.cross_entropy
        wide_x = x.double()
    names = [n for n, _ in model.named_parameters()]
    asked = set(names[:4] + names[-2:])
    for n, p in model.named_parameters():
        p.requires_grad_(n in asked)
    reference = model_hessian_diagonal(copy.deepcopy(model).double(), loss_fn, wide_x, y, method="backprop")
    engine = model_hessian_diagonal(model, loss_fn, x, y, method="backprop")
    generic = model_hessian_diagonal(model, loss_fn, x, y, method="autograd")
    tensors = []
    for n, expected, ours, theirs in zip(names, reference, engine, generic):
        if n not in asked or not bool(expected.any()):
            continue
        ours_error = float((ours.double() - expected).norm() / expected.norm())
        theirs_error = float((theirs.double() - expected).norm() / expected.norm())
        tensors.append({"tensor": n, "engine": ours_error, "generic": theirs_error})
    worst = max(tensors, key=lambda t: t["engine"] / max(t["generic"], ROUNDING))
    return {
        "model": name,
        "tensors": tensors,
        "worst": worst,
        "ratio": worst["engine"] / max(worst["generic"], ROUNDING),
    }


def _merged(path, rows):
    """The rows of an earlier run at `path` with these rows in place of (or after) their namesakes, in models()'s
    order."""
    import json

    earlier = {"meta": {}, "rows": []}
    if os.path.exists(path):
        with open(path) as handle:
            earlier = json.load(handle)
    for row in earlier["rows"]:
        row.setdefault("commit", earlier["meta"].get("commit", "-"))  # older files named it in their meta only
    by_model = {row["model"]: row for row in earlier["rows"] + rows}
    return [by_model[name] for name in models() if name in by_model]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    meta = cpu_run_meta(batch=BATCH, rounding_floor=ROUNDING)
    rows = [
        {**measure(name), "commit": meta["commit"]}
        for name in models()
        if args.only is None or args.only.lower() in name.lower()
    ]
    if args.only is not None:  # the other models' rows stay as their own runs measured them
        rows = _merged(os.path.join(args.out, "float32_cpu.json"), rows)
    write_json(args.out, "float32_cpu.json", meta, rows)
    header = [
        "# Float32 accuracy: the engine against the generic method (errors against float64, per parameter tensor)",
        "",
        f"Commit {meta['commit']} (each row names its own: --only reruns some), cpu, torch {meta['torch']}, batch "
        f"{BATCH}; the first and last parameter tensors asked for. Worst tensor by engine error / max(generic error, "
        "1e-7). Written by `benchmarks/bench_float32.py`.",
        "",
    ]
    lines = ["| model | worst tensor | engine error | generic error | ratio | commit |", "|---|---|---|---|---|---|"]
    for row in rows:
        w = row["worst"]
        lines.append(
            f"| {row['model']} | {w['tensor']} | {w['engine']:.2e} | {w['generic']:.2e} | {row['ratio']:.1f}x | "
            f"{row.get('commit', '-')} |"
        )
    write_markdown(args.out, "float32_cpu.md", header, lines)


if __name__ == "__main__":
    sys.exit(main())
