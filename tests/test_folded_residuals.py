"""An activation's second-order term folded through the widening Linear below it (graph/folded_residuals.py):
exact against the float64 brute force, per sample too, and used only where it applies."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_backprop_exact, relative_error

from torch_secorder import model_hessian_diagonal
from torch_secorder.backprop.graph import folded_residuals

Y5 = torch.tensor([0, 1, 2, 1, 0])


class MLPBlock(nn.Module):
    """A transformer's MLP on tokens (d -> 3d -> activation -> d) in a residual branch."""

    def __init__(self, activation, hidden=12, tie=False):
        super().__init__()
        self.embed, self.fc1, self.act = nn.Linear(3, 4), nn.Linear(4, hidden), activation
        self.fc2, self.head = nn.Linear(hidden, 4), nn.Linear(4, 3)
        if tie:  # fc1's weight used again, transposed, by fc2: a parameter used at two places
            self.fc2.weight = self.fc1.weight

    def forward(self, x):
        h = self.embed(x)
        if self.fc2.weight is self.fc1.weight:
            h = h + self.act(self.fc1(h)) @ self.fc1.weight
        else:
            h = h + self.fc2(self.act(self.fc1(h)))
        return self.head(h.mean(1))


@pytest.fixture
def folds(monkeypatch):
    """The curved nodes whose term was folded during the test; folding forced where it applies (on these small
    models it would not pay: test_folding_is_taken_where_it_pays)."""
    found = []
    original = folded_residuals.folded_terms
    monkeypatch.setattr(folded_residuals, "_folding_pays", lambda *args: True)

    def spy(node, below, *args):
        found.append(node.name)
        return original(node, below, *args)

    monkeypatch.setattr(folded_residuals, "folded_terms", spy)
    return found


@pytest.mark.parametrize(
    "activation",
    [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Tanh()],
    ids=["gelu", "gelu-tanh", "silu", "tanh"],
)
def test_folded_through_a_widening_linear_exact(activation, folds):
    torch.manual_seed(0)
    model = MLPBlock(activation).double().eval()
    assert_backprop_exact(model, F.cross_entropy, torch.randn(5, 6, 3, dtype=torch.float64), Y5)
    assert folds == ["act"]


def test_per_sample_diagonals(folds):
    torch.manual_seed(0)
    model = MLPBlock(nn.GELU()).double().eval()
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    per_sample = model_hessian_diagonal(model, F.cross_entropy, x, Y5, method="backprop", per_sample=True)
    # sample n's own term: the loss over the batch is a mean, so each sample's loss scaled by 1 / N
    for n in range(5):
        expected = model_hessian_diagonal(
            model, lambda out, y: F.cross_entropy(out, y, reduction="sum") / 5, x[n : n + 1], Y5[n : n + 1],
            method="autograd",
        )  # fmt: skip
        assert relative_error([d[n] for d in per_sample], expected) < 1e-10
    assert folds


def test_not_folded_where_it_does_not_apply(folds):
    """A Linear that narrows (no gain) and a tied weight (its uses' projections add before squaring): the unit
    columns as before, exact."""
    torch.manual_seed(0)
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    assert_backprop_exact(MLPBlock(nn.GELU(), hidden=6).double().eval(), F.cross_entropy, x, Y5)
    assert_backprop_exact(MLPBlock(nn.GELU(), tie=True).double().eval(), F.cross_entropy, x, Y5)
    assert folds == []


def test_float32_as_accurate_as_the_unit_columns(monkeypatch):
    """The folded columns come from an eigendecomposition per position (in float64): in float32 the result stays
    as close to the float64 one as the unfolded engine's."""
    torch.manual_seed(0)
    model = MLPBlock(nn.GELU(), hidden=16).eval()
    x = torch.randn(5, 6, 3)
    exact = model_hessian_diagonal(model.double(), F.cross_entropy, x.double(), Y5, method="backprop")
    folded = model_hessian_diagonal(model.float(), F.cross_entropy, x, Y5, method="backprop")
    monkeypatch.setattr(folded_residuals, "linear_below", lambda *args: None)
    unfolded = model_hessian_diagonal(model, F.cross_entropy, x, Y5, method="backprop")
    error = relative_error([d.double() for d in folded], exact)
    assert error < max(10 * relative_error([d.double() for d in unfolded], exact), 1e-6), error


class NormOnWideningLinear(nn.Module):
    """A LayerNorm (a curved node whose term is no diagonal) right on a widening Linear: never folded."""

    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.head = nn.Linear(3, 12), nn.LayerNorm(12), nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.ln(self.fc1(x)).mean(1))


def test_a_layer_norm_on_a_widening_linear_keeps_its_own_term(folds):
    torch.manual_seed(0)
    model = NormOnWideningLinear().double().eval()
    assert_backprop_exact(model, F.cross_entropy, torch.randn(5, 6, 3, dtype=torch.float64), Y5)
    assert folds == []


def test_folding_is_taken_where_it_pays():
    """Priced against the unit columns (the eigendecompositions included): not for a 64 -> 128 MLP over a 784-wide
    embedding (its eigh took 900 of 2,114 ms), yes for a transformer's 32 -> 128 MLP on 16 tokens."""
    pays = folded_residuals._folding_pays
    assert not pays(nn.Linear(64, 128), torch.zeros(8, 64), 784 * 64)
    assert pays(nn.Linear(32, 128), torch.zeros(8, 16, 32), 16 * 32 * 96 + 2 * 16 * 16 * 32)
    assert pays(nn.Linear(128, 512), torch.zeros(8, 16, 128), 16 * 128 * 384)  # BERT-tiny
