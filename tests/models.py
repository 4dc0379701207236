"""Models written as people write them, shared by the engine tests (graph engine, curvatures, exactness)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ClassMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = h + self.b(F.softplus(h))  # the skip and the branch meet
        h = h - 0.5 * self.c(torch.sigmoid(h)) / 3
        return self.out(F.gelu(h))


class FunctionalCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.avg_pool2d(torch.tanh(self.conv2(x)), 2)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


class DenseBlock(nn.Module):
    """DenseNet-style: each layer reads the concatenation of everything before it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(3 + 2 * i), nn.ReLU(inplace=True), nn.Conv2d(3 + 2 * i, 2, 3, padding=1))
            for i in range(3)
        )
        self.fc = nn.Linear(9, 3)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return self.fc(F.adaptive_avg_pool2d(torch.cat(features, 1), 1).flatten(1))


class GLU(nn.Module):
    def __init__(self, swish=False):
        super().__init__()
        self.swish = swish
        self.inp, self.gate, self.value, self.out = nn.Linear(6, 6), nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        x = torch.tanh(self.inp(x))
        gate = F.silu(self.gate(x)) if self.swish else torch.sigmoid(self.gate(x))
        return self.out(self.value(x) * gate)


class FusedGLU(nn.Module):
    """One projection split in two halves, then gated (the chunk / split form)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(6, 10), nn.Linear(5, 3)

    def forward(self, x):
        value, gate = self.up(x).chunk(2, dim=-1)
        return self.down(value * F.silu(gate))


class PreNormMLP(nn.Module):
    def __init__(self, width=6, hidden=8, depth=2):
        super().__init__()
        self.embed = nn.Linear(5, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {"norm": nn.LayerNorm(width), "up": nn.Linear(width, hidden), "down": nn.Linear(hidden, width)}
            )
            for _ in range(depth)
        )
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block["down"](F.gelu(block["up"](block["norm"](x))))
        return self.head(self.norm(x))


class BagOfWords(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding, self.fc = nn.Embedding(9, 4, padding_idx=0), nn.Linear(4, 3)

    def forward(self, ids):
        return self.fc(torch.tanh(self.embedding(ids).mean(1)))


class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(7, 3))
        self.fc = nn.Linear(12, 3)

    def forward(self, ids):
        return self.fc(F.gelu(F.embedding(ids, self.table)).flatten(1))


class Attention(nn.Module):
    def __init__(self, width=8, heads=2):
        super().__init__()
        self.heads = heads
        self.embed, self.qkv, self.proj = nn.Linear(3, width), nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 3)

    def forward(self, x):
        x = self.embed(x)
        n, t, c = x.shape
        q, k, v = self.qkv(self.norm(x)).split(c, dim=2)
        q = q.view(n, t, self.heads, c // self.heads).transpose(1, 2)
        k = k.view(n, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(n, t, self.heads, c // self.heads).transpose(1, 2)
        weights = F.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1))), dim=-1)
        y = (weights @ v).transpose(1, 2).contiguous().view(n, t, c)
        return self.head((x + self.proj(y)).mean(1))


class Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

    def forward(self, x):
        return x + self.inner(x)


def exact_zoo():
    """(name, model, inputs, targets, loss_fn): small models in float64 covering common layers and losses."""
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    classes = torch.randint(0, 3, (6,))
    image = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    image_classes = torch.randint(0, 3, (4,))
    tokens = torch.randint(0, 7, (3, 4))
    cases = [
        ("mlp-tanh-ce", nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), x, classes, nn.CrossEntropyLoss()),
        (
            "mlp-relu-mse",
            nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)),
            x,
            torch.randn(6, 2, dtype=torch.float64),
            F.mse_loss,
        ),
        (
            "mlp-gelu-silu-sum",
            nn.Sequential(nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 4), nn.SiLU(), nn.Linear(4, 3)),
            x,
            classes,
            nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1),
        ),
        (
            "bce-multi",
            nn.Sequential(nn.Linear(5, 3), nn.Sigmoid(), nn.Linear(3, 2)),
            x,
            torch.rand(6, 2, dtype=torch.float64).round(),
            nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 0.5], dtype=torch.float64)),
        ),
        ("nll-logsoftmax", nn.Sequential(nn.Linear(5, 3), nn.LogSoftmax(dim=1)), x, classes, nn.NLLLoss()),
        (
            "layernorm-residual",
            nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), Residual(4), nn.Linear(4, 3)),
            x,
            classes,
            nn.CrossEntropyLoss(),
        ),
        (
            "conv-bn-pool",
            nn.Sequential(
                nn.Conv2d(2, 3, 3, padding=1),
                nn.BatchNorm2d(3),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(27, 3),
            ),
            image,
            image_classes,
            nn.CrossEntropyLoss(),
        ),
        (
            "conv-bn-eval-avgpool",
            nn.Sequential(
                nn.Conv2d(2, 2, 3, stride=2),
                nn.BatchNorm2d(2),
                nn.Softplus(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(2, 3),
            ).eval(),
            image,
            image_classes,
            nn.CrossEntropyLoss(),
        ),
        (
            "embedding-huber",
            nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(12, 2)),
            tokens,
            torch.randn(3, 2, dtype=torch.float64),
            nn.SmoothL1Loss(beta=10.0),
        ),
    ]
    return [(name, model.double(), inputs, targets, loss_fn) for name, model, inputs, targets, loss_fn in cases]


ACTIVATIONS = [
    nn.ReLU,
    lambda: nn.LeakyReLU(0.2),
    nn.ELU,
    nn.SELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.GELU,
    lambda: nn.GELU(approximate="tanh"),
    nn.SiLU,
    nn.LogSigmoid,
    lambda: nn.Hardtanh(-0.5, 0.5),
    nn.Identity,
    lambda: nn.CELU(0.7),
    nn.Mish,
    nn.ReLU6,
    nn.Softsign,
    nn.Tanhshrink,
    lambda: nn.Softplus(beta=2.0),
    lambda: nn.ReLU(inplace=True),
    nn.Hardswish,
    lambda: nn.Hardswish(inplace=True),
]
