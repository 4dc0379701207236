"""Tensors whose batch axis a forward moves for a while (timm's qkv.permute(2, 0, 3, 1, 4), time-major
recurrences), and nn.MultiheadAttention read as its ops: exact against the float64 brute force."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import D, assert_steps_aside, exact

N, T, C = 5, 4, 6


def tokens():
    return torch.randn(N, T, 3, dtype=D, generator=torch.Generator().manual_seed(3))


class TimmStyleAttention(nn.Module):
    """qkv packed on a new leading axis, unbound, attention by scaled_dot_product_attention."""

    def __init__(self, heads=2):
        super().__init__()
        self.heads = heads
        self.embed, self.qkv, self.head = nn.Linear(3, C), nn.Linear(C, 3 * C), nn.Linear(C, 5)

    def forward(self, x):
        x = self.embed(x)
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        return self.head((x + y).mean(1))


class IndexedHeads(nn.Module):
    """qkv[0], qkv[1], qkv[2] of the moved tensor (older timm), products of moved tensors."""

    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.head = nn.Linear(3, C), nn.Linear(C, 3 * C), nn.Linear(T * C, 5)

    def forward(self, x):
        x = self.embed(x)
        qkv = self.qkv(x).reshape(x.shape[0], T, 3, C).permute(2, 0, 1, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]
        y = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        return self.head((y * torch.tanh(x)).flatten(1))


class TimeMajor(nn.Module):
    """Time-major stretches: transposes there and back, a movedim, a product of a moved tensor and a restored one."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(3, C), nn.Linear(C, 5)
        self.scale = nn.Parameter(torch.randn(C))

    def forward(self, x):
        h = self.embed(x).transpose(0, 1)  # (T, N, C)
        g = torch.tanh(h.transpose(1, 0)) * h.permute(1, 0, 2) * self.scale
        back = torch.movedim(torch.movedim(torch.sin(x), 0, 2), 2, 0)
        return self.head((g + back.sum(-1, True)).mean(1))


class StaysMoved(nn.Module):
    """A product computed while the batch axis is elsewhere: refused when evaluated, never wrong."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(3, C), nn.Linear(C, 5)

    def forward(self, x):
        h = self.embed(x).transpose(0, 1)
        return self.head((h * h).transpose(0, 1).mean(1))


def test_work_on_a_moved_batch_axis_steps_aside():
    y = torch.tensor([0, 1, 2, 1, 0])
    assert_steps_aside(StaysMoved().double(), tokens(), y, "changing the batch axis", explained=False)


@pytest.mark.parametrize("model", [TimmStyleAttention, IndexedHeads, TimeMajor])
def test_moved_batch_axis_is_exact(model):
    exact(model(), tokens())


class LinearOnMoved(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.mix = nn.Linear(3, C), nn.Linear(N, N)

    def forward(self, x):
        return self.mix(self.embed(x).mean(1).transpose(0, 1)).transpose(0, 1)[:, :5]


def test_module_on_a_moved_tensor_steps_aside():
    model = LinearOnMoved().double()
    assert_steps_aside(model, tokens(), torch.tensor([0, 1, 2, 1, 0]), "whose batch axis was moved")


# ---------------------------------------------------------------- nn.MultiheadAttention


class WithMultiheadAttention(nn.Module):
    def __init__(self, batch_first=True, need_weights=None, cross=False):
        super().__init__()
        self.batch_first, self.need_weights, self.cross = batch_first, need_weights, cross
        self.embed, self.head = nn.Linear(3, C), nn.Linear(C, 5)
        self.attention = nn.MultiheadAttention(C, 2, batch_first=batch_first)

    def forward(self, x):
        h = self.embed(x)
        key = torch.tanh(h) if self.cross else h
        if not self.batch_first:
            h, key = h.transpose(0, 1), key.transpose(0, 1)
        options = {} if self.need_weights is None else {"need_weights": self.need_weights}
        y, _ = self.attention(h, key, key, **options)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(y.mean(1))


@pytest.mark.parametrize(
    "options",
    [
        dict(need_weights=False),  # torchvision's ViT: scaled_dot_product_attention
        dict(),  # need_weights=True by default: an explicit softmax
        dict(cross=True),  # query and key/value differ: three projections
        dict(batch_first=False, need_weights=False),
    ],
)
def test_multihead_attention_is_exact(options):
    exact(WithMultiheadAttention(**options), tokens())


class MaskedAttention(WithMultiheadAttention):
    def forward(self, x):
        h = self.embed(x)
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        y, _ = self.attention(h, h, h, attn_mask=mask)
        return self.head(y.mean(1))


def test_multihead_attention_with_a_mask_steps_aside():
    assert_steps_aside(MaskedAttention().double(), tokens(), torch.tensor([0, 1, 2, 1, 0]), "MultiheadAttention")
