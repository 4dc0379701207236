"""What the examples share: their common command-line options, deterministic data (CIFAR-size images, token
sequences) and models (a small CNN, a small transformer classifier written as people write them: a class with
its own forward)."""

import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def positive_int(text):
    """argparse type: a whole number >= 1, or a usage error that says so."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def example_parser(doc, train_samples, test_samples):
    """An ArgumentParser with the options every example has; add yours, then call parse_example_arguments."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--train-samples", type=positive_int, default=train_samples)
    parser.add_argument("--test-samples", type=positive_int, default=test_samples)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output"),
        help="where the results (JSON, PNG) go (default examples/output)",
    )
    return parser


def parse_example_arguments(parser, argv):
    """(arguments, torch.device); the output folder exists afterwards."""
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    return args, torch.device(args.device)


def train_and_test(make_data, args, device):
    """(train_x, train_y, test_x, test_y) from make_data(samples, generator=...), seeded by args.seed."""
    inputs, labels = make_data(
        args.train_samples + args.test_samples, generator=torch.Generator().manual_seed(args.seed)
    )
    inputs, labels = inputs.to(device), labels.to(device)
    cut = args.train_samples
    return inputs[:cut], labels[:cut], inputs[cut:], labels[cut:]


def cifar_like(samples, classes=10, generator=None, noise=1.5, label_noise=0.1):
    """3x32x32 images: one smooth random template per class (fixed by the generator's first draws),
    shifted by up to 4 pixels (a CNN has to learn translation-robust features), with pixel noise and
    10% of the labels redrawn."""
    templates = F.interpolate(
        torch.randn(classes, 3, 4, 4, generator=generator), size=(40, 40), mode="bilinear", align_corners=False
    )
    labels = torch.arange(samples) % classes
    labels = labels[torch.randperm(samples, generator=generator)]
    shifts = torch.randint(0, 9, (samples, 2), generator=generator)
    images = torch.stack(
        [templates[c, :, i : i + 32, j : j + 32] for c, (i, j) in zip(labels.tolist(), shifts.tolist())]
    )
    images = images + noise * torch.randn(images.shape, generator=generator)
    return images, with_label_noise(labels, label_noise, classes, generator)


def token_majority(samples, length=12, vocab=16, classes=4, generator=None, label_noise=0.1):
    """Token sequences whose label is the signal token (1..classes) that occurs most often: the label's token
    three times, two other signal tokens once each, the rest background tokens, at random positions;
    10% of the labels redrawn."""
    tokens = torch.randint(classes + 1, vocab, (samples, length), generator=generator)
    labels = torch.randint(0, classes, (samples,), generator=generator)
    for row, label in enumerate(labels.tolist()):
        places = torch.randperm(length, generator=generator)[:5]
        others = [c for c in range(classes) if c != label]
        picked = torch.randperm(len(others), generator=generator)[:2].tolist()
        tokens[row, places] = torch.tensor([label + 1] * 3 + [others[k] + 1 for k in picked])
    return tokens, with_label_noise(labels, label_noise, classes, generator)


def small_cnn(classes=10, activation=nn.ReLU):
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        activation(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        activation(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        activation(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, classes),
    )


class Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention and a GELU MLP, each with a residual."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = [t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v)]
        attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(width // self.heads), dim=-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(batch, length, width))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=16, length=12, width=32, heads=2, layers=2, classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(length, width))
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


def with_label_noise(labels, fraction, classes, generator):
    """Replaces a fraction of the labels with uniformly drawn ones, so the loss cannot go to zero (as on real
    data) and the curvature does not vanish late in training."""
    flip = torch.rand(labels.shape, generator=generator) < fraction
    return torch.where(flip, torch.randint(0, classes, labels.shape, generator=generator), labels)


def accuracy(model, inputs, labels):
    with torch.no_grad():
        return (model(inputs).argmax(dim=1) == labels).double().mean().item()
