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


