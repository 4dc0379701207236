"""Models as they come from torchvision, timm and Hugging Face: the engine against a gradient, the generic method
and BackPACK, in one run.

Small instances of each family (random weights, eval mode, float32), CIFAR-sized images (3x32x32) or 16 tokens,
batch 8, cross-entropy (on out.logits for Hugging Face; next-token prediction for the GPT-2 language model).
Methods: a plain gradient; method="auto" (which method it ran is recorded: "engine" or "generic" after a
fallback); the generic method (stopped when its progress projects more than --generic-limit seconds: the
projection is reported instead); BackPACK's DiagGGNExact with its converter where BackPACK takes the model. One
process per (model, method), so that the peak memory is that process's high-water mark above its state before
the call.

    python benchmarks/bench_zoo.py [--only NAME] [--generic-limit 60] [--published]

Writes benchmarks/results/zoo_cpu.json and .md (zoo_published_cpu.* with --published).
"""

import argparse
import copy
import json
import os
import resource
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from timing import cpu_run_meta, median_seconds, memory_cell, run_child, time_cell, write_json, write_markdown

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
METHODS = ["gradient", "auto", "generic", "backpack"]
BATCH, TOKENS, VOCABULARY = 8, 16, 100


def _torchvision():
    sys.path.insert(0, os.path.join(ROOT, "tests", "torchvision_loader"))
    import sitecustomize  # noqa: F401  (torchvision's model definitions without its C ops)
    import torchvision.models as models

    return models


def image_models():
    def tv(make):
        return lambda: make(_torchvision())

    def convnext(models):
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt

        return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], num_classes=10)

    def efficientnet(models):
        from torchvision.models.efficientnet import EfficientNet, MBConvConfig

        blocks = [MBConvConfig(1, 3, 1, 16, 16, 1), MBConvConfig(4, 3, 2, 16, 24, 2), MBConvConfig(4, 5, 2, 24, 40, 1)]
        return EfficientNet(blocks, 0.2, num_classes=10)

    def vit(models):
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)

    def timm(name, **options):
        def make():
            _torchvision()
            import timm as library

            return library.create_model(name, num_classes=10, **options)

        return make

    return {
        "torchvision ResNet-18": tv(lambda m: m.resnet18(num_classes=10)),
        "torchvision ResNet-50": tv(lambda m: m.resnet50(num_classes=10)),
        "torchvision DenseNet-121": tv(lambda m: m.densenet121(num_classes=10)),
        "torchvision MobileNetV3-small (width 0.25)": tv(
            lambda m: m.mobilenet_v3_small(num_classes=10, width_mult=0.25)
        ),
        "torchvision EfficientNet (3 stages, 16-40 channels)": tv(efficientnet),
        "torchvision ConvNeXt (2 stages, 16-32 channels)": tv(convnext),
        "torchvision ViT (2 layers, width 32, patch 8)": tv(vit),
        "timm regnetx_002": timm("regnetx_002"),
        "timm ViT (vit_tiny, 2 layers, width 48, patch 8)": timm(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3
        ),
    }


def text_models():
    def hugging_face(kind):
        def make():
            _torchvision()  # transformers imports torchvision where it is installed
            import transformers as t

            common = dict(vocab_size=VOCABULARY, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2)
            if kind == "bert":
                return t.BertForSequenceClassification(
                    t.BertConfig(hidden_size=32, max_position_embeddings=32, num_labels=10, **common)
                )
            if kind == "gpt2-lm":  # its default: the head tied to the token embedding
                config = t.GPT2Config(vocab_size=VOCABULARY, n_positions=32, n_embd=32, n_layer=2, n_head=2)
                return t.GPT2LMHeadModel(config)
            if kind == "gpt2":  # a classifier head on the last token, as for Llama
                config = t.GPT2Config(
                    vocab_size=VOCABULARY, n_positions=32, n_embd=32, n_layer=2, n_head=2, num_labels=10,
                    pad_token_id=0,
                )  # fmt: skip
                return t.GPT2ForSequenceClassification(config)
            return t.LlamaForSequenceClassification(
                t.LlamaConfig(hidden_size=32, max_position_embeddings=32, num_labels=10, pad_token_id=0, **common)
            )

        return make

    return {
        "Hugging Face BERT (2 layers, width 32), 16 tokens": hugging_face("bert"),
        "Hugging Face Llama (2 layers, width 32), 16 tokens": hugging_face("llama"),
        "Hugging Face GPT-2 (2 layers, width 32), 16 tokens": hugging_face("gpt2"),
        LANGUAGE_MODEL: hugging_face("gpt2-lm"),
    }


def workloads():
    return {**image_models(), **text_models()}


def published_models():
    """Models at the sizes their names are published with (random weights; images at CIFAR size, 16 tokens): where
    the generic method's cost, one Hessian-vector product per parameter entry, meets the engine's, which grows with
    the activations instead. Run with --published; results in zoo_published_cpu.*. GPT-2 has no published "tiny"
    size: it is taken at BERT-tiny's (2 layers, width 128, 2 heads) with its own vocabulary of 50,257 tokens."""

    def bert_tiny():  # google/bert_uncased_L-2_H-128_A-2's configuration
        _torchvision()
        import transformers as t

        config = t.BertConfig(
            vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
            num_labels=10,
        )  # fmt: skip
        return t.BertForSequenceClassification(config)

    def gpt2_tiny():
        _torchvision()
        import transformers as t

        config = t.GPT2Config(n_embd=128, n_layer=2, n_head=2, num_labels=10, pad_token_id=0)
        return t.GPT2ForSequenceClassification(config)

    def timm(name, **options):
        def make():
            _torchvision()
            import timm as library

            return library.create_model(name, num_classes=10, **options)

        return make

    def tv(name):
        return lambda: getattr(_torchvision(), name)(num_classes=10)

    return {
        "Hugging Face BERT-tiny as published (2 layers, width 128, vocabulary 30522), 16 tokens": bert_tiny,
        "Hugging Face GPT-2 at BERT-tiny's size (2 layers, width 128, vocabulary 50257), 16 tokens": gpt2_tiny,
        "timm ViT-tiny (vit_tiny_patch16_224 at 32x32: 12 layers, width 192, 5 tokens)": timm(
            "vit_tiny_patch16_224", img_size=32
        ),
        "timm ConvNeXt-atto (convnext_atto)": timm("convnext_atto"),
        "torchvision MobileNetV3-small": tv("mobilenet_v3_small"),
        "torchvision EfficientNet-B0": tv("efficientnet_b0"),
    }


TEXT_PUBLISHED = ("Hugging Face BERT-tiny", "Hugging Face GPT-2 at")


LANGUAGE_MODEL = "Hugging Face GPT-2 LM, head tied to the embedding (2 layers, width 32), 16 tokens"


def logits_cross_entropy(out, y):
    return F.cross_entropy(out.logits, y)


def next_token_cross_entropy(out, ids):
    logits = out.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def build(name):
    torch.manual_seed(0)
    model = {**workloads(), **published_models()}[name]().eval()
    y = torch.randint(0, 10, (BATCH,))
    if name in text_models() or name.startswith(TEXT_PUBLISHED):
        ids = torch.randint(1, model.config.vocab_size, (BATCH, TOKENS))
        mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
        mask[1, TOKENS // 2 :] = 0  # padding in one sample
        if name == LANGUAGE_MODEL:  # next-token prediction on every position
            return model, {"input_ids": ids, "attention_mask": torch.ones_like(mask)}, ids, next_token_cross_entropy
        return model, {"input_ids": ids, "attention_mask": mask}, y, logits_cross_entropy
    return model, torch.randn(BATCH, 3, 32, 32), y, F.cross_entropy


def _rss_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name, method, generic_limit):
    from torch_secorder import explain_method, model_hessian_diagonal

    model, x, y, loss_fn = build(name)
    params = list(model.parameters())
    measured = {"parameters": sum(p.numel() for p in params)}

    def call(inputs):
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)

    if method == "gradient":

        def run():
            return torch.autograd.grad(loss_fn(call(x), y), params)
    elif method == "auto":
        choice = explain_method(model, loss_fn, x, targets=y)
        measured["method"] = "engine" if choice.method == "backprop" else "generic"
        if choice.method != "backprop":
            measured["reason"] = choice.reason[:300]
            return {**measured, "skipped": "auto takes the generic method: " + choice.reason[:200]}

        def run():
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a fallback: reported with its reason, the generic column times it
                return model_hessian_diagonal(model, loss_fn, x, y)

    elif method == "backpack":
        try:
            from backpack import backpack, extend
            from backpack.extensions import DiagGGNExact
        except ImportError as error:
            return {"skipped": f"BackPACK not installed ({error})"}
        if isinstance(x, dict):
            return {"skipped": "BackPACK takes no dict batches"}
        try:
            extended, extended_loss = extend(copy.deepcopy(model), use_converter=True), extend(nn.CrossEntropyLoss())

            def run():
                extended.zero_grad()
                with backpack(DiagGGNExact()):
                    extended_loss(extended(x), y).backward()
                return [p.diag_ggn_exact for p in extended.parameters()]

            run()
        except Exception as error:
            return {"skipped": f"BackPACK fails: {type(error).__name__}: {str(error)[:120]}"}
    else:
        started, guarding = [time.perf_counter()], [True]

        def guard(done, total):
            elapsed = time.perf_counter() - started[0]
            if guarding[0] and elapsed > 5 and elapsed / done * total > generic_limit:
                raise TimeoutError(elapsed / done * total)

        def run():
            return model_hessian_diagonal(model, loss_fn, x, y, method="autograd", progress=guard)

        try:
            run()
        except TimeoutError as error:
            return {**measured, "projected_seconds": float(error.args[0])}
        guarding[0] = False
    base = _rss_bytes()
    start = time.perf_counter()
    try:
        run()
    except RuntimeWarning as warning:  # auto fell back
        reason = str(warning).split("does not support ", 1)[-1].split("; using the generic")[0]
        return {**measured, "method": "generic", "skipped": "falls back to the generic method: " + reason}
    measured["peak_extra_bytes"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, 0)
    first = time.perf_counter() - start
    if first > 30:  # one run is the measurement: a few minutes each on the published sizes
        measured["seconds"], measured["runs"] = first, 1
        return measured
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    repeats = int(max(1, min(10, 5.0 / max(first, 1e-6))))
    measured["seconds"] = median_seconds(run, torch.device("cpu"), repeats=repeats, warmup=0)
    return measured


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generic-limit", type=float, default=60.0)
    parser.add_argument("--only", default=None)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--published", action="store_true", help="the published-size models instead")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.generic_limit)))
        return
    rows = []
    for name in published_models() if args.published else workloads():
        if args.only and args.only not in name:
            continue
        row = {"workload": name}
        for method in METHODS:
            command = [sys.executable, os.path.abspath(__file__), "--generic-limit", str(args.generic_limit)]
            row[method] = run_child(command + ["--child", name, method])
            print(name, "|", method, "|", row[method], flush=True)
        rows.append(row)
    write_results(rows, args)


def _generic_cell(row):
    generic = row["generic"]
    if "projected_seconds" in generic:
        return f"projected {generic['projected_seconds']:.0f} s"
    return time_cell(row, "generic", digits=0, say_why=True)


def _speedup(row):
    auto, generic = row["auto"].get("seconds"), row["generic"]
    other = generic.get("seconds", generic.get("projected_seconds"))
    if not auto or not other:
        return "-"
    return f"{other / auto:.1f}x" + (" (projected)" if "projected_seconds" in generic else "")


def write_results(rows, args):
    meta = {
        **cpu_run_meta(dtype="float32", batch=BATCH),
        "timing": "median of warm runs after one untimed run (that run alone where it took over 30 s), one process "
        "per (model, method)",
        "memory": "peak extra bytes over the process's state before the first call (high-water mark)",
        "generic": f"stopped after 5 s when its progress projected more than {args.generic_limit:.0f} s",
    }
    stem = "zoo_published_cpu" if args.published else "zoo_cpu"
    write_json(args.out, f"{stem}.json", meta, rows)
    lines = [
        "| model (batch 8) | parameters | gradient | auto | generic | generic / auto | BackPACK DiagGGNExact | "
        "peak MiB gradient / auto / generic |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for method in METHODS:  # one line per cell: reasons cut short (the JSON has them whole)
            if "skipped" in row[method] and len(row[method]["skipped"]) > 150:
                row[method] = {**row[method], "skipped": row[method]["skipped"][:150] + " ..."}
        count = row["gradient"].get("parameters", "-")
        memory = " / ".join(memory_cell(row, m, digits=0) for m in ("gradient", "auto", "generic"))
        lines.append(
            f"| {row['workload']} | {count} | {time_cell(row, 'gradient', digits=1)} | "
            f"{time_cell(row, 'auto', digits=0, say_why=True)} | {_generic_cell(row)} | {_speedup(row)} | "
            f"{time_cell(row, 'backpack', digits=0, say_why=True)} | {memory} |"
        )
    header = [
        "# Models as they come: the engine (method='auto') against a gradient and the generic method",
        "",
        f"Commit {meta['commit']}, {meta['device']}, torch {meta['torch']}, {meta['threads']} threads, float32, "
        f"batch {BATCH}. {meta['timing']}; {meta['generic']}. Written by `benchmarks/bench_zoo.py`.",
        "",
    ]
    write_markdown(args.out, f"{stem}.md", header, lines)


if __name__ == "__main__":
    main()
