"""Every rule of the documented API: v, strict, create_graph, chunking, model handling and bad input."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import relative_error

from torch_secorder import hessian_diagonal, model_hessian_diagonal
from torch_secorder.testing import dense_hessian_diagonal


def cubic_setup():
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.3, 1.2], [-0.7, 2.0]], dtype=torch.float64, requires_grad=True)

    def loss(a=a, b=b):
        return (a**3).sum() * b.sum() + (b**4).sum() + torch.sin(a).sum()

    return a, b, loss


def test_spec_example_quadratic():
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    diag = hessian_diagonal(lambda: x @ A @ x, [x])
    assert str(diag[0]) == "tensor([4., 6.])"


def test_spec_example_model_shapes():
    model = nn.Linear(10, 1)
    diag = model_hessian_diagonal(model, nn.functional.mse_loss, torch.randn(5, 10), torch.randn(5, 1))
    assert diag[0].shape == torch.Size([1, 10]) and diag[1].shape == torch.Size([1])
    assert torch.allclose(diag[1], torch.tensor([2.0]))  # d^2/db^2 of mean((w.x + b - y)^2) = 2


def test_v_scales_the_diagonal():
    a, b, loss = cubic_setup()
    plain = hessian_diagonal(loss, [a, b])
    v = [torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64), torch.full((2, 2), 3.0, dtype=torch.float64)]
    scaled = hessian_diagonal(loss, [a, b], v=v)
    assert relative_error(scaled, [v[0] * plain[0], v[1] * plain[1]]) < 1e-15


@pytest.mark.parametrize(
    "v, message",
    [
        ([torch.ones(3, dtype=torch.float64)], "one tensor per parameter: got 1 tensors for 2 params"),
        (
            [torch.ones(3, dtype=torch.float64), torch.ones(4, dtype=torch.float64)],
            r"v\[1\] has shape \(4,\) but params\[1\] has shape \(2, 2\)",
        ),
        (
            [torch.ones(3, dtype=torch.float32), torch.ones(2, 2, dtype=torch.float64)],
            r"v\[0\] has dtype torch.float32",
        ),
        (
            [torch.ones(3, dtype=torch.float64, device="meta"), torch.ones(2, 2, dtype=torch.float64)],
            r"v\[0\] is on meta",
        ),
    ],
)
def test_bad_v_is_named(v, message):
    a, b, loss = cubic_setup()
    with pytest.raises(ValueError, match=message):
        hessian_diagonal(loss, [a, b], v=v)


def test_create_graph_gives_a_differentiable_result():
    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    diag = hessian_diagonal(lambda: (x**3).sum(), [x], create_graph=True)
    assert relative_error(diag[0], 6 * x.detach()) < 1e-15
    (grad,) = torch.autograd.grad(diag[0].sum(), x)
    assert relative_error(grad, torch.full_like(x, 6.0)) < 1e-15


def test_create_graph_matches_autograd_third_derivatives():
    a, b, loss = cubic_setup()
    diag = hessian_diagonal(loss, [a, b], create_graph=True)
    grads = torch.autograd.grad(sum(d.sum() for d in diag), [a, b])

    # reference: d/dtheta of trace-of-diagonal by differentiating the dense reference
    def trace_of_diag(a_, b_):
        return sum(d.sum() for d in dense_hessian_diagonal(lambda p, q: loss(p, q), [a_, b_]))

    expected = torch.func.jacrev(trace_of_diag, argnums=(0, 1))(a.detach(), b.detach())
    assert relative_error(list(grads), list(expected)) < 1e-10


def test_results_are_detached_without_create_graph():
    a, b, loss = cubic_setup()
    for d in hessian_diagonal(loss, [a, b]):
        assert not d.requires_grad and d.grad_fn is None


def test_strict_rules():
    used = torch.tensor([1.0, 2.0], requires_grad=True)
    frozen = torch.tensor([3.0])
    unused = torch.tensor([4.0, 5.0], requires_grad=True)

    def loss():
        return (used**2 * frozen).sum()

    diag = hessian_diagonal(loss, [used, frozen, unused])
    assert torch.equal(diag[0], torch.tensor([6.0, 6.0]))
    assert torch.equal(diag[1], torch.zeros(1)) and torch.equal(diag[2], torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"params\[1\] \(shape \(1,\)\) does not require grad"):
        hessian_diagonal(loss, [used, frozen, unused], strict=True)
    with pytest.raises(RuntimeError, match=r"the loss does not depend on params\[1\] \(shape \(2,\)\)"):
        hessian_diagonal(loss, [used, unused], strict=True)


def test_linear_dependence_gives_exact_zeros():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    diag = hessian_diagonal(lambda: (3 * w).sum(), [w], strict=True)
    assert torch.equal(diag[0], torch.zeros(2))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 1000])
def test_chunk_sizes_do_not_change_the_result(chunk_size):
    a, b, loss = cubic_setup()
    expected = dense_hessian_diagonal(loss, [a, b])
    assert relative_error(hessian_diagonal(loss, [a, b], chunk_size=chunk_size), expected) < 1e-12


def chunk_sizes(memory_budget, device_type="cpu"):
    """Unit vectors per double backward that the generic method used, read from its progress reports."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 5)).double()
    x, y = torch.randn(64, 30, dtype=torch.float64), torch.randn(64, 5, dtype=torch.float64)
    reports = [0]
    diag = model_hessian_diagonal(
        model,
        F.mse_loss,
        x,
        y,
        method="autograd",
        memory_budget=memory_budget,
        progress=lambda done, total: reports.append(done),
    )
    return [b - a for a, b in zip(reports, reports[1:])], diag


def test_memory_budget_bounds_the_chunk():
    tiny, exact_tiny = chunk_sizes(1)
    assert set(tiny) == {1}  # nothing fits: one unit vector per double backward, still exact
    small, exact_small = chunk_sizes(1 << 20)
    large, exact_large = chunk_sizes(1 << 30)
    assert 1 < max(small) < max(large)  # more budget, bigger chunks ...
    assert max(large) < 1200  # ... but cache-sized on CPU: the weight's 1,200 entries never go in one chunk
    assert relative_error(exact_tiny, exact_large) < 1e-12 and relative_error(exact_small, exact_large) < 1e-12


def test_tiny_budget_still_exact_and_reports_progress():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    reports = []
    small = model_hessian_diagonal(
        model, F.mse_loss, x, y, memory_budget=1, progress=lambda d, t: reports.append((d, t))
    )
    big = model_hessian_diagonal(model, F.mse_loss, x, y)
    assert relative_error(small, big) < 1e-12
    total = sum(p.numel() for p in model.parameters())
    assert reports[-1] == (total, total)


def test_model_mode_and_buffers_are_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with pytest.warns(RuntimeWarning, match="BatchNorm in training mode"):
        model_hessian_diagonal(model, nn.CrossEntropyLoss(), x, y)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    model_hessian_diagonal(model, nn.CrossEntropyLoss(), x, y)
    assert not any(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_train_and_eval_mode_give_their_own_hessians():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    with pytest.warns(RuntimeWarning, match="BatchNorm in training mode"):
        train = model_hessian_diagonal(model.train(), F.cross_entropy, x, y)
    evaluated = model_hessian_diagonal(model.eval(), F.cross_entropy, x, y)
    assert relative_error(train[0], evaluated[0]) > 1e-3


def test_functional_and_module_losses_agree():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert (
        relative_error(
            model_hessian_diagonal(model, nn.CrossEntropyLoss(), x, y),
            model_hessian_diagonal(model, F.cross_entropy, x, y),
        )
        < 1e-15
    )


def test_tuple_inputs_and_frozen_parameters():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(3, 2)

        def forward(self, u, w):
            return torch.tanh(self.a(u)) * self.b(w)

    model = TwoInputs().double()
    model.b.bias.requires_grad_(False)
    u, w, y = (
        torch.randn(4, 2, dtype=torch.float64),
        torch.randn(4, 3, dtype=torch.float64),
        torch.randn(4, 2, dtype=torch.float64),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two inputs: the engine, one input node each
        diag = model_hessian_diagonal(model, F.mse_loss, (u, w), y)
    assert torch.equal(diag[3], torch.zeros(2))
    reference = model_hessian_diagonal(model, F.mse_loss, (u, w), y, method="autograd")
    assert max((a - b).abs().max().item() for a, b in zip(diag, reference)) < 1e-12
    with pytest.raises(RuntimeError, match=r"params\[3\].*does not require grad"):
        model_hessian_diagonal(model, F.mse_loss, (u, w), y, strict=True)


# ------------------------------------------------------------------ bad input
def test_non_scalar_loss():
    x = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"func must return a scalar loss, got a tensor of shape \(3,\)"):
        hessian_diagonal(lambda: x * 2, [x])
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar loss.*\(4, 1\).*reduction"):
        with pytest.warns(RuntimeWarning, match="reduction='none'"):  # the engine steps aside first
            model_hessian_diagonal(model, nn.MSELoss(reduction="none"), torch.randn(4, 2), torch.randn(4, 1))


def test_bad_params_and_options():
    x = torch.ones(3, requires_grad=True)
    with pytest.raises(TypeError, match="params must be a list of tensors, got a single tensor"):
        hessian_diagonal(lambda: (x**2).sum(), x)
    with pytest.raises(TypeError, match=r"params\[0\] must be a floating-point tensor"):
        hessian_diagonal(lambda: (x**2).sum(), [torch.ones(2, dtype=torch.long)])
    with pytest.raises(TypeError, match="func must be a callable"):
        hessian_diagonal((x**2).sum(), [x])
    with pytest.raises(ValueError, match=r"method must be one of \('auto', 'autograd', 'backprop'\), got 'newton'"):
        hessian_diagonal(lambda: (x**2).sum(), [x], method="newton")
    with pytest.raises(ValueError, match="method='backprop' needs a model and a loss: use model_hessian_diagonal"):
        hessian_diagonal(lambda: (x**2).sum(), [x], method="backprop")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        hessian_diagonal(lambda: (x**2).sum(), [x], chunk_size=0)
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
        hessian_diagonal(lambda: (x**2).sum(), [x], memory_budget=-5)


def test_bad_model_arguments_are_named():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match="inputs has 4 samples.*targets has 5"):
        model_hessian_diagonal(model, F.mse_loss, x, torch.randn(5, 2))
    with pytest.raises(
        ValueError, match="inputs has dtype torch.float64 but the model's parameters have dtype torch.float32"
    ):
        model_hessian_diagonal(model, F.mse_loss, x.double(), y)
    with pytest.raises(ValueError, match="inputs is on meta but the model's parameters are on cpu"):
        model_hessian_diagonal(model, F.mse_loss, x.to("meta"), y)
    with pytest.raises(ValueError, match="targets is on meta but inputs is on cpu"):
        model_hessian_diagonal(model, F.mse_loss, x, y.to("meta"))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        model_hessian_diagonal(lambda t: t, F.mse_loss, x, y)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        model_hessian_diagonal(model, "mse", x, y)
    with pytest.raises(TypeError, match="targets must be a tensor"):
        model_hessian_diagonal(model, F.mse_loss, x, [1.0, 2.0])


def test_top_level_reexports():
    import torch_secorder
    from torch_secorder.core import hessian_diagonal as core_hd

    assert torch_secorder.hessian_diagonal is core_hd
    assert torch_secorder.model_hessian_diagonal is model_hessian_diagonal


def test_gradient_with_a_graph_that_misses_the_parameter():
    p = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([3.0, -1.0], dtype=torch.float64, requires_grad=True)
    diag = hessian_diagonal(lambda: (p * a).sum() + (a**3).sum(), [p, a])
    assert torch.equal(diag[0], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(diag[1], 6 * a.detach())


class ScaleByThreeX2(torch.autograd.Function):
    """grad * 3 x^2 whose own backward reads a Python number from its incoming grad: vmap cannot batch that."""

    @staticmethod
    def forward(ctx, grad, x):
        ctx.save_for_backward(grad, x)
        return grad * 3 * x**2

    @staticmethod
    def backward(ctx, outer):
        grad, x = ctx.saved_tensors
        outer = outer * (1.0 + 0.0 * float(outer.sum().item()))
        return outer * 3 * x**2, outer * grad * 6 * x


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ScaleByThreeX2.apply(grad, x)


def test_falls_back_when_vmap_cannot_batch():
    x = torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="instead \\(same numbers, slower\\)"):
        diag = hessian_diagonal(lambda: (Cube.apply(x) * weights).sum(), [x])
    assert relative_error(diag[0], 6 * x.detach() * weights) < 1e-15
