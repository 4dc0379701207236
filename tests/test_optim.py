"""SophiaDiagonal: its update against the formula, Newton's step on a quadratic, and a real training loop."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_secorder import model_ggn_diagonal, model_hessian_diagonal, model_hessian_diagonal_estimate
from torch_secorder.optim import SophiaDiagonal

D = torch.float64


def test_one_step_is_newton_on_a_diagonal_quadratic():
    a = torch.tensor([2.0, 5.0, 0.5], dtype=D)
    c = torch.tensor([0.3, -0.2, 0.1], dtype=D)
    x = torch.zeros(3, dtype=D, requires_grad=True)
    optimizer = SophiaDiagonal([x], lr=1.0, betas=(0.0, 0.0), rho=1.0)

    def loss():
        return 0.5 * (a * (x - c) ** 2).sum()

    assert optimizer.curvature_due()
    from torch_secorder import hessian_diagonal

    optimizer.update_curvature(hessian_diagonal(loss, [x]))
    loss().backward()
    optimizer.step()
    assert torch.allclose(x.detach(), c, rtol=0, atol=1e-15)  # |m| / h = |x - c| < 1: unclipped Newton
    assert not optimizer.curvature_due() or optimizer.update_every == 1


def test_the_update_follows_sophias_formula_with_clipping_and_weight_decay():
    torch.manual_seed(0)
    p = torch.randn(5, dtype=D, requires_grad=True)
    start = p.detach().clone()
    optimizer = SophiaDiagonal([p], lr=0.1, betas=(0.9, 0.5), rho=0.5, weight_decay=0.01, update_every=3)
    curvature = torch.tensor([1.0, -2.0, 0.0, 3.0, 1e-3], dtype=D)
    optimizer.update_curvature(torch.full((5,), 7.0, dtype=D))
    optimizer.update_curvature([curvature])  # EMA: 0.5 * 7 + 0.5 * d
    p.grad = torch.tensor([0.4, -1.0, 2.0, 0.3, 0.01], dtype=D)
    optimizer.step()
    m = 0.1 * p.grad
    h = 0.5 * 7.0 + 0.5 * curvature
    expected = start * (1 - 0.1 * 0.01) - 0.1 * m.sign() * (m.abs() / (0.5 * h).clamp_min(1e-12)).clamp_max(1)
    assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-15)


def test_bad_arguments_are_named():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="update_every"):
        SophiaDiagonal([p], update_every=0)
    with pytest.raises(ValueError, match="one diagonal per parameter"):
        SophiaDiagonal([p]).update_curvature([torch.zeros(2), torch.zeros(2)])


def hutchinson(model, loss_fn, x, y):
    return model_hessian_diagonal_estimate(model, loss_fn, x, y, 20, generator=torch.Generator().manual_seed(1))


def test_an_estimate_is_folded_in_by_its_diagonal():
    p = torch.zeros(3, dtype=D, requires_grad=True)
    q = torch.zeros(2, dtype=D, requires_grad=True)
    optimizer = SophiaDiagonal([p, q])
    estimate = hessian_diagonal_estimate_of_a_quadratic(p, q)
    optimizer.update_curvature(estimate)
    assert torch.equal(optimizer.state[p]["curvature"], estimate.diagonal[0])
    assert torch.equal(optimizer.state[q]["curvature"], estimate.diagonal[1])


def hessian_diagonal_estimate_of_a_quadratic(p, q):
    from torch_secorder import hessian_diagonal_estimate

    scales = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    return hessian_diagonal_estimate(
        lambda: (scales * p**2).sum() + (p[0] * q).sum() + (q**2).sum(),
        [p, q],
        8,
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize(
    "curvature", [model_ggn_diagonal, model_hessian_diagonal, hutchinson], ids=["ggn", "hessian", "hutchinson"]
)
def test_it_trains_a_classifier(curvature):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=generator)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    optimizer = SophiaDiagonal(model.parameters(), lr=0.02, update_every=5)
    first = F.cross_entropy(model(x), y).item()
    for _ in range(150):
        batch = torch.randint(0, 256, (64,), generator=generator)
        if optimizer.curvature_due():
            optimizer.update_curvature(curvature(model, F.cross_entropy, x[batch], y[batch]))
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    last = F.cross_entropy(model(x), y).item()
    assert last < 0.5 * first, (first, last)


def test_a_checkpoint_resumes_the_same_trajectory():
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        return model, SophiaDiagonal(model.parameters(), lr=0.05, update_every=3)

    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, 4, dtype=D, generator=generator), torch.randint(0, 3, (8,), generator=generator))
        for _ in range(8)
    ]

    def train(model, optimizer, steps):
        for x, y in steps:
            if optimizer.curvature_due():
                optimizer.update_curvature(model_ggn_diagonal(model, F.cross_entropy, x, y))
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    straight, straight_optimizer = build()
    train(straight, straight_optimizer, batches)
    first, first_optimizer = build()
    train(first, first_optimizer, batches[:4])
    checkpoint = (first.state_dict(), first_optimizer.state_dict())
    resumed, resumed_optimizer = build()
    resumed.load_state_dict(checkpoint[0])
    resumed_optimizer.load_state_dict(checkpoint[1])
    assert resumed_optimizer.steps == 4 and not resumed_optimizer.curvature_due()
    train(resumed, resumed_optimizer, batches[4:])
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
