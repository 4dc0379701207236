"""Losses the engine reads by what they compute (losses/output_function.py): any scalar function of one place of
the model output, its per-sample Hessian from Hessian-vector products of the function alone, plus the diagonal of
a parameter penalty it adds. Exact against float64 brute force; what it cannot read (samples coupled, two places,
a penalty coupling entries or mixed with the output, an output too big) steps aside, named."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import D, assert_backprop_exact, assert_steps_aside, brute_force, relative_error

from torch_secorder import explain_method, model_hessian_diagonal

CLASSES = 3


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, CLASSES)).double()
    return model, torch.randn(6, 4, dtype=D)


LABELS = torch.tensor([0, 2, 1, 1, 0, 2])


def values():
    return torch.randn(6, CLASSES, dtype=D, generator=torch.Generator().manual_seed(1))


def huber_sum(out, y):
    return F.huber_loss(out, y, delta=0.4, reduction="sum")


LOSSES = {
    "scaled": (lambda out, y: 2 * F.cross_entropy(out, y), LABELS),
    "divided": (lambda out, y: F.cross_entropy(out, y) / 3, LABELS),
    "sum of two": (lambda out, y: F.cross_entropy(out, y) + F.cross_entropy(out, y, label_smoothing=0.2), LABELS),
    "tensor option": (lambda out, y: F.cross_entropy(out, y, weight=torch.tensor([1.0, 2.0, 0.5], dtype=D)), LABELS),
    "output transformed": (lambda out, y: F.cross_entropy(out * 2, y), LABELS),
    "huber (def)": (huber_sum, values()),
    "huber module": (nn.HuberLoss(delta=0.3), values()),
    "smooth l1 module": (nn.SmoothL1Loss(beta=0.5), values()),
    "kl-divergence": (lambda out, y: F.kl_div(F.log_softmax(out, 1), F.softmax(y, 1), reduction="batchmean"), values()),
    "kl-divergence log target": (
        nn.KLDivLoss(reduction="sum", log_target=True),
        F.log_softmax(values(), 1),
    ),
    "gaussian nll": (lambda out, y: F.gaussian_nll_loss(out[:, :2], y[:, :2], out[:, 2:].exp()), values()),
    "bce on probabilities": (lambda out, y: F.binary_cross_entropy(torch.sigmoid(out), y.sigmoid()), values()),
    "poisson nll": (nn.PoissonNLLLoss(), values().exp()),
    "cross-entropy + mse on probabilities": (
        lambda out, y: F.cross_entropy(out, y) + 0.5 * F.mse_loss(out.softmax(1), F.one_hot(y, CLASSES).double()),
        LABELS,
    ),
    "one sample's loss": (lambda out, y: F.cross_entropy(out[2:3], y[2:3]), LABELS),
    "control flow on values": (
        lambda out, y: F.cross_entropy(out, y) if out.mean() > 0 else F.cross_entropy(out.tanh(), y),
        LABELS,
    ),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_functions_of_the_output_run_on_the_engine_exactly(name):
    loss_fn, targets = LOSSES[name]
    model, x = model_and_data()
    assert explain_method(model, loss_fn).method == "backprop"
    assert_backprop_exact(model, loss_fn, x, targets)


def test_a_hooked_loss_module_is_differentiated_with_its_hook():
    model, x = model_and_data()
    loss = nn.MSELoss()
    loss.register_forward_hook(lambda module, inputs, output: 3 * output)
    assert_backprop_exact(model, loss, x, values())


class Outputs(nn.Module):
    """Returns its logits in a dict, a tuple or an object with attributes, next to hidden features."""

    def __init__(self, returns):
        super().__init__()
        self.returns = returns
        self.embed, self.head = nn.Linear(4, 6), nn.Linear(6, CLASSES)

    def forward(self, x):
        hidden = torch.tanh(self.embed(x))
        logits = self.head(hidden)
        if self.returns == "dict":
            return {"hidden": hidden, "logits": logits}
        return logits, hidden


@pytest.mark.parametrize(
    "returns, loss_fn",
    [
        ("dict", lambda out, y: F.cross_entropy(out["logits"], y) + 0.1 * out["logits"].pow(2).mean()),
        ("tuple", lambda out, y: F.cross_entropy(out[0], y, label_smoothing=0.1) * 0.5),
    ],
    ids=["dict", "tuple"],
)
def test_one_place_of_a_structured_output(returns, loss_fn):
    model, x = model_and_data()
    model = Outputs(returns).double()
    assert explain_method(model, loss_fn, x).method == "backprop"
    assert_backprop_exact(model, loss_fn, x, LABELS)


# ---------------------------------------------------------------- parameter penalties
PENALTIES = {
    # (penalty of one tensor, its exact Hessian diagonal)
    "l2": (lambda p: 1e-2 * p.pow(2).sum(), lambda p: torch.full_like(p, 2e-2)),
    "elastic net": (lambda p: 1e-2 * p.abs().sum() + 1e-3 * p.pow(2).sum(), lambda p: torch.full_like(p, 2e-3)),
    "quartic": (lambda p: 0.1 * p.pow(4).sum(), lambda p: 1.2 * p.detach().pow(2)),
}


@pytest.mark.parametrize("name", list(PENALTIES))
def test_a_penalty_on_the_parameters_adds_its_own_diagonal(name):
    penalty, diagonal = PENALTIES[name]
    model, x = model_and_data()

    def with_penalty(out, y):
        return F.cross_entropy(out, y) + sum(penalty(p) for p in model.parameters())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        actual = model_hessian_diagonal(model, with_penalty, x, LABELS, method="backprop")
    expected = [d + diagonal(p) for d, p in zip(brute_force(model, F.cross_entropy, x, LABELS), model.parameters())]
    assert relative_error(actual, expected) < 1e-10
    generic = model_hessian_diagonal(model, with_penalty, x, LABELS, method="autograd")
    assert relative_error(generic, expected) < 1e-10  # the reference's penalty term is the generic method's too


def test_a_penalty_on_some_parameters_only():
    model, x = model_and_data()
    first = model[0].weight

    def decayed(out, y):
        return F.mse_loss(out, y) + 0.3 * first.pow(2).sum()

    actual = model_hessian_diagonal(model, decayed, x, values(), method="backprop")
    expected = brute_force(model, F.mse_loss, x, values())
    expected[0] = expected[0] + 0.6
    assert relative_error(actual, expected) < 1e-10


# ---------------------------------------------------------------- what steps aside
def centred(out, y):
    return F.mse_loss(out - out.mean(0), y)


def two_places(out, y):
    return F.cross_entropy(out["logits"], y) + out["hidden"].pow(2).mean()


def test_a_function_coupling_samples_steps_aside():
    model, x = model_and_data()
    assert_steps_aside(model, x, values(), "couples the samples of the batch", loss_fn=centred, explained=False)


def test_a_function_reading_two_places_of_the_output_steps_aside():
    torch.manual_seed(0)
    model, x = Outputs("dict").double(), torch.randn(6, 4, dtype=D)
    message = "it reads 2 places of the model output (out['hidden'], out['logits'])"
    with pytest.warns(RuntimeWarning, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        auto = model_hessian_diagonal(model, two_places, x, LABELS)
    assert relative_error(auto, brute_force(model, two_places, x, LABELS)) < 1e-10


@pytest.mark.parametrize(
    "make_loss, message",
    [
        (
            lambda model: lambda out, y: F.cross_entropy(out, y) + 1e-2 * sum(p.sum() ** 2 for p in model.parameters()),
            "reads parameters itself with a Hessian that is not diagonal",
        ),
        (
            lambda model: lambda out, y: F.cross_entropy(out * model[2].bias.sum(), y),
            "mixes the model output with tensors it reads itself",
        ),
    ],
    ids=["coupled-penalty", "mixed"],
)
def test_parameter_terms_the_engine_cannot_split_step_aside(make_loss, message):
    model, x = model_and_data()
    loss_fn = make_loss(model)
    with pytest.warns(RuntimeWarning, match=message) as caught:
        auto = model_hessian_diagonal(model, loss_fn, x, LABELS)
    assert len([w for w in caught if "torch_secorder" in str(w.message)]) == 1
    generic = model_hessian_diagonal(model, loss_fn, x, LABELS, method="autograd")
    assert relative_error(auto, generic) < 1e-12
    with pytest.raises(NotImplementedError, match=message):
        model_hessian_diagonal(model, loss_fn, x, LABELS, method="backprop")


def test_an_output_too_big_for_its_dense_hessian_steps_aside():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3000)).double()
    x, y = torch.randn(2, 2, dtype=D), torch.randn(2, 3000, dtype=D)
    with pytest.raises(NotImplementedError, match=r"dense 3000 x 3000 matrix per sample"):
        model_hessian_diagonal(model, huber_sum, x, y, method="backprop", memory_budget=1 << 20)


def test_float32_is_as_accurate_as_the_generic_method():
    model, x = model_and_data()
    loss_fn, targets = LOSSES["kl-divergence"]
    expected = brute_force(model, loss_fn, x, targets)
    model32 = model.float()
    engine = model_hessian_diagonal(model32, loss_fn, x.float(), targets.float(), method="backprop")
    generic = model_hessian_diagonal(model32, loss_fn, x.float(), targets.float(), method="autograd")
    generic_error = relative_error([d.double() for d in generic], expected)
    assert relative_error([d.double() for d in engine], expected) <= 10 * max(generic_error, 1e-7)


def test_the_checks_leave_the_random_state_alone():
    """The random tangents come from a generator of their own: a training loop's next draws do not depend on
    whether its loss was read by what it computes."""
    model, x = model_and_data()
    loss_fn, targets = LOSSES["kl-divergence"]
    before = torch.get_rng_state()
    model_hessian_diagonal(model, loss_fn, x, targets, method="backprop")
    assert torch.equal(torch.get_rng_state(), before)
