"""Warnings point at the caller's line (warnings.warn's stacklevel), not at the library's own frames: the fallback
warning of every model function and the estimator's cap warning."""

import warnings

import pytest
import torch
import torch.nn as nn

import torch_secorder as ts


def hooked_model():
    model = nn.Sequential(nn.Linear(3, 2))
    model.register_forward_hook(lambda *args: None)  # on the container: the engine steps aside, the fallback warning
    return model


CALLS = {
    "model_hessian_diagonal": lambda m, x, y: ts.model_hessian_diagonal(m, nn.MSELoss(), x, y),
    "model_ggn_diagonal": lambda m, x, y: ts.model_ggn_diagonal(m, nn.MSELoss(), x, y),
    "model_fisher_diagonal": lambda m, x, y: ts.model_fisher_diagonal(m, nn.MSELoss(), x, y),
    "per_sample": lambda m, x, y: ts.model_hessian_diagonal(m, nn.MSELoss(), x, y, per_sample=True),
    "estimate cap": lambda m, x, y: ts.model_hessian_diagonal_estimate(m, nn.MSELoss(), x, y, 2, target_rel_error=1e-9),
}


@pytest.mark.parametrize("name", CALLS)
def test_warnings_name_the_callers_file(name):
    torch.manual_seed(0)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CALLS[name](hooked_model(), x, y)
    ours = [w for w in caught if "torch_secorder" in str(w.message)]
    assert ours, [str(w.message) for w in caught]
    assert all(w.filename == __file__ for w in ours), [(w.filename, w.lineno) for w in ours]
