"""The generic method against float64 brute force (full Hessians by torch.func) on many functions and models."""

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import expected_fallback, relative_error
from models import exact_zoo

from torch_secorder import hessian_diagonal, model_hessian_diagonal
from torch_secorder.testing import dense_hessian_diagonal, model_loss_of_params, sampled_hessian_diagonal

UNARY = [
    torch.sin,
    torch.tanh,
    torch.sigmoid,
    torch.cos,
    F.softplus,
    F.gelu,
    F.silu,
    F.elu,
    lambda t: t**3,
    lambda t: torch.exp(-t * t),
    lambda t: torch.log1p(t * t),
    lambda t: t * torch.sigmoid(t),
]


def random_function(seed, shapes):
    """A random smooth scalar function of tensors with the given shapes, coupling entries within and across them."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    width = rng.randint(2, 5)
    mixes = [torch.randn(width, int(torch.Size(s).numel()), generator=generator, dtype=torch.float64) for s in shapes]
    mixes2 = [torch.randn(width, int(torch.Size(s).numel()), generator=generator, dtype=torch.float64) for s in shapes]
    readout = torch.randn(width, generator=generator, dtype=torch.float64)
    f1, f2, f3 = rng.choice(UNARY), rng.choice(UNARY), rng.choice(UNARY)
    elementwise = [rng.choice(UNARY) for _ in shapes]

    def loss(*params):
        flats = [p.reshape(-1) for p in params]
        h = sum(m @ x for m, x in zip(mixes, flats))
        g = sum(m @ x for m, x in zip(mixes2, flats))
        total = (readout * f1(h) * f2(g)).sum() + f3(h * g).sum()
        for f, x in zip(elementwise, flats):
            total = total + f(x).sum() + 0.1 * (x**4).sum()
        return total

    return loss


@pytest.mark.parametrize("seed", range(30))
def test_random_functions(seed):
    rng = random.Random(1000 + seed)
    shapes = [tuple(rng.randint(1, 4) for _ in range(rng.randint(0, 3))) for _ in range(rng.randint(1, 3))]
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=generator, dtype=torch.float64, requires_grad=True) for s in shapes]
    loss = random_function(seed, shapes)
    expected = dense_hessian_diagonal(loss, params)
    chunk = rng.choice([None, 1, 2, 5])
    actual = hessian_diagonal(lambda: loss(*params), params, chunk_size=chunk)
    for a, _, p in zip(actual, expected, params):
        assert a.shape == p.shape and a.dtype == p.dtype and a.device == p.device
    assert relative_error(actual, expected) < 1e-10


@pytest.mark.parametrize("case", exact_zoo(), ids=lambda case: case[0])
def test_models_against_full_hessian(case):
    name, model, inputs, targets, loss_fn = case
    params = list(model.parameters())
    expected = dense_hessian_diagonal(model_loss_of_params(model, loss_fn, inputs, targets), params)
    with expected_fallback(model, loss_fn):
        actual = model_hessian_diagonal(model, loss_fn, inputs, targets)
    assert len(actual) == len(params)
    for a, p in zip(actual, params):
        assert a.shape == p.shape and a.dtype == p.dtype
    assert relative_error(actual, expected) < 1e-10


def test_bigger_model_against_sampled_hvps():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 32), nn.Sigmoid(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    x, y = torch.randn(16, 20, dtype=torch.float64), torch.randint(0, 5, (16,))
    loss_fn = nn.CrossEntropyLoss()
    actual = model_hessian_diagonal(model, loss_fn, x, y, memory_budget=1 << 20)
    params = list(model.parameters())
    rng = random.Random(0)
    indices = [(i, rng.randrange(p.numel())) for i, p in enumerate(params) for _ in range(12)]
    expected = sampled_hessian_diagonal(model_loss_of_params(model, loss_fn, x, y), params, indices)
    for (i, k), value in expected.items():
        assert abs(actual[i].reshape(-1)[k].item() - value) <= 1e-10 * max(abs(value), 1e-8)


def test_float32_agrees_with_float64():
    torch.manual_seed(2)
    model64 = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    model32 = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    d64 = model_hessian_diagonal(model64, F.cross_entropy, x, y)
    d32 = model_hessian_diagonal(model32, F.cross_entropy, x.float(), y)
    assert all(d.dtype == torch.float32 for d in d32)
    assert relative_error(d32, d64) < 1e-5


def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    on_cpu = model_hessian_diagonal(model, F.cross_entropy, x, y)
    on_gpu = model_hessian_diagonal(model.cuda(), F.cross_entropy, x.cuda(), y.cuda())
    assert all(d.device.type == "cuda" for d in on_gpu)
    assert relative_error(on_gpu, on_cpu) < 1e-10


class KeywordModel(nn.Module):
    """Called as model(**batch), as Hugging Face models are."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, features, scale):
        return self.b(torch.tanh(self.a(features))) * scale


def test_model_loss_of_params_takes_a_dict_batch_as_keywords():
    """The brute force the benchmarks check the engine against: a dict batch goes in as keyword arguments, and its
    dense Hessian diagonal is the engine's, to float64 rounding."""
    torch.manual_seed(0)
    model = KeywordModel().double()
    batch = {"features": torch.randn(5, 3, dtype=torch.float64), "scale": torch.rand(5, 1, dtype=torch.float64)}
    y = torch.randint(0, 2, (5,))
    loss_of_params = model_loss_of_params(model, F.cross_entropy, batch, y)
    params = list(model.parameters())
    assert loss_of_params(*params).item() == pytest.approx(F.cross_entropy(model(**batch), y).item(), rel=1e-15)
    expected = dense_hessian_diagonal(loss_of_params, params)
    actual = model_hessian_diagonal(model, F.cross_entropy, batch, y, method="backprop")
    assert relative_error(actual, expected) < 1e-12
