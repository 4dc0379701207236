"""The elementwise rule family against the float64 brute force."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import D, assert_backprop_exact, brute_force, exact, relative_error, vectors
from models import ACTIVATIONS

from torch_secorder import model_hessian_diagonal


@pytest.mark.parametrize("make_activation", ACTIVATIONS)
def test_each_activation(make_activation):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(3, 4), make_activation(), nn.Linear(4, 4), make_activation(), nn.Linear(4, 2)
    ).double()
    assert_backprop_exact(model, F.mse_loss, torch.randn(5, 3, dtype=D), torch.randn(5, 2, dtype=D))


class ClampHardsigmoid(nn.Module):
    """hardsigmoid written with clamp: the same function, and twice differentiable in PyTorch (hardsigmoid is not)."""

    def forward(self, x):
        return torch.clamp(x / 6 + 0.5, 0, 1)


@pytest.mark.parametrize("inplace", [False, True])
def test_hardsigmoid_against_its_clamp_form(inplace):
    """MobileNetV3's gate: PyTorch cannot differentiate it twice, so neither can the generic method; the engine
    reads it as the piecewise-linear function it is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Hardsigmoid(inplace=inplace), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    model = model.double()
    with torch.no_grad():
        model[0].weight.mul_(4)  # inputs on both flat parts and the slope
    reference = nn.Sequential(model[0], ClampHardsigmoid(), *model[2:])
    x, y = torch.randn(7, 4, dtype=D), torch.randint(0, 3, (7,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = model_hessian_diagonal(model, nn.CrossEntropyLoss(), x, y)
    assert relative_error(auto, brute_force(reference, nn.CrossEntropyLoss(), x, y)) < 1e-12


class HardsigmoidGate(nn.Module):
    """A squeeze-excitation gate (MobileNetV3's) over a curved activation: the tanh's second-order term reads
    the gradient that flows back through the gate."""

    def __init__(self, gate):
        super().__init__()
        self.conv, self.squeeze = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.gate, self.head = gate, nn.Linear(64, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.head((self.gate(self.squeeze(h.mean((2, 3), keepdim=True))) * h).flatten(1))


@pytest.mark.parametrize("shape", ["chain", "gate"])
def test_hardsigmoid_below_a_curved_node_is_exact(shape):
    """PyTorch's hardsigmoid_backward multiplies by 1/6 rounded to float32: gradients through it are 3e-8 off
    in float64. The curved nodes below must read the exact derivative (they were 5e-10 off per tensor)."""
    torch.manual_seed(0)
    if shape == "chain":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Hardsigmoid(), nn.Linear(6, 3)).double()
        reference = nn.Sequential(*model[:3], ClampHardsigmoid(), model[4])
        x = torch.randn(7, 4, dtype=D)
    else:
        model = HardsigmoidGate(nn.Hardsigmoid()).double()
        reference = HardsigmoidGate(ClampHardsigmoid()).double()
        reference.load_state_dict(model.state_dict())
        x = torch.randn(3, 2, 4, 4, dtype=D) * 0.5
    y = torch.randn(x.shape[0], 3, dtype=D)
    engine = model_hessian_diagonal(model, F.mse_loss, x, y, method="backprop")
    assert relative_error(engine, brute_force(reference, F.mse_loss, x, y)) < 1e-12


class InPlaceCalls(nn.Module):
    """In-place calls without a rule of their own: the engine evaluates them on copies."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.threshold = nn.Linear(4, 6), nn.Linear(6, 3), nn.Threshold(0.1, -0.2, inplace=True)

    def forward(self, x):
        h = self.fc1(x)
        h = torch.tanh(h) + h.clamp_(-0.5, 0.5)  # the clamp writes into fc1's output, which tanh has read
        return self.fc2(self.threshold(h))


def test_in_place_calls_through_the_graph_engine():
    torch.manual_seed(0)
    exact(InPlaceCalls(), vectors(4))
