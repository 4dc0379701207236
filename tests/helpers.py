"""What the tests share: the float64 brute force, relative_error, and the exactness / step-aside assertions.
(Models shared between test files live in models.py and torchvision_style.py; fixtures in conftest.py.)"""

import contextlib
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_secorder import explain_method, model_hessian_diagonal
from torch_secorder.testing import dense_hessian_diagonal, model_loss_of_params

D = torch.float64


def brute_force(model, loss_fn, x, y):
    """Full float64 Hessian diagonal; zeros for frozen parameters, as the API returns them."""
    params = list(model.parameters())
    diagonals = dense_hessian_diagonal(model_loss_of_params(model, loss_fn, x, y), params)
    return [d if p.requires_grad else torch.zeros_like(d) for d, p in zip(diagonals, params)]


def assert_backprop_exact(model, loss_fn, x, y, tolerance=1e-10, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback to the generic method
        actual = model_hessian_diagonal(model, loss_fn, x, y, method="backprop", **kwargs)
    expected = brute_force(model, loss_fn, x, y)
    for a, p in zip(actual, model.parameters()):
        assert a.shape == p.shape and a.dtype == p.dtype and a.device == p.device
    error = relative_error(actual, expected)
    assert error < tolerance, error
    return actual


def randomise_batch_norm(model, generator):
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator, dtype=D))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator, dtype=D) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator, dtype=D) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator, dtype=D))
    return model.eval()


def assert_sampled_exact(model, loss_fn, x, y, per_parameter=6, tolerance=1e-10, seed=0):
    """For models too big for the full Hessian: the engine against one float64 Hessian-vector product per
    sampled entry (per_parameter entries of every parameter, the largest diagonal entry among them)."""
    from torch_secorder.testing import model_loss_of_params, sampled_hessian_diagonal

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        actual = model_hessian_diagonal(model, loss_fn, x, y, method="backprop")
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    picks = [
        (i, k)
        for i, p in enumerate(params)
        if p.requires_grad
        for k in torch.randperm(p.numel(), generator=generator)[:per_parameter].tolist()
    ]
    picks += [(i, int(a.reshape(-1).abs().argmax())) for i, a in enumerate(actual) if params[i].requires_grad]
    exact = sampled_hessian_diagonal(model_loss_of_params(model, loss_fn, x, y), params, picks)
    scale = max(abs(v) for v in exact.values())
    error = max(abs(actual[i].reshape(-1)[k].item() - v) for (i, k), v in exact.items()) / scale
    assert error < tolerance, error
    for a, p in zip(actual, params):
        if not p.requires_grad:
            assert torch.equal(a, torch.zeros_like(p))
    return actual


def relative_error(actual, expected):
    """max |actual - expected| / max |expected|: one number for a tensor, or for a list of them taken
    together (a parameter whose true diagonal is ~1e-32, such as a bias before BatchNorm, is then
    judged against the scale of the whole Hessian diagonal, not against its own rounding noise)."""
    if not isinstance(actual, (list, tuple)):
        actual, expected = [actual], [expected]
    assert len(actual) == len(expected)
    error, scale = 0.0, 0.0
    for a, e in zip(actual, expected):
        a, e = a.detach().double().cpu(), e.detach().double().cpu()
        assert a.shape == e.shape, (a.shape, e.shape)
        if e.numel():
            error = max(error, (a - e).abs().max().item())
            scale = max(scale, e.abs().max().item())
    return error / max(scale, 1e-300)


Y5 = torch.tensor([0, 1, 2, 1, 0])


def exact(model, x, y=Y5, loss_fn=F.cross_entropy):
    torch.manual_seed(11)
    model = model.double().eval()
    randomise_batch_norm(model, torch.Generator().manual_seed(2))
    assert explain_method(model, loss_fn).method == "backprop", explain_method(model, loss_fn)
    return assert_backprop_exact(model, loss_fn, x, y)


def vectors(*shape):
    return torch.randn(5, *shape, dtype=D, generator=torch.Generator().manual_seed(7))


def assert_steps_aside(model, x, y, message, loss_fn=F.cross_entropy, explained=True):
    """auto: one warning naming `message`, exact numbers from the generic method; backprop: raises naming it.
    explained: explain_method (without inputs) names it too (not for what only a call shows)."""
    if explained:
        choice = explain_method(model, loss_fn)
        assert choice.method == "autograd" and message in choice.reason, choice
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = model_hessian_diagonal(model, loss_fn, x, y)
    ours = [w for w in caught if "torch_secorder" in str(w.message)]
    assert len(ours) == 1 and message in str(ours[0].message), [str(w.message) for w in caught]
    assert relative_error(auto, brute_force(model, loss_fn, x, y)) < 1e-10
    with pytest.raises(NotImplementedError, match=re.escape(message)):
        model_hessian_diagonal(model, loss_fn, x, y, method="backprop")


def expected_fallback(model, loss_fn):
    """pytest.warns for the one fallback warning where the engine steps aside for model and loss_fn (as
    explain_method says), else a context that expects nothing."""
    if explain_method(model, loss_fn).method == "autograd":
        return pytest.warns(RuntimeWarning, match="using the generic autograd method")
    return contextlib.nullcontext()


def assert_engine_or_cheaper(model, loss_fn, inputs, targets):
    """auto runs the engine with no warning, or the generic method where it is predicted cheaper (one warning
    saying so: core/_model_curvature.py's cost choice), never a fallback for want of a rule."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_hessian_diagonal(model, loss_fn, inputs, targets)
    ours = [str(w.message) for w in caught if "torch_secorder" in str(w.message)]
    assert all("the generic method is predicted faster here" in message for message in ours), ours
