"""The Monte-Carlo Fisher's columns (softmax_sampled_columns: kernels and reference): classes drawn from the model's
own distribution by inverse CDF, never a class of probability 0, never an index past the last class, reproducible
with a generator, and the columns sqrt(s / M) (p - e_y) whose outer products average to the Hessian."""

import pytest
import torch
from helpers import relative_error

from torch_secorder import ops, reference_ops

KERNELS = ops.compiled_ops_loaded()  # loads the extension (the kernel tests skip without it)
needs_kernels = pytest.mark.skipif(not KERNELS, reason="compiled ops not built")
IMPLEMENTATIONS = {
    "kernel": lambda *args: torch.ops.torch_secorder.softmax_sampled_columns(*args),
    "reference": reference_ops.softmax_sampled_columns,
}


def drawn_classes(columns, logits, scale):
    """The class of each column: where it differs from root * p by -root."""
    root = (scale / columns.shape[1]).sqrt().reshape(-1, 1, 1)
    difference = columns - torch.softmax(logits, dim=1).unsqueeze(1) * root
    return difference.argmin(dim=2)


def implementation_of(name):
    if name == "kernel" and not KERNELS:
        pytest.skip("compiled ops not built")
    return IMPLEMENTATIONS[name]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_draw_frequencies_follow_the_probabilities(device, implementation):
    probabilities = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.0, 0.9, 0.0, 0.1]], dtype=torch.float64)
    logits = probabilities.log().to(device)
    draws = 200_000
    uniforms = torch.rand(2, draws, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    scale = torch.ones(2, dtype=torch.float64, device=device)
    columns = implementation_of(implementation)(logits, scale, uniforms)
    assert columns.shape == (2, draws, 4)
    drawn = drawn_classes(columns, logits, scale).cpu()
    frequencies = torch.stack([torch.bincount(row, minlength=4) for row in drawn]).double() / draws
    standard_error = (probabilities * (1 - probabilities) / draws).sqrt()
    assert ((frequencies - probabilities).abs() <= 5 * standard_error + 1e-12).all(), frequencies
    assert (frequencies[probabilities == 0] == 0).all()  # exactly never


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_rounding_never_draws_past_the_last_class_or_a_zero_class(device, implementation):
    # float32 rows whose cumulative sums end below 1, a zero-probability last class, uniforms near the top
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4096, 7, generator=generator)
    logits[:, -1] = -float("inf")
    uniforms = 1 - torch.randint(1, 16, (4096, 64), generator=generator) * 2.0**-24  # the largest below 1
    logits, uniforms = logits.to(device), uniforms.to(device)
    scale = torch.ones(4096, device=device)
    columns = implementation_of(implementation)(logits, scale, uniforms)
    assert torch.isfinite(columns).all()
    drawn = drawn_classes(columns, logits, scale)
    assert int(drawn.max()) <= 5 and int(drawn.min()) >= 0
    assert (columns[..., -1] == 0).all()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows, classes, draws", [(1, 1, 1), (5, 3, 1), (37, 129, 3), (6, 1000, 2), (300, 10, 1)])
def test_kernel_matches_reference(device, dtype, rows, classes, draws):
    """Same uniforms, same classes, same columns (float64 exactly the same draws; float32 may draw the class
    next to a boundary the other side of it, a chance of about 1e-7 per draw)."""
    generator = torch.Generator().manual_seed(rows * classes + draws)
    logits = (3 * torch.randn(rows, classes + 2, generator=generator, dtype=dtype))[:, 1:-1].to(device)  # strided
    scale = torch.rand(rows, generator=generator, dtype=dtype).to(device)
    scale[0] = 0.0
    uniforms = torch.rand(rows, draws, generator=generator, dtype=dtype).to(device)
    kernel = torch.ops.torch_secorder.softmax_sampled_columns(logits, scale, uniforms)
    reference = reference_ops.softmax_sampled_columns(logits, scale, uniforms)
    assert kernel.shape == (rows, draws, classes) and kernel.dtype == dtype
    assert relative_error(kernel, reference) < (1e-12 if dtype == torch.float64 else 1e-5)
    assert (kernel[0] == 0).all()  # a zero scale: zero columns


def test_columns_average_to_the_hessian():
    """E_y[(p - e_y)(p - e_y)^T] = diag(p) - p p^T: over 100k draws within 5 standard errors of each entry."""
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    scale = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    draws = 100_000
    uniforms = torch.rand(3, draws, generator=generator, dtype=torch.float64)
    columns = ops.softmax_sampled_columns(logits, scale, uniforms)  # sqrt(s / M) (p - e_y)
    outer = columns.unsqueeze(3) * columns.unsqueeze(2)  # (N, M, C, C), each s / M (p - e_y)(p - e_y)^T
    estimate = outer.sum(1)
    p = torch.softmax(logits, dim=1)
    exact = scale[:, None, None] * (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1))
    spread = (outer * draws).std(dim=1) / draws**0.5
    assert ((estimate - exact).abs() <= 5 * spread + 1e-12).all()


def test_a_generator_makes_draws_reproducible():
    from torch_secorder import model_fisher_diagonal

    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 10))
    x, y = torch.randn(32, 6), torch.randint(0, 10, (32,))
    loss_fn = torch.nn.CrossEntropyLoss()
    first = model_fisher_diagonal(model, loss_fn, x, y, mc_samples=3, generator=torch.Generator().manual_seed(7))
    second = model_fisher_diagonal(model, loss_fn, x, y, mc_samples=3, generator=torch.Generator().manual_seed(7))
    third = model_fisher_diagonal(model, loss_fn, x, y, mc_samples=3, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, c) for a, c in zip(first, third))


@needs_kernels
def test_bad_arguments_are_named():
    logits, scale = torch.randn(4, 3), torch.ones(4)
    with pytest.raises(RuntimeError, match=r"uniforms must have shape \(N, M\) with N = 4"):
        torch.ops.torch_secorder.softmax_sampled_columns(logits, scale, torch.rand(3, 1))
    with pytest.raises(RuntimeError, match="uniforms must have the dtype and device of logits"):
        torch.ops.torch_secorder.softmax_sampled_columns(logits, scale, torch.rand(4, 1, dtype=torch.float64))


@needs_kernels
def test_empty_and_opcheck(device):
    logits = torch.zeros(0, 4, dtype=torch.float64, device=device)
    empty = torch.ops.torch_secorder.softmax_sampled_columns(logits, logits[:, 0], logits[:, :2])
    assert empty.shape == (0, 2, 4)
    generator = torch.Generator().manual_seed(5)
    args = (
        torch.randn(6, 4, generator=generator, dtype=torch.float64).to(device),
        torch.rand(6, generator=generator, dtype=torch.float64).to(device),
        torch.rand(6, 2, generator=generator, dtype=torch.float64).to(device),
    )
    torch.library.opcheck(torch.ops.torch_secorder.softmax_sampled_columns.default, args)
