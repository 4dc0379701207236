"""The graph engine on models as people write them: every construct against the float64 brute force."""

import copy
import math
import operator
import os
import random
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import (
    Y5,
    D,
    assert_backprop_exact,
    assert_sampled_exact,
    assert_steps_aside,
    brute_force,
    exact,
    randomise_batch_norm,
    relative_error,
    vectors,
)
from models import GLU, Attention, ClassMLP, DenseBlock, FunctionalCNN, FusedGLU, PreNormMLP, ResidualMLP
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchvision_style import BasicBlock, Bottleneck, ResNet

from torch_secorder import explain_method, model_ggn_diagonal, model_hessian_diagonal

# ---------------------------------------------------------------- models written as classes


class FunctionalWeights(nn.Module):
    """F.linear / F.conv2d / F.layer_norm / F.embedding with the module's own parameters, and a bias, a
    scale (LayerScale) and a matrix used directly."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Parameter(torch.randn(3, 2, 3, 3) / 3)
        self.w = nn.Parameter(torch.randn(4, 12) / 3)
        self.b = nn.Parameter(torch.randn(4))
        self.gamma = nn.Parameter(torch.randn(4))
        self.ln_w, self.ln_b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.m = nn.Parameter(torch.randn(4, 3) / 2)
        self.bias = nn.Parameter(torch.randn(3))

    def forward(self, x):
        h = F.conv2d(x, self.conv, None, stride=2)
        h = F.linear(torch.tanh(h).flatten(1), self.w, self.b)
        h = F.layer_norm(h, (4,), self.ln_w, self.ln_b) * self.gamma
        return torch.sigmoid(h) @ self.m + self.bias


@pytest.mark.parametrize(
    "model, shape",
    [
        (ClassMLP, (6,)),
        (ResidualMLP, (6,)),
        (FunctionalCNN, (2, 10, 10)),
        (FunctionalWeights, (2, 5, 5)),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_models_written_as_classes(model, shape):
    torch.manual_seed(0)
    exact(model(), vectors(*shape))


# ---------------------------------------------------------------- torchvision-style ResNets
@pytest.mark.parametrize(
    "block, layers",
    [(BasicBlock, [1, 1, 1, 1]), (Bottleneck, [1, 1, 1, 1]), (BasicBlock, [2, 1, 1, 1])],
    ids=["basic", "bottleneck", "basic-2"],
)
def test_torchvision_style_resnets(block, layers):
    """Too many parameters for the full Hessian: one float64 Hessian-vector product per sampled entry."""
    torch.manual_seed(0)
    model = ResNet(block, layers, num_classes=3, width=4, in_channels=2).double().eval()
    randomise_batch_norm(model, torch.Generator().manual_seed(2))
    assert explain_method(model, F.cross_entropy).method == "backprop"
    assert_sampled_exact(model, F.cross_entropy, vectors(2, 16, 16), Y5)


@pytest.mark.slow  # the full Hessian of a small ResNet: seconds
def test_small_resnet_against_the_full_hessian_with_frozen_layers():
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3, width=2, in_channels=1).double().eval()
    for p in list(model.layer4.parameters()) + list(model.layer1.parameters()):
        p.requires_grad_(False)
    exact(model, vectors(1, 8, 8))


# ---------------------------------------------------------------- concatenation, gating, norms


class SequenceModel(nn.Module):
    """Per-position layers over (N, T, D): LayerNorm over the last axis, mean over positions."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.norm(F.gelu(self.a(x)))
        return self.b(h).mean(1) + self.b(h[:, 0]) * 0.5


@pytest.mark.parametrize(
    "model, shape",
    [
        (DenseBlock, (2, 4, 4)),
        (GLU, (6,)),
        (lambda: GLU(swish=True), (6,)),
        (FusedGLU, (6,)),
        (PreNormMLP, (5,)),
    ],
    ids=["densenet", "glu", "swiglu", "fused-glu", "prenorm-mlp"],
)
def test_concatenation_gating_and_normalisation(model, shape):
    torch.manual_seed(0)
    exact(model(), vectors(*shape))


def test_a_module_applied_twice_side_by_side():
    """self.b on two branches: its per-sample projections are added over the uses before squaring."""
    torch.manual_seed(0)
    exact(SequenceModel(), vectors(3, 4))


# ---------------------------------------------------------------- embeddings


# ---------------------------------------------------------------- attention


class IteratedAttention(Attention):
    """The same attention with q, k, v taken by iterating over the pieces, as many code bases write it:
    map over chunk (lucidrains style), a generator expression, or a list comprehension over split(sizes)."""

    def __init__(self, style):
        super().__init__()
        self.style = style

    def forward(self, x):
        x = self.embed(x)
        n, t, c = x.shape
        qkv = self.qkv(self.norm(x))

        def heads(piece):
            return piece.reshape(n, t, self.heads, -1).transpose(1, 2)

        if self.style == "map":
            q, k, v = map(heads, qkv.chunk(3, dim=-1))
        elif self.style == "generator":
            q, k, v = (heads(piece) for piece in torch.chunk(qkv, 3, -1))
        else:
            q, k, v = [heads(piece) for piece in qkv.split([c, c, c], dim=2)]
        weights = F.softmax((q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1)), dim=-1)
        return self.head((x + self.proj((weights @ v).transpose(1, 2).reshape(n, t, c))).mean(1))


class SumsChunks(nn.Module):
    """Iterates over chunk(3) of 4 features: torch returns 2 pieces of 2, not 3."""

    def __init__(self, features):
        super().__init__()
        self.a, self.b = nn.Linear(6, features), nn.Linear(2, 3)

    def forward(self, x):
        return self.b(sum(torch.tanh(piece) for piece in self.a(x).chunk(3, dim=-1)))


class EncoderClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


def test_hand_written_attention_through_the_engine():
    torch.manual_seed(0)
    exact(Attention(), vectors(4, 3))


@pytest.mark.parametrize("style", ["map", "generator", "list"])
def test_attention_whose_pieces_are_iterated_through_the_engine(style):
    torch.manual_seed(0)
    exact(IteratedAttention(style), vectors(4, 3))


def test_iterating_over_fewer_chunks_than_asked_steps_aside():
    torch.manual_seed(0)
    exact(SumsChunks(6), vectors(6))  # 3 pieces of 2: as the trace takes them
    assert_steps_aside(
        SumsChunks(4).double().eval(),
        vectors(6),
        Y5,
        "a forward the trace does not reproduce (IndexError",
        explained=False,
    )


@pytest.mark.parametrize(
    "model",
    [EncoderClassifier, lambda: nn.MultiheadAttention(4, 2, batch_first=True)],
    ids=["encoder-layer", "multihead"],
)
def test_torch_transformer_layers(model, device):
    """scaled_dot_product_attention's fused kernels have no double backward: the generic method runs the math one
    (nn.TransformerEncoderLayer); nn.MultiheadAttention without masks goes through the engine (no warning)."""
    torch.manual_seed(0)
    model = model()
    if isinstance(model, nn.MultiheadAttention):
        attention = model

        class Wrapped(nn.Module):
            def __init__(self):
                super().__init__()
                self.attention, self.head = attention, nn.Linear(4, 3)

            def forward(self, x):
                return self.head(self.attention(x, x, x, need_weights=False)[0].mean(1))

        model, x = Wrapped(), vectors(4, 4)
    else:
        x = vectors(4, 3)
    model = model.double().eval().to(device)
    x, y = x.to(device), Y5.to(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = model_hessian_diagonal(model, F.cross_entropy, x, y)
    fallback = isinstance(model, EncoderClassifier)
    # auto's cost choice (timed) may take the generic method where the two are close: not a fallback for want of a rule
    ours = [str(w.message) for w in caught if "torch_secorder" in str(w.message)]
    assert len([m for m in ours if "the generic method is predicted faster here" not in m]) == int(fallback), ours
    with sdpa_kernel([SDPBackend.MATH]):
        expected = brute_force(model, F.cross_entropy, x, y)
    assert relative_error(auto, expected) < 1e-10


# ---------------------------------------------------------------- reshapes, slicing, padding, transposed convs
class Reshapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.pad = nn.ReflectionPad2d(1)
        self.up = nn.ConvTranspose2d(3, 2, 2, stride=2)
        self.fc = nn.Linear(2 * 4 * 3 + 8, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(self.pad(F.pad(x, (1, 1, 0, 1)))))  # (2, 5, 4) -> (3, 6, 5)
        h = h[:, :, 1:3, ::2]  # slicing: (3, 2, 3)
        h = F.silu(self.up(h))  # (2, 4, 6)
        left, right = h.split([3, 3], dim=3)
        h = torch.stack([left, right * 2], dim=1).sum(1)  # (2, 4, 3)
        summary = h.permute(0, 2, 3, 1).reshape(h.size(0), -1, 2).mean(1)  # (2,)
        return self.fc(torch.cat([h.flatten(1), summary.repeat(1, 4)], 1))


def test_reshapes_slicing_padding_and_transposed_convolutions():
    torch.manual_seed(0)
    exact(Reshapes(), vectors(2, 5, 4))


def test_cross_entropy_on_outputs_with_positions():
    class Segmenter(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.out = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 1)

        def forward(self, x):
            return self.out(torch.tanh(self.conv(x)))

    torch.manual_seed(0)
    targets = torch.randint(0, 3, (5, 3, 3), generator=torch.Generator().manual_seed(1))
    targets[0, 0, 0] = -100
    exact(Segmenter(), vectors(2, 3, 3), targets)
    exact(
        Segmenter(),
        vectors(2, 3, 3),
        targets,
        loss_fn=nn.CrossEntropyLoss(weight=torch.tensor([1.0, -2.0, 0.5], dtype=D), reduction="sum"),
    )
    probabilities = torch.softmax(torch.randn(5, 3, 3, 3, dtype=D), 1)
    exact(Segmenter(), vectors(2, 3, 3), probabilities, loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1))


# ---------------------------------------------------------------- what the engine must refuse
class BatchMixing(nn.Module):
    def __init__(self, mix):
        super().__init__()
        self.mix, self.a, self.b = mix, nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.mix == "mean":
            h = h - h.mean(0, keepdim=True)
        elif self.mix == "flip":
            h = h + h.flip(0)
        else:
            h = h * h.roll(1, 0)
        return self.b(h)


class Aliased(nn.Module):
    """An in-place change that another path still reads: eager and traced results differ."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        alias = h
        h += 1
        return self.b(torch.tanh(h + alias))


class TiedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


@pytest.mark.parametrize(
    "model, message",
    [
        (lambda: BatchMixing("mean"), "changing the batch axis"),
        (lambda: BatchMixing("flip"), "mixing samples"),
        (lambda: BatchMixing("roll"), "mixing samples"),
        (Aliased, "a forward the trace does not reproduce"),
    ],
    ids=["batch-mean", "batch-flip", "batch-roll", "aliased-in-place"],
)
def test_what_the_engine_cannot_do_exactly_steps_aside(model, message):
    torch.manual_seed(0)
    assert_steps_aside(model().double().eval(), vectors(6), Y5, message, explained=False)


class ShapeDependent(nn.Module):
    """Control flow a symbolic trace cannot follow: on a value, on a shape, len() and iteration over a tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x)) if x.sum() > 0 else torch.sin(self.a(-x))
        if h.shape[-1] == 6 and len(h) > 1:
            h = h + sum(piece for piece in h.unsqueeze(1).transpose(1, 0))  # iterates over a size-1 axis
        return self.b(h * torch.finfo(h.dtype).eps + h)


@pytest.mark.parametrize("sign", [1, -1], ids=["positive", "negative"])
def test_control_flow_is_traced_with_the_call_values(sign):
    """The branch this call's inputs take is the function it differentiates; another input, another plan."""
    torch.manual_seed(0)
    model = ShapeDependent().double()
    x = vectors(6).abs() * sign
    assert explain_method(model, F.cross_entropy, x, targets=Y5).method == "backprop"
    assert "explain_method(..., inputs)" in explain_method(model, F.cross_entropy).reason
    assert_backprop_exact(model, F.cross_entropy, x, Y5)
    assert_backprop_exact(model, F.cross_entropy, -x, Y5)  # the other branch: traced again, a plan of its own
    assert_backprop_exact(model, F.cross_entropy, x[:3], Y5[:3])  # another batch size


def test_a_changed_python_flag_is_traced_again():
    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.skip = True
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h + x if self.skip else h)

    torch.manual_seed(0)
    model = Switch().double()
    exact(model, vectors(6))
    model.skip = False
    exact(model, vectors(6))


def test_hooks_anywhere_step_aside():
    torch.manual_seed(0)
    model = ResidualMLP()
    model.register_forward_hook(lambda module, inputs, output: output * 2)
    assert_steps_aside(model.double().eval(), vectors(6), Y5, "forward hook", explained=False)


# ---------------------------------------------------------------- random graphs
class Activation(nn.Module):
    def __init__(self, index):
        super().__init__()
        self.index = index

    def forward(self, x):
        return RandomGraph.ACTIVATIONS[self.index](x)


class RandomGraph(nn.Module):
    """A random program over tensors of width 4: residual sums, concatenations, gates, norms, activations, MLPs that
    widen, softmax, attention over two tokens, and an earlier step's layer used again (its weights tied across two
    places, the second possibly fed by the first)."""

    ACTIVATIONS = [torch.tanh, torch.sigmoid, F.relu, F.gelu, F.softplus, F.silu]

    def __init__(self, seed, steps=6):
        super().__init__()
        rng = random.Random(seed)
        self.program, self.layers = [], nn.ModuleList()
        width = 4
        for step in range(steps):
            kind = rng.choice(
                ["linear", "add", "cat", "gate", "norm", "scale", "sub", "divide", "mean-product", "moved", "reuse"]
                + ["widen", "softmax", "attention"]
            )
            a = rng.randrange(step + 1)
            b = rng.randrange(step + 1)
            activation = rng.randrange(len(self.ACTIVATIONS))
            square = [
                j for j, layer in enumerate(self.layers) if isinstance(layer, nn.Linear) and layer.in_features == 4
            ]
            if kind == "reuse" and square:
                b = rng.choice(square)  # the earlier layer this step calls again
                self.layers.append(nn.Identity())
            elif kind == "reuse":
                kind = "linear"
                self.layers.append(nn.Linear(width, width))
            elif kind == "cat":
                self.layers.append(nn.Linear(2 * width, width))
            elif kind == "norm":
                self.layers.append(nn.LayerNorm(width))
            elif kind == "widen":  # a transformer's MLP: the activation's term folds through the first Linear
                self.layers.append(
                    nn.Sequential(nn.Linear(width, 3 * width), Activation(activation), nn.Linear(3 * width, width))
                )
            else:
                self.layers.append(nn.Linear(width, width))
            self.program.append((kind, a, b, activation))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        values = [x]
        for (kind, a, b, activation), layer in zip(self.program, self.layers):
            f = self.ACTIVATIONS[activation]
            if kind == "linear":
                out = f(layer(values[a]))
            elif kind == "add":
                out = values[a] + layer(f(values[b]))
            elif kind == "sub":
                out = values[a] - 0.5 * layer(values[b])
            elif kind == "cat":
                out = f(layer(torch.cat([values[a], values[b]], dim=1)))
            elif kind == "gate":
                out = layer(values[a]) * torch.sigmoid(values[b])
            elif kind == "norm":
                out = layer(values[a] + values[b])
            elif kind == "divide":
                out = layer(values[a]) / (1 + torch.sigmoid(values[b]))
            elif kind == "mean-product":
                out = layer(values[a]) * values[b].mean(1, keepdim=True)
            elif kind == "reuse":
                out = f(self.layers[b](values[a]))
            elif kind == "widen":
                out = values[a] + layer(values[b])
            elif kind == "softmax":
                out = layer(values[a]).softmax(dim=1) * values[b]
            elif kind == "attention":  # two tokens of width 2; queries from one value, keys and values from another
                n = values[a].shape[0]
                q, k = layer(values[a]).reshape(n, 2, 2), values[b].reshape(n, 2, 2)
                out = F.scaled_dot_product_attention(q, k, f(k)).reshape(n, 4)
            elif kind == "moved":  # the batch axis moved to 1 and back by indexing
                out = f(layer(values[a])).unsqueeze(2).permute(2, 0, 1)[0] * values[b]
            else:
                out = 0.7 * f(layer(values[a]))
            values.append(out)
        return self.head(values[-1] + values[len(values) // 2])


@pytest.mark.parametrize("seed", range(int(os.environ.get("SECORDER_RANDOM_GRAPHS", "40"))))
def test_random_graphs(seed):
    """SECORDER_RANDOM_GRAPHS=300 runs the longer fuzz."""
    torch.manual_seed(seed)
    exact(RandomGraph(seed, steps=8), vectors(4))


class SameTensorTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = h + h - 0.5 * (h - h) + 3 * h
        h = h * h + torch.sigmoid(h)
        return self.b(torch.cat([h, h], 1))


def test_a_tensor_used_twice_by_one_node():
    torch.manual_seed(0)
    exact(SameTensorTwice(), vectors(6))


class Concatenations(nn.Module):
    """torch.cat as models write it: along the channel axis by a negative index, along the token axis (a class
    token read through expand, a buffer), the same tensor twice, torch.concat with dim= by keyword."""

    def __init__(self):
        super().__init__()
        self.embed, self.token = nn.Linear(3, 4), nn.Parameter(torch.randn(1, 1, 4))
        self.register_buffer("extra", torch.randn(1, 2, 4))
        self.mix, self.head = nn.Linear(8, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x))  # (N, T, 4)
        n = h.shape[0]
        h = torch.cat([self.token.expand(n, -1, -1), h], dim=-2)  # a parameter among the pieces: per sample
        h = torch.cat([h, self.extra.expand(n, -1, -1)], dim=-2)  # (N, T + 3, 4)
        h = torch.sigmoid(self.mix(torch.concat([h, h * h], dim=2)))
        h = torch.cat((h[:, :2], torch.tanh(h[:, 2:]), h[:, :1]), 1)
        return self.head(h.mean(1))


def test_concatenations_pull_each_piece_its_slice(monkeypatch):
    from torch_secorder.backprop.graph import node_ops

    torch.manual_seed(0)
    assert_backprop_exact(Concatenations().double(), F.cross_entropy, vectors(4, 3), Y5)  # traced with values

    def unexpected(*args):
        raise AssertionError("a plain concatenation went through torch.func")

    # DenseNet's concatenations take slices: no batch probe, no vjp
    monkeypatch.setattr(node_ops.GenericOp, "_check_batch", unexpected)
    monkeypatch.setattr(node_ops.GenericOp, "pull", unexpected)
    exact(DenseBlock(), vectors(2, 4, 4))


class BatchConcatenation(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        return torch.cat([h, 2 * h], 0)[: x.shape[0]] + h


def test_a_concatenation_along_the_batch_axis_steps_aside():
    torch.manual_seed(0)
    x = vectors(3)
    assert_steps_aside(BatchConcatenation().double(), x, Y5 % 2, "changing the batch axis", explained=False)


@pytest.mark.parametrize("seed", range(3))
def test_random_graphs_streamed_under_a_tiny_budget(seed):
    torch.manual_seed(seed)
    model = RandomGraph(seed).double()
    expected = brute_force(model, F.cross_entropy, vectors(4), Y5)
    actual = model_hessian_diagonal(model, F.cross_entropy, vectors(4), Y5, method="backprop", memory_budget=1)
    assert relative_error(actual, expected) < 1e-10


# ---------------------------------------------------------------- dropout, cost reports, projections
class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.3, training=self.training))


def test_functional_dropout_is_exact_in_eval():  # in training: test_traps_training_loops.py
    torch.manual_seed(0)
    exact(FunctionalDropout(), vectors(6))


def test_explain_method_reports_what_each_method_costs():
    torch.manual_seed(0)
    choice = explain_method(ResidualMLP(), F.cross_entropy, vectors(6).float())
    assert choice.method == "backprop"
    # 3 classes: 2 loss columns; tanh 6, softplus 6, sigmoid 6, gelu 6 features per sample
    assert "the loss's 2 columns per sample" in choice.cost and "about 26 columns per sample in all" in choice.cost
    resnet = explain_method(
        ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3, width=2, in_channels=1).eval(), F.cross_entropy
    )
    assert "the loss is the only origin" in resnet.cost
    generic = explain_method(nn.Sequential(nn.Linear(4, 3), nn.GroupNorm(1, 3)), F.mse_loss)
    assert generic.method == "autograd" and generic.cost.startswith("21 Hessian-vector products")
    assert "(21 Hessian-vector products" in str(generic)


def test_the_fallback_warning_projects_the_time_of_a_large_generic_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.GroupNorm(1, 30), nn.Linear(30, 2))
    x, y = torch.randn(8, 40), torch.randint(0, 2, (8,))
    with pytest.warns(RuntimeWarning, match=r"projected roughly .*: 1352 Hessian-vector products"):
        model_hessian_diagonal(model, F.cross_entropy, x, y, chunk_size=1352)
    small = nn.Sequential(nn.Linear(4, 3), nn.GroupNorm(1, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_hessian_diagonal(small, F.mse_loss, torch.randn(5, 4), torch.randn(5, 3))
    assert not any("projected" in str(w.message) for w in caught)  # 21 entries: nothing to project


def test_a_call_keeps_no_tensors_of_its_own():
    import gc
    import weakref

    torch.manual_seed(0)
    model = GLU().double()
    x = vectors(6)
    model_hessian_diagonal(model, F.cross_entropy, x, Y5, method="backprop")
    gone = weakref.ref(x)
    del x
    gc.collect()
    assert gone() is None  # the cached plan holds no value of the call


def test_a_replaced_module_is_traced_again():
    torch.manual_seed(0)
    model = ResidualMLP().double()
    exact(model, vectors(6))
    model.out = nn.Linear(6, 3).double()  # new parameters: the cached plan must not give the old ones
    exact(model, vectors(6))


class WideRow(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function
        self.a, self.out = nn.Linear(4, 1500), nn.Linear(1500, 3)

    def forward(self, x):
        return self.out(self.function(self.a(x)))  # one row of 1,500 features


def test_a_dense_second_order_term_beyond_the_budget_is_refused_before_any_work():
    model = WideRow(lambda h: F.normalize(h, dim=1)).double()  # one block of 1500 x 1500
    with pytest.raises(NotImplementedError, match="has blocks of up to 1500 x 1500 per sample"):
        model_hessian_diagonal(model, F.cross_entropy, vectors(4), Y5, method="backprop", memory_budget=16 << 20)


def test_a_wide_softmax_has_its_term_in_closed_form():
    """softmax over 1,500 features: unit columns and one pair per row (graph/softmax_terms.py), within a 16 MiB
    budget where its dense block would not fit."""
    torch.manual_seed(0)
    model = WideRow(lambda h: torch.softmax(h, dim=1)).double()
    assert_sampled_exact(model, F.cross_entropy, vectors(4), Y5)
    model_hessian_diagonal(model, F.cross_entropy, vectors(4), Y5, method="backprop", memory_budget=16 << 20)


def test_the_blocks_of_a_second_order_term_are_its_connected_groups():
    from torch_secorder.backprop.graph.residuals import block_labels, per_sample_hessian_blocks

    x = torch.randn(3, 50, dtype=D)

    def neighbours(v):  # x_i x_{i+1}: one chain through all 50 features
        return v[:, 1:] * v[:, :-1]

    def rows(v):  # a softmax over 10 rows of 5: 10 blocks of 5
        return v.reshape(-1, 10, 5).softmax(-1).reshape(-1, 50)

    assert torch.unique(block_labels(neighbours, [x], torch.randn(3, 49, dtype=D), 64)).numel() == 1
    g = torch.randn(3, 50, dtype=D)
    assert torch.unique(block_labels(rows, [x], g, 64)).numel() == 10
    ((members, blocks),) = per_sample_hessian_blocks(rows, [x], g, 64)
    full = torch.func.vmap(torch.func.hessian(lambda v, gv: (rows(v.unsqueeze(0))[0] * gv).sum()))(x, g)
    for b in range(10):  # each block is the full Hessian's restriction to its features
        assert torch.allclose(blocks[:, b], full[:, members[b]][:, :, members[b]], atol=1e-14)


def test_a_second_order_term_is_formed_block_by_block():
    """a / (2 + tanh(b)) elementwise couples a_i with b_i only: 750 blocks of 2 (found from the term's pattern),
    not one 1500 x 1500 matrix per sample (which the budget below would refuse); a softmax over rows and attention
    over heads split the same way."""

    class WideQuotient(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 750), nn.Linear(4, 750), nn.Linear(750, 3)

        def forward(self, x):
            return self.out(self.a(x) / (2 + torch.tanh(self.b(x))))

    class RowSoftmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.out = nn.Linear(4, 60), nn.Linear(60, 3)

        def forward(self, x):
            return self.out(torch.softmax(self.a(x).reshape(-1, 6, 10), dim=2).flatten(1))

    torch.manual_seed(0)
    assert_backprop_exact(WideQuotient().double(), F.cross_entropy, vectors(4), Y5, memory_budget=16 << 20)
    assert_backprop_exact(RowSoftmax().double(), F.cross_entropy, vectors(4), Y5)


def test_a_product_of_two_same_shape_inputs_is_never_formed_densely():
    """a * b of one shape has its closed-form columns (two per element): no dense term, so no refusal however
    wide (GPT-2's NewGELU, x * (1 + tanh(...)), over 16 tokens of 128 features was refused before)."""

    class WideGate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.out = nn.Linear(4, 400), nn.Linear(400, 3)

        def forward(self, x):
            h = self.a(x)
            return self.out(h * (1 + torch.tanh(h)))  # densely: 5 x 800 x 800, 98 MiB with its eigenvectors

    torch.manual_seed(0)
    assert_backprop_exact(WideGate().double(), F.cross_entropy, vectors(4), Y5, memory_budget=16 << 20)


class IndexedByTheInput(nn.Module):
    """Indices and masks computed from the input: integer tensors, constants to the derivatives."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        picked = h.gather(1, h.argsort(dim=1)[:, :3])
        mask = (h > 0).to(h.dtype)
        return self.b(picked * 2) + (h * mask)[:, :3]


def test_indices_and_masks_computed_from_the_input():
    torch.manual_seed(0)
    exact(IndexedByTheInput(), vectors(6))


class WithKeywordDefaults(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x, mask=None, temperature=2.0):
        h = torch.tanh(self.a(x))
        if mask is not None:
            h = h * mask
        return self.b(h) / temperature


def test_keyword_arguments_with_defaults_are_fixed_to_them():
    torch.manual_seed(0)
    exact(WithKeywordDefaults(), vectors(6))


@pytest.mark.parametrize("positions_first", [False, True], ids=["batchnorm-layout", "layernorm-layout"])
def test_channel_diagonal_reads_factors_dense_and_diagonal_parts_alike(positions_first):
    """BatchNorm's (C, P) and LayerNorm's (P, C) feature orders: the same H as factors + diagonal or as a dense
    matrix gives the same per-channel diagonal, equal to its definition."""
    from torch_secorder.backprop.curvature import Curvature
    from torch_secorder.backprop.rules.shared_weight import channelwise_diagonal

    generator = torch.Generator().manual_seed(3)
    samples, channels, positions, width = 3, 4, 5, 6
    features = (positions, channels) if positions_first else (channels, positions)
    factors = torch.randn(samples, width, channels * positions, generator=generator, dtype=D)
    signs = torch.sign(torch.randn(samples, width, generator=generator, dtype=D))
    diag = torch.randn(samples, channels * positions, generator=generator, dtype=D)
    values = torch.randn(samples, channels, positions, generator=generator, dtype=D)
    factored = Curvature(features, factors=factors, signs=signs, diag=diag)
    dense = Curvature(features, dense=factored.to_dense())
    hessian = dense.dense.reshape(samples, *features, *features)
    if positions_first:
        hessian = hessian.permute(0, 2, 1, 4, 3)  # -> (N, C, P, C, Q)
    expected = torch.stack(
        [torch.einsum("npq,np,nq->", hessian[:, c, :, c, :], values[:, c], values[:, c]) for c in range(channels)]
    )
    for curvature in (factored, dense):
        assert relative_error(channelwise_diagonal(curvature, values, positions_first), expected) < 1e-12


class SqueezeExcitation(nn.Module):
    def __init__(self, channels=8, side=8):
        super().__init__()
        self.conv, self.fc1, self.fc2 = (
            nn.Conv2d(3, channels, 3, padding=1),
            nn.Linear(channels, 4),
            nn.Linear(4, channels),
        )
        self.head = nn.Linear(channels * (side // 2) ** 2, 5)

    def forward(self, x):
        h = F.silu(self.conv(x))
        gate = torch.sigmoid(self.fc2(F.silu(self.fc1(h.mean((2, 3))))))
        return self.head(F.avg_pool2d(h * gate[:, :, None, None], 2).flatten(1))


def test_a_broadcast_gate_is_exact_without_a_dense_term():
    """h * gate with gate (N, C, 1, 1): its dense per-sample term would be (C H W + C)^2 (16 x 24 x 24 features:
    2.7 GiB per sample with its eigendecomposition, over the budget); in closed form it is one pair per channel."""
    torch.manual_seed(0)
    model = SqueezeExcitation(channels=16, side=24).double()
    x, y = torch.randn(2, 3, 24, 24, dtype=D), torch.randint(0, 5, (2,))
    assert explain_method(model, F.cross_entropy, x).method == "backprop"  # the engine can (auto may time both)
    assert_sampled_exact(model, F.cross_entropy, x, y, per_parameter=8)


def test_a_squeeze_excitation_gate_in_float32_is_as_accurate_as_the_generic_method():
    """The gate's product is a curved node (its closed form: one pair per channel); float32's eigendecomposition
    of its dense term did not always converge, and lost accuracy, before."""
    for seed in range(3):
        torch.manual_seed(seed)
        model, x, y = SqueezeExcitation(), torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
        wide = copy.deepcopy(model).double()
        reference = model_hessian_diagonal(wide, F.cross_entropy, x.double(), y, method="autograd")
        engine = model_hessian_diagonal(model, F.cross_entropy, x, y, method="backprop")
        generic = model_hessian_diagonal(model, F.cross_entropy, x, y, method="autograd")
        assert relative_error(engine, reference) <= 10 * max(relative_error(generic, reference), 1e-7)
        float64 = model_hessian_diagonal(wide, F.cross_entropy, x.double(), y, method="backprop")
        assert relative_error(float64, reference) < 1e-12


def test_the_projection_times_a_chunk_of_the_generic_method_itself():
    """The fallback warning measures batched chunks of Hessian-vector products (a gradient's time alone was 5-15x
    too high on small models, whose batched products cost a fraction of a gradient). No timing is asserted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    entries = sum(p.numel() for p in model.parameters())
    with pytest.warns(RuntimeWarning, match=rf"projected roughly .*: {entries} Hessian-vector products .*, batched, "):
        model_hessian_diagonal(model.train(), F.cross_entropy, x, y)


# ---------------------------------------------------------------- parameters used at several places
class Siamese(nn.Module):
    """One Linear on two halves of the input, a scale used by a product and a sum side by side."""

    def __init__(self):
        super().__init__()
        self.f, self.head = nn.Linear(3, 4), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x):
        u = torch.tanh(self.f(x[:, :3])) * self.scale
        v = torch.sigmoid(self.f(x[:, 3:])) + self.scale
        return self.head(torch.cat([u, v * u], 1))


class TwoEmbeddingLookups(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding, self.head = nn.Embedding(7, 4), nn.Linear(4, 3)

    def forward(self, ids, other):
        return self.head(torch.tanh(self.embedding(ids).mean(1)) * self.embedding(other).mean(1))


def test_parameters_used_side_by_side():
    torch.manual_seed(0)
    exact(Siamese(), vectors(6))
    model, x = Siamese().double(), vectors(6)
    full = assert_backprop_exact(model, F.cross_entropy, x, Y5, memory_budget=1)  # one column per chunk
    per_sample = model_hessian_diagonal(model, F.cross_entropy, x, Y5, method="backprop", per_sample=True)
    assert relative_error([p.sum(0) for p in per_sample], full) < 1e-12
    ids, other = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5, 2))
    assert_backprop_exact(TwoEmbeddingLookups().double(), F.cross_entropy, (ids, other), Y5)


class TiedHead(nn.Module):
    """A language model's head tied to its embedding: the head's use is fed by the embedding's."""

    def __init__(self):
        super().__init__()
        self.embedding, self.mid = nn.Embedding(7, 4), nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.embedding(ids)))).transpose(1, 2)


class ScaleTwice(nn.Module):
    """One scale read by two products, the second fed by the first (through tanh)."""

    def __init__(self):
        super().__init__()
        self.scale, self.out = nn.Parameter(torch.randn(6)), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(x * self.scale) * self.scale.reshape(1, -1))


@pytest.mark.parametrize("model", [TiedWeights, ScaleTwice], ids=["module-on-its-own-output", "scale-twice"])
def test_a_parameter_whose_use_feeds_another_use_is_exact(model):
    """The later use's mixed second derivative (input x parameter) times the earlier use's projections."""
    torch.manual_seed(0)
    model = model().double().eval()
    assert explain_method(model, F.cross_entropy).method == "backprop"
    assert_backprop_exact(model, F.cross_entropy, vectors(6), Y5)
    per_sample = model_hessian_diagonal(model, F.cross_entropy, vectors(6), Y5, method="backprop", per_sample=True)
    for n in range(5):  # each sample's own Hessian (mean reduction: 1/N of one sample's loss)
        one = brute_force(model, F.cross_entropy, vectors(6)[n : n + 1], Y5[n : n + 1])
        assert relative_error([p[n] * 5 for p in per_sample], one) < 1e-10


def test_a_tied_head_is_exact():
    """A language model's head reading its embedding's table: per-sample columns and the head's mixed term."""
    torch.manual_seed(0)
    ids, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5, 3))
    model = TiedHead().double()
    assert_backprop_exact(model, F.cross_entropy, ids, y)
    # the GGN has no mixed term: the projections summed over the uses, squared, are all of it
    ggn = model_ggn_diagonal(model, F.cross_entropy, ids, y, method="backprop")
    assert relative_error(ggn, model_ggn_diagonal(model, F.cross_entropy, ids, y, method="autograd")) < 1e-10


# ---------------------------------------------------------------- x @ W with W a parameter
class RightWeights(nn.Module):
    """GPT-2's Conv1D written out: x @ W + b with W stored (in, out), and W2 used through matmul."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(6))
        self.w2 = nn.Parameter(torch.randn(6, 3))

    def forward(self, x):
        return torch.matmul(torch.tanh(x @ self.w + self.b), self.w2).mean(1)


def test_a_product_with_a_weight_on_the_right_runs_the_linear_rule():
    """Read as an nn.Linear holding W^T (its rule's closed forms, not per-sample projections), the diagonals
    read back in W's (in, out) layout: exact, and each product node is a module op."""
    from torch_secorder.backprop.graph import node_ops, trace

    torch.manual_seed(0)
    model = RightWeights().double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    assert_backprop_exact(model, F.cross_entropy, x, Y5)
    nodes = trace.plan_for(model, (x,)).nodes
    products = [node for node in nodes if node.fx_node.target in (torch.matmul, operator.matmul)]
    assert len(products) == 2 and all(isinstance(node.op, node_ops.ModuleOp) for node in products)


class TiedRight(nn.Module):
    """A Linear's weight used again as the right factor of a product: its uses' projections add up before
    squaring (also where the product is read as a Linear), and the Hessian's mixed term between them."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.head = nn.Linear(3, 4), nn.Linear(4, 6), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(torch.tanh(self.fc(self.embed(x))) @ self.fc.weight))


def test_a_weight_used_by_its_layer_and_on_the_right_of_a_product():
    torch.manual_seed(0)
    model = TiedRight().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    assert_backprop_exact(model, F.cross_entropy, x, Y5)
    from torch_secorder import model_ggn_diagonal

    engine = model_ggn_diagonal(model, F.cross_entropy, x, Y5, method="backprop")
    assert relative_error(engine, model_ggn_diagonal(model, F.cross_entropy, x, Y5, method="autograd")) < 1e-10
