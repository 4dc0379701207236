"""Activations written as expressions (GPT-2's NewGELU, QuickGELU, Mish) read as one elementwise function
(graph/elementwise_regions.py): one diagonal term at the expression's input, exact against the float64 brute force."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_backprop_exact

from torch_secorder.backprop.graph import elementwise_regions

Y5 = torch.tensor([0, 1, 2, 1, 0])
EXPRESSIONS = {
    "new-gelu": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    "quick-gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "mish": lambda x: x * torch.tanh(F.softplus(x)),
    "cube-minus-square": lambda x: x**3 / 6 - x * x + torch.sin(x) * 0 + x,
}


class Block(nn.Module):
    def __init__(self, expression, hidden, norm):
        super().__init__()
        self.expression, self.norm = expression, norm
        self.embed, self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, hidden), nn.Linear(hidden, 4)
        self.ln, self.head = nn.LayerNorm(hidden), nn.Linear(4, 3)

    def forward(self, x):
        h = self.embed(x)
        inner = self.fc1(h)
        if self.norm:  # the expression's input is no Linear's output: unit columns
            inner = self.ln(inner)
        return self.head((h + self.fc2(self.expression(inner))).mean(1))


@pytest.fixture
def regions(monkeypatch):
    found = []
    original = elementwise_regions.find_regions

    def spy(*args):
        result = original(*args)
        found.extend(result)
        return result

    monkeypatch.setattr(elementwise_regions, "find_regions", spy)
    return found


@pytest.mark.parametrize("norm", [False, True], ids=["folded", "unit-columns"])
@pytest.mark.parametrize("name", ["new-gelu", "quick-gelu", "mish"])
def test_expression_activations_exact(name, norm, regions):
    torch.manual_seed(0)
    model = Block(EXPRESSIONS[name], hidden=12, norm=norm).double().eval()
    assert_backprop_exact(model, F.cross_entropy, torch.randn(5, 6, 3, dtype=torch.float64), Y5)
    assert len(regions) == 1


def test_an_expression_with_an_op_outside_the_set_is_left_as_it_was(regions):
    """torch.sin is an unknown call (not read as elementwise): the expression stays as its nodes, exact."""
    torch.manual_seed(0)
    model = Block(EXPRESSIONS["cube-minus-square"], hidden=12, norm=False).double().eval()
    assert_backprop_exact(model, F.cross_entropy, torch.randn(5, 6, 3, dtype=torch.float64), Y5)
