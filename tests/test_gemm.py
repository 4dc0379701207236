"""The engine's 2-D products (backprop/gemm.py): oneDNN or torch.mm, the same numbers to float32 rounding."""

import copy

import pytest
import torch
import torch.nn as nn
from helpers import relative_error

from torch_secorder import model_ggn_diagonal, model_hessian_diagonal
from torch_secorder.backprop.rules import gemm
from torch_secorder.testing import model_loss_of_params, sampled_hessian_diagonal

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="this torch has no oneDNN linear op")


@pytest.fixture(params=["onednn", "torch"])
def backend(request, monkeypatch):
    if request.param == "onednn" and not ONEDNN:
        pytest.skip("this torch has no oneDNN linear op")
    monkeypatch.setattr(gemm, "_onednn", request.param == "onednn")
    return request.param


def ops_called(function):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        result = function()
    return result, {event.name for event in profiler.events()}


def layouts(generator):
    a = torch.randn(600, 300, generator=generator)
    b = torch.randn(300, 256, generator=generator)
    yield "contiguous", a, b
    yield "transposed", torch.randn(300, 600, generator=generator).t(), torch.randn(256, 300, generator=generator).t()
    yield "sliced", torch.randn(700, 320, generator=generator)[50:650, 10:310], b
    yield "strided", a, torch.randn(300, 512, generator=generator)[:, ::2]
    yield "expanded", torch.randn(1, 300, generator=generator).expand(600, 300), b


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced", "strided", "expanded"])
def test_products_match_float64(backend, layout):
    generator = torch.Generator().manual_seed(0)
    a, b = next((a, b) for name, a, b in layouts(generator) if name == layout)
    result, names = ops_called(lambda: gemm.mm(a, b))
    assert ("mkldnn::_linear_pointwise" in names) == (backend == "onednn")
    assert result.shape == (a.shape[0], b.shape[1]) and result.dtype == torch.float32
    assert relative_error(result, a.double() @ b.double()) < 1e-5


@needs_onednn
def test_torch_mm_where_onednn_does_not_serve(monkeypatch):
    """float64, small products, empty sizes and products autograd must differentiate stay with torch.mm."""
    monkeypatch.setattr(gemm, "_onednn", True)
    generator = torch.Generator().manual_seed(1)
    big = torch.randn(600, 300, generator=generator), torch.randn(300, 256, generator=generator)
    cases = [
        (big[0].double(), big[1].double()),  # float64: oneDNN has no float64 GEMM
        (torch.randn(64, 256), torch.randn(256, 10)),  # 164k multiply-adds: under MIN_MULTIPLY_ADDS
        (torch.randn(0, 300), big[1]),
        (big[0][:, :0], big[1][:0]),  # nothing to multiply
    ]
    for a, b in cases:
        result, names = ops_called(lambda a=a, b=b: gemm.mm(a, b))
        assert "mkldnn::_linear_pointwise" not in names
        assert torch.equal(result, a @ b)
    weight = big[1].clone().requires_grad_(True)
    result, names = ops_called(lambda: gemm.mm(big[0], weight))
    assert "mkldnn::_linear_pointwise" not in names
    (grad,) = torch.autograd.grad(result.sum(), weight)
    assert relative_error(grad, big[0].double().sum(0, keepdim=True).t().expand(-1, 256)) < 1e-6
    with torch.no_grad():  # no graph to build: oneDNN serves it
        assert "mkldnn::_linear_pointwise" in ops_called(lambda: gemm.mm(big[0], weight))[1]
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert "mkldnn::_linear_pointwise" not in ops_called(lambda: gemm.mm(*big))[1]


def test_the_environment_setting(monkeypatch):
    assert gemm._decide("torch") is False
    assert gemm._decide("") is False  # torch.mm unless asked
    assert gemm._decide("onednn") is ONEDNN
    with pytest.raises(ValueError, match="TORCH_SECORDER_CPU_GEMM must be 'onednn' or 'torch', got 'mkl'"):
        gemm._decide("mkl")
    monkeypatch.setattr(gemm, "_onednn", None)
    monkeypatch.setenv("TORCH_SECORDER_CPU_GEMM", "onednn")
    assert gemm._use_onednn() is ONEDNN
    monkeypatch.setattr(gemm, "_onednn", None)
    monkeypatch.delenv("TORCH_SECORDER_CPU_GEMM")
    assert gemm._use_onednn() is False


def test_float32_engine_diagonals_on_both_backends(backend):
    """A float32 MLP wide enough for oneDNN's products (the hidden layer's 2,560 columns x 64 x 64): the
    Hessian diagonal against one float64 Hessian-vector product per sampled entry, the GGN against the
    float64 generic method, both to float32 rounding; and oneDNN actually ran where it was chosen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Sigmoid(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    x, y = torch.randn(256, 16), torch.randn(256, 10)
    loss_fn = nn.MSELoss()
    exact_model = copy.deepcopy(model).double()
    params = list(exact_model.parameters())
    actual, names = ops_called(lambda: model_hessian_diagonal(model, loss_fn, x, y, method="backprop"))
    assert ("mkldnn::_linear_pointwise" in names) == (backend == "onednn")
    generator = torch.Generator().manual_seed(0)
    picks = [(i, k) for i, p in enumerate(params) for k in torch.randperm(p.numel(), generator=generator)[:12].tolist()]
    exact = sampled_hessian_diagonal(model_loss_of_params(exact_model, loss_fn, x.double(), y.double()), params, picks)
    picked = torch.tensor([actual[i].reshape(-1)[k].item() for i, k in picks], dtype=torch.float64)
    assert relative_error(picked, torch.tensor([exact[pick] for pick in picks])) < 1e-5
    ggn, names = ops_called(lambda: model_ggn_diagonal(model, loss_fn, x, y, method="backprop"))
    assert ("mkldnn::_linear_pointwise" in names) == (backend == "onednn")
    ggn_exact = model_ggn_diagonal(exact_model, loss_fn, x.double(), y.double(), method="autograd")
    assert relative_error(ggn, ggn_exact) < 1e-5
