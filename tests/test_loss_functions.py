"""A loss written as a function of the model's output (a lambda, a def) whose body is one supported loss call on
(output, targets) with constant options is read as that loss: the engine runs, exact; anything else in the body
(a scaling, a sum of two losses, the arguments swapped, a tensor option) still goes to the generic method,
naming the function."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import D, assert_backprop_exact, assert_steps_aside

from torch_secorder import explain_method

SMOOTHING = 0.1


def smoothed(output, target):
    return F.cross_entropy(output, target, label_smoothing=SMOOTHING)


def model_and_data(outputs=3, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, outputs)).double()
    x = torch.randn(6, 4, dtype=D)
    return model, x


CASES = {
    "cross-entropy smoothed (def)": (smoothed, lambda: torch.tensor([0, 2, 1, 1, 0, 2])),
    "cross-entropy ignore_index, sum": (
        lambda out, y: F.cross_entropy(out, y, ignore_index=1, reduction="sum"),
        lambda: torch.tensor([0, 2, 1, 1, 0, 2]),
    ),
    "mse": (lambda out, y: F.mse_loss(out, y), lambda: torch.randn(6, 3, dtype=D)),
    "bce-with-logits": (
        lambda out, y: F.binary_cross_entropy_with_logits(out, y, reduction="sum"),
        lambda: torch.rand(6, 3, dtype=D),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_loss_function_with_one_supported_call_runs_the_engine(name):
    loss_fn, targets = CASES[name]
    model, x = model_and_data()
    assert explain_method(model, loss_fn).method == "backprop"
    assert_backprop_exact(model, loss_fn, x, targets())


def test_the_options_are_read_at_each_call():
    global SMOOTHING
    model, x = model_and_data()
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    first = assert_backprop_exact(model, smoothed, x, y)
    SMOOTHING = 0.4
    try:
        second = assert_backprop_exact(model, smoothed, x, y)
    finally:
        SMOOTHING = 0.1
    assert max((a - b).abs().max().item() for a, b in zip(first, second)) > 1e-4


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda out, y: 2 * F.cross_entropy(out, y),
        lambda out, y: F.cross_entropy(out, y) + F.cross_entropy(out, y, label_smoothing=0.2),
        lambda out, y: F.cross_entropy(out, y, weight=torch.tensor([1.0, 2.0, 0.5], dtype=D)),
        lambda out, y: F.cross_entropy(out * 2, y),
    ],
    ids=["scaled", "sum-of-two", "tensor-option", "output-transformed"],
)
def test_any_other_function_goes_to_the_generic_method_naming_it(loss_fn):
    model, x = model_and_data()
    assert_steps_aside(model, x, torch.tensor([0, 2, 1, 1, 0, 2]), "loss <lambda>", loss_fn=loss_fn)
