"""Shared by the engine tests: the float64 brute force and the exactness assertion."""

import warnings

import torch
import torch.nn as nn
from conftest import relative_error

from torch_secorder import model_hessian_diagonal
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
