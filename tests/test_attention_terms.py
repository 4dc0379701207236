"""scaled_dot_product_attention's second-order term in closed form (graph/attention_terms.py): exact against the
float64 brute force for each way a model calls it, and the dense per-sample term left only where it must be."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_backprop_exact

from torch_secorder.backprop.graph import node_ops

Y3 = torch.tensor([0, 2, 1])


def _generator():
    return torch.Generator().manual_seed(1)


class Attention(nn.Module):
    """Queries from one input, keys and values from another (or the same): heads of width 4."""

    def __init__(self, options, key_heads=2, heads=2):
        super().__init__()
        self.options, self.heads, self.key_heads = options, heads, key_heads
        self.q, self.k, self.v = nn.Linear(6, 4 * heads), nn.Linear(6, 4 * key_heads), nn.Linear(6, 4 * key_heads)
        self.out = nn.Linear(4 * heads, 3)

    def forward(self, x, memory=None):
        memory = x if memory is None else memory
        n, length, source = x.shape[0], x.shape[1], memory.shape[1]
        q = self.q(x).reshape(n, length, self.heads, 4).transpose(1, 2)
        k = self.k(memory).reshape(n, source, self.key_heads, 4).transpose(1, 2)
        v = self.v(memory).reshape(n, source, self.key_heads, 4).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, **self.options)
        return self.out(y.transpose(1, 2).reshape(n, length, -1).mean(1))


def _dense_terms(monkeypatch, kind=node_ops.AttentionOp):
    """The nodes of that kind that formed the dense per-sample term (GenericOp's) during the test."""
    dense = []
    original = node_ops.GenericOp.residual_terms

    def spy(self, node, *args):
        if isinstance(self, kind):
            dense.append(node.name)
        yield from original(self, node, *args)

    monkeypatch.setattr(node_ops.GenericOp, "residual_terms", spy)
    return dense


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"is_causal": True},
        {"scale": 0.7},
        {"attn_mask": torch.rand(5, 5, generator=_generator()) > 0.3},
        {"attn_mask": torch.randn(3, 1, 5, 5, generator=_generator(), dtype=torch.float64)},
        {"dropout_p": 0.0, "enable_gqa": False},
    ],
    ids=["plain", "causal", "scale", "boolean-mask", "float-mask", "keywords"],
)
def test_self_attention_exact_in_closed_form(options, monkeypatch):
    dense = _dense_terms(monkeypatch)
    torch.manual_seed(0)
    model = Attention(options).double().eval()
    assert_backprop_exact(model, F.cross_entropy, torch.randn(3, 5, 6, dtype=torch.float64), Y3)
    assert dense == []


def test_grouped_query_attention_exact(monkeypatch):
    """enable_gqa: two query heads read one key/value head (as Llama's grouped heads do)."""
    dense = _dense_terms(monkeypatch)
    torch.manual_seed(0)
    model = Attention({"enable_gqa": True}, key_heads=1).double().eval()
    assert_backprop_exact(model, F.cross_entropy, torch.randn(3, 5, 6, dtype=torch.float64), Y3)
    assert dense == []


def test_cross_attention_exact(monkeypatch):
    """Queries over 4 positions, keys and values over 7 from a second input."""
    dense = _dense_terms(monkeypatch)
    torch.manual_seed(0)
    model = Attention({}).double().eval()
    x = (torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(3, 7, 6, dtype=torch.float64))
    assert_backprop_exact(model, F.cross_entropy, x, Y3)
    assert dense == []


class OneTensor(nn.Module):
    """The same tensor as query, key and value, without a heads axis (3-D): its columns add on one input."""

    def __init__(self):
        super().__init__()
        self.inner, self.out = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.inner(x)
        return self.out(torch.tanh(F.scaled_dot_product_attention(h, h, h)).mean(1))


def test_one_tensor_as_query_key_and_value(monkeypatch):
    dense = _dense_terms(monkeypatch)
    torch.manual_seed(0)
    assert_backprop_exact(OneTensor().double().eval(), F.cross_entropy, torch.randn(3, 5, 6, dtype=torch.float64), Y3)
    assert dense == []


class LearnedBias(nn.Module):
    """A float mask computed from the input by a layer with parameters (a learned attention bias): the mask has
    a second-order term of its own, so the node keeps the dense per-sample term."""

    def __init__(self):
        super().__init__()
        self.q, self.bias, self.out = nn.Linear(6, 8), nn.Linear(6, 5), nn.Linear(8, 3)

    def forward(self, x):
        n, length, _ = x.shape
        q = self.q(x).reshape(n, length, 2, 4).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, q, q, attn_mask=self.bias(x).unsqueeze(1))
        return self.out(y.transpose(1, 2).reshape(n, length, 8).mean(1))


def test_learned_mask_keeps_the_dense_term(monkeypatch):
    dense = _dense_terms(monkeypatch)
    torch.manual_seed(0)
    assert_backprop_exact(LearnedBias().double().eval(), F.cross_entropy, torch.randn(3, 5, 6, dtype=torch.float64), Y3)
    assert dense != []


def test_fully_masked_rows_give_zero_terms(monkeypatch):
    """A boolean mask that hides every key from one query: PyTorch's attention gives that row zeros, and so does
    its term (no NaN)."""
    dense = _dense_terms(monkeypatch)
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[2] = False
    torch.manual_seed(0)
    model = Attention({"attn_mask": mask}).double().eval()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    if not torch.isfinite(model(x)).all():
        pytest.skip("this PyTorch's attention gives NaN on a fully masked row")
    assert_backprop_exact(model, F.cross_entropy, x, Y3)
    assert dense == []


class ExplicitAttention(nn.Module):
    """Attention written out (Hugging Face's eager attention, timm without fused attention): the softmax's term
    in closed form (graph/softmax_terms.py), the products' as the dense per-sample term."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.qkv, self.out = nn.Linear(6, 24), nn.Linear(8, 3)

    def forward(self, x):
        n, length, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        scores = q @ k.transpose(-2, -1) * 0.5
        if self.form == "method":
            weights = scores.softmax(dim=-1)
        elif self.form == "torch":
            weights = torch.softmax(scores, 3)
        else:  # over the queries instead (axis 2), with its dtype spelled out
            weights = F.softmax(scores, dim=2, dtype=scores.dtype)
        y = (weights @ v).transpose(1, 2).reshape(n, length, 8)
        return self.out(y.mean(1))


@pytest.mark.parametrize("form", ["method", "torch", "functional-other-axis"])
def test_explicit_softmax_exact_in_closed_form(form, monkeypatch):
    dense = _dense_terms(monkeypatch, node_ops.SoftmaxOp)
    torch.manual_seed(0)
    model = ExplicitAttention(form).double().eval()
    assert_backprop_exact(model, F.cross_entropy, torch.randn(3, 5, 6, dtype=torch.float64), Y3)
    assert dense == []
