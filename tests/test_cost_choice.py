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
from torch_secorder.backprop import EngineCost, predicted_cost
from torch_secorder.backprop import cost as cost_module
from torch_secorder.core import _model_curvature
from torch_secorder.core.method_choice import backprop_plan

GiB = 1 << 30


def prediction(model, x, loss_fn=F.cross_entropy):
    plan, reason = backprop_plan(model, loss_fn, (x,))
    assert reason is None, reason
    return predicted_cost(plan, (x,), GiB)


def test_the_loss_alone_costs_its_columns():
    """No curved node: Linear(4, 8) (32 multiply-adds a sample), ReLU (8), Linear(8, 5) (40): the loss's C - 1 = 4
    columns cross all 80 for each of the 3 samples, one chunk through the 3 layers."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))
    assert prediction(model, torch.randn(3, 4)) == EngineCost(
        3 * 4 * 80, steps=3, columns=4, forward_multiply_adds=3 * 80
    )


def test_a_curved_node_adds_its_columns_over_what_lies_below_it():
    """Linear(4, 6) (24 multiply-adds a sample), Tanh (6), Linear(6, 3) (18): the loss's 2 columns cross all 48, the
    Tanh's 6 cross the first Linear's 24; one chunk each, through 3 layers and 1."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    assert prediction(model, torch.randn(3, 4)) == EngineCost(3 * (2 * 48 + 6 * 24), 4, 8, forward_multiply_adds=3 * 48)


def test_chunks_follow_the_memory_budget():
    """A budget that holds 2 of the Tanh's 6 columns at a time (4 copies of 3 x 6 float32 values each): 3 chunks
    of it cross the first Linear, the loss's 2 columns go in one chunk through all 3 layers."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    plan, _ = backprop_plan(model, F.cross_entropy, (torch.randn(3, 4),))
    budget = 2 * 4 * 3 * 6 * 4 * (8 if plan.layers is None else 1)
    assert predicted_cost(plan, (torch.randn(3, 4),), budget).steps == 3 * 1 + 1 * 3


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) + x)


def test_graphs_are_predicted_too():
    cost = prediction(Residual(), torch.randn(3, 4))
    assert cost.columns == 2 + 4 and cost.multiply_adds > 3 * 2 * (16 + 12)


def test_seconds_price_both_parts_with_the_machine_speed(monkeypatch):
    monkeypatch.setattr(cost_module, "machine_speed", lambda device, dtype: (1e9, 1e-6))
    seconds = EngineCost(multiply_adds=2e9, steps=1000, columns=1).seconds(torch.device("cpu"), torch.float32)
    slowdown, step = cost_module.MULTIPLY_ADD_SLOWDOWN, cost_module.STEP_IN_TINY_OPS
    assert seconds == pytest.approx(slowdown * 2 + step * 1000 * 1e-6)
    cost = EngineCost(0.0, 0, 0, forward_multiply_adds=1e6)  # a generic Hessian-vector product: >= 0.3 forwards
    assert cost.least_generic_seconds(1000, torch.device("cpu"), torch.float32) == pytest.approx(0.3 * 1000 * 1e-3)


def test_machine_speed_is_measured_once_and_is_plausible():
    rate, tiny = cost_module.machine_speed(torch.device("cpu"), torch.float64)
    assert 1e6 < rate < 1e14 and 1e-9 < tiny < 1e-2
    assert cost_module.machine_speed(torch.device("cpu"), torch.float64) == (rate, tiny)


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
