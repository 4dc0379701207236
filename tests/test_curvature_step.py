"""backward=True: one call for a curvature step leaves in .grad what loss.backward() would (accumulated, hooks
and all), returns the loss, and gives the same diagonals as a call without it, on every path (the chain engine,
the graph engine, the generic method, per sample, the GGN, dropout in train mode)."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import D, relative_error
from models import ResidualMLP

from torch_secorder import model_ggn_diagonal, model_hessian_diagonal


class GroupNormNet(nn.Module):  # no engine rule for GroupNorm: the generic method runs it
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(4, 6), nn.GroupNorm(2, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.norm(self.a(x))))


MODELS = {
    "tanh chain": lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)),
    "relu chain": lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)),
    "residual graph": lambda: ResidualMLP(),
    "generic fallback": GroupNormNet,
    "dropout in train mode": lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.4), nn.Linear(6, 3)),
}


def problem(name):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    model.train(name == "dropout in train mode").requires_grad_(True)
    generator = torch.Generator().manual_seed(1)
    features = 6 if name == "residual graph" else 4
    x = torch.randn(7, features, dtype=D, generator=generator)
    return model, x, torch.randint(0, 3, (7,), generator=generator)


def backward_grads(model, x, y, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(
    "call",
    [
        lambda *a, **k: model_hessian_diagonal(*a, **k),
        lambda *a, **k: model_hessian_diagonal(*a, per_sample=True, **k),
        lambda *a, **k: model_ggn_diagonal(*a, **k),
    ],
    ids=["hessian", "per-sample", "ggn"],
)
def test_one_call_leaves_the_gradient_backward_would(name, call):
    model, x, y = problem(name)
    expected_loss, expected_grads = backward_grads(model, x, y, seed=5)
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generic fallback's warning
        plain = call(model, F.cross_entropy, x, y)
    model.zero_grad()
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, diagonals = call(model, F.cross_entropy, x, y, backward=True)
    assert abs(float(loss) - float(expected_loss)) <= 1e-13 * abs(float(expected_loss))
    assert relative_error(diagonals, plain) < 1e-12  # the same diagonals as without backward
    assert relative_error([p.grad for p in model.parameters()], expected_grads) < 1e-12
    # a second call accumulates, as a second backward() would
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call(model, F.cross_entropy, x, y, backward=True)
    assert relative_error([p.grad for p in model.parameters()], [2 * g for g in expected_grads]) < 1e-12


def test_frozen_parameters_keep_no_gradient():
    model, x, y = problem("tanh chain")
    model[0].weight.requires_grad_(False)
    model_hessian_diagonal(model, F.cross_entropy, x, y, backward=True)
    assert model[0].weight.grad is None and model[0].bias.grad is not None


HOOKS = {
    "parameter hook": lambda m: m[0].weight.register_hook(lambda g: g * 2),
    "module backward hook": lambda m: m[2].register_full_backward_hook(lambda mod, gi, go: (gi[0] * 0.5,)),
    "post-accumulate hook": lambda m: m[0].bias.register_post_accumulate_grad_hook(scale_accumulated),
    # a forward hook that puts a gradient hook on an activation (gradient loggers and editors do this)
    "hook put on an activation": lambda m: m[1].register_forward_hook(triple_its_gradient),
}


def triple_its_gradient(module, args, output):
    if output.requires_grad:
        output.register_hook(lambda g: g * 3)


def scale_accumulated(param):
    param.grad.mul_(10)


@pytest.mark.parametrize("hook", list(HOOKS))
def test_gradient_hooks_act_as_in_backward_and_leave_the_diagonal_alone(hook):
    model, x, y = problem("tanh chain")
    plain = model_hessian_diagonal(model, F.cross_entropy, x, y)
    handle = HOOKS[hook](model)
    try:
        _, expected = backward_grads(model, x, y, seed=5)
        model.zero_grad()
        _, diagonals = model_hessian_diagonal(model, F.cross_entropy, x, y, backward=True)
        assert relative_error([p.grad for p in model.parameters()], expected) < 1e-12
        assert relative_error(diagonals, plain) < 1e-12
    finally:
        handle.remove()


def test_backward_must_be_a_bool():
    model, x, y = problem("tanh chain")
    with pytest.raises(TypeError, match="backward"):
        model_hessian_diagonal(model, F.cross_entropy, x, y, backward=1)
