"""auto's choice between the engine and the generic method by predicted cost (backprop/cost.py, the choice in
core/_model_curvature.py). The prediction is checked against its formula; the choice on a model where the two
differ about 30-fold (so that machine speed cannot flip it). No timing is asserted."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import D, relative_error

from torch_secorder import explain_method, model_hessian_diagonal
from torch_secorder.backprop import predicted_gradients
from torch_secorder.core import _model_curvature
from torch_secorder.core.method_choice import backprop_plan


def prediction(model, x, loss_fn=F.cross_entropy):
    plan, reason = backprop_plan(model, loss_fn, (x,))
    assert reason is None, reason
    return predicted_gradients(plan, (x,))


def test_the_loss_alone_costs_its_columns():
    """No curved node: (C - 1) columns over the whole forward, 2/3 of a gradient each."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))
    gradients, columns = prediction(model, torch.randn(3, 4))
    assert columns == 4
    assert gradients == pytest.approx(4 * 2 / 3)


def test_a_curved_node_adds_its_columns_over_what_lies_below_it():
    """Linear(4, 6) (24 multiply-adds a sample), Tanh (6), Linear(6, 3) (18): the loss's 2 columns cross all 48, the
    Tanh's 6 cross the first Linear's 24: (2 x 48 + 6 x 24) x 2 / (3 x 48) gradients."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    gradients, columns = prediction(model, torch.randn(3, 4))
    assert columns == 8
    assert gradients == pytest.approx((2 * 48 + 6 * 24) * 2 / (3 * 48))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) + x)


def test_graphs_are_predicted_too():
    gradients, columns = prediction(Residual(), torch.randn(3, 4))
    assert columns == 2 + 4 and gradients > 2 * 2 / 3


def wide_smooth():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Conv2d(4, 4, 3), nn.SiLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(64, 10),
    )  # fmt: skip
    return model, torch.randn(8, 3, 48, 48), torch.randint(0, 10, (8,))


def test_auto_takes_the_generic_method_where_the_engine_would_cost_far_more():
    """910 parameters, 16,217 second-order columns per sample: the engine about 10 s, the generic method about 0.5 s
    on 2 cores. One warning giving both predictions, the generic method's numbers, and no warning on the next call."""
    model, x, y = wide_smooth()
    assert explain_method(model, F.cross_entropy, x).method == "backprop"  # the engine could run it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = model_hessian_diagonal(model, F.cross_entropy, x, y)
    ours = [str(w.message) for w in caught if "torch_secorder" in str(w.message)]
    assert len(ours) == 1 and "the generic method is predicted faster here" in ours[0], ours
    assert "16217 columns per sample" in ours[0]
    generic = model_hessian_diagonal(model, F.cross_entropy, x, y, method="autograd")
    assert relative_error(auto, generic) < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_hessian_diagonal(model, F.cross_entropy, x, y)  # the choice is remembered, and said once


def test_the_generic_method_is_not_timed_where_the_engine_is_clearly_cheaper(monkeypatch):
    """A ReLU net: the loss's columns only, far below a tenth of a gradient per parameter entry."""
    timed = []
    monkeypatch.setattr(_model_curvature, "_generic_timing", lambda *args: timed.append(1))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3)).double()
    x, y = torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_hessian_diagonal(model, F.cross_entropy, x, y)
    assert timed == []


def test_backprop_is_never_traded(monkeypatch):
    """Whatever the prediction says, method='backprop' runs the engine (and auto follows the prediction)."""
    monkeypatch.setattr(_model_curvature, "_cheaper_generic", lambda *args: "the generic method is predicted faster")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(5, 4, dtype=D), torch.randint(0, 3, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_hessian_diagonal(model, F.cross_entropy, x, y, method="backprop")
    with pytest.warns(RuntimeWarning, match="predicted faster"):
        model_hessian_diagonal(model, F.cross_entropy, x, y)
