"""A loss written as a function of the model's output (a lambda, a def) whose body is one supported loss call with
constant options, on (output, targets) or on what per-sample ops make of them (out.logits, out[0], slices that keep
every sample, transposes, reshapes folding the batch into rows: losses/reading.py), is read as that loss: the
engine runs, exact, with the loss's own fast rule; anything else in the body (a scaling, a sum of two losses, a
tensor option, arithmetic on the output) is read by what it computes (test_output_functions.py)."""

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


# ---------------------------------------------------------------- places in the output, ops before the loss call
CLASSES, STEPS = 5, 4


class Sequence(nn.Module):
    """(N, STEPS, CLASSES) logits, returned as a tensor, a tuple (logits, features) or a dict."""

    def __init__(self, returns="tensor"):
        super().__init__()
        self.returns = returns
        self.embed, self.head = nn.Linear(3, 6), nn.Linear(6, CLASSES)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        logits = self.head(h)
        if self.returns == "tuple":
            return logits, h
        if self.returns == "dict":
            return {"features": h, "logits": logits}
        return logits


def sequences():
    torch.manual_seed(0)
    x = torch.randn(3, STEPS, 3, dtype=D)
    y = torch.randint(0, CLASSES, (3, STEPS))
    y[1, 2:] = -100  # padding, ignored
    return x, y


READINGS = {
    "rows": ("tensor", lambda out, y: F.cross_entropy(out.reshape(-1, CLASSES), y.reshape(-1))),
    "rows by size": ("tensor", lambda out, y: F.cross_entropy(out.view(-1, out.size(-1)), y.view(-1))),
    "flatten": ("tensor", lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten(), label_smoothing=0.1)),
    "class axis": ("tensor", lambda out, y: F.cross_entropy(out.transpose(1, 2), y, reduction="sum")),
    "shifted": (
        "tensor",
        lambda out, y: F.cross_entropy(out[:, :-1].reshape(-1, CLASSES), y[:, 1:].reshape(-1), ignore_index=-100),
    ),
    "tuple item": ("tuple", lambda out, y: F.cross_entropy(out[0].transpose(1, 2), y)),
    "dict key": ("dict", lambda out, y: F.cross_entropy(out["logits"].flatten(0, 1), y.flatten())),
    "mse on rows": ("tensor", lambda out, y: F.mse_loss(out.reshape(-1, CLASSES), y.reshape(-1, CLASSES))),
    "probabilities on rows": (
        "tensor",
        lambda out, y: F.cross_entropy(out.reshape(-1, CLASSES), y.reshape(-1, CLASSES)),
    ),
}


@pytest.mark.parametrize("name", list(READINGS))
def test_ops_on_the_output_before_the_loss_call_run_on_the_engine(name):
    returns, loss_fn = READINGS[name]
    x, y = sequences()
    if "mse" in name:
        y = torch.randn(3, STEPS, CLASSES, dtype=D)
    if "probabilities" in name:
        y = torch.softmax(torch.randn(3, STEPS, CLASSES, dtype=D), dim=-1)
    model = Sequence(returns).double()
    assert explain_method(model, loss_fn, x, targets=y).method == "backprop"
    assert_backprop_exact(model, loss_fn, x, y)


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda out, y: F.cross_entropy(out.reshape(-1, CLASSES), y.flip(0).reshape(-1)),  # targets reordered
        lambda out, y: F.cross_entropy(out.reshape(-1, CLASSES) * 2, y.reshape(-1)),  # arithmetic after the fold
    ],
    ids=["flipped-targets", "scaled-rows"],
)
def test_other_ops_on_the_output_are_read_by_what_they_compute(loss_fn):
    """Not one loss call on per-sample ops: read as a function of the output (test_output_functions.py)."""
    x, y = sequences()
    y[y < 0] = 0
    assert_backprop_exact(Sequence().double(), loss_fn, x, y)


def test_a_loss_on_one_sample_of_a_tensor_output_steps_aside():
    """out[0] of a tensor is its first sample, not a field of a tuple: the engine, which keeps one row per
    sample, steps aside where the forward shows it."""
    x, y = sequences()
    y[y < 0] = 0
    loss_fn = lambda out, y: F.cross_entropy(out[0], y[0])  # noqa: E731
    assert_steps_aside(Sequence().double(), x, y, "changing the batch axis", loss_fn=loss_fn, explained=False)


class Grid(nn.Module):
    """(N, 2, 5, 5) logits: flatten(0, 1) leaves the class axis at 1 of the rows (the first 5), not the last."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 50)

    def forward(self, x):
        return torch.tanh(self.embed(x)).reshape(x.shape[0], 2, 5, 5)


@pytest.mark.parametrize(
    "loss_fn, targets",
    [
        (lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten(0, 1)), lambda: torch.randint(0, 5, (3, 2, 5))),
        (lambda out, y: F.cross_entropy(out.reshape(-1, 10), y.reshape(-1)), lambda: torch.randint(0, 10, (3, 5))),
    ],
    ids=["flatten-first-two-of-four-axes", "rows-wider-than-the-last-axis"],
)
def test_rows_whose_classes_are_not_the_last_axis(loss_fn, targets):
    """Rows read as what the call folded, wherever its class axis is (these once gave 0.4 relative error, or
    crashed)."""
    torch.manual_seed(0)
    model, x, y = Grid().double(), torch.randn(3, 3, dtype=D), targets()
    assert explain_method(model, loss_fn, x, targets=y).method == "backprop"
    assert_backprop_exact(model, loss_fn, x, y)
