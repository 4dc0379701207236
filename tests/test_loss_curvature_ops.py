"""Loss-curvature ops: compiled kernels vs pure-torch references vs torch.func Hessians of the real losses."""

import pytest
import torch
import torch.nn.functional as F
from helpers import relative_error
from torch.func import hessian

from torch_secorder import ops, reference_ops

pytestmark = pytest.mark.skipif(not ops.compiled_ops_loaded(), reason="compiled ops not built")

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def per_sample_blocks(loss_of_output, output):
    """(N, K, K) per-sample blocks of the Hessian of the loss in the output, and a check that
    the cross-sample blocks vanish (they must, for per-sample losses)."""
    n = output.shape[0]
    flat = output.reshape(n, -1)
    k = flat.shape[1]
    full = hessian(lambda z: loss_of_output(z.reshape(output.shape)))(flat).reshape(n, k, n, k)
    blocks = torch.stack([full[i, :, i, :] for i in range(n)])
    off_diagonal = full.clone()
    for i in range(n):
        off_diagonal[i, :, i, :] = 0
    assert off_diagonal.abs().max().item() <= 1e-12 * max(1.0, full.abs().max().item())
    return blocks


def check_loss_op(diag_op, sqrt_op, args, kwargs, loss_of_output, logits, dtype):
    compiled_diag = getattr(torch.ops.torch_secorder, diag_op)(logits, *args, **kwargs)
    compiled_sqrt = getattr(torch.ops.torch_secorder, sqrt_op)(logits, *args, **kwargs)
    reference_diag = getattr(reference_ops, diag_op)(logits, *args, **kwargs)
    reference_sqrt = getattr(reference_ops, sqrt_op)(logits, *args, **kwargs)
    assert compiled_diag.shape == logits.shape and compiled_diag.dtype == dtype
    assert compiled_diag.device == logits.device
    assert relative_error(compiled_diag, reference_diag) < TOL[dtype]
    assert relative_error(compiled_sqrt, reference_sqrt) < TOL[dtype]
    if dtype == torch.float64:
        blocks = per_sample_blocks(loss_of_output, logits.detach().cpu())
        n = logits.shape[0]
        assert relative_error(compiled_diag.reshape(n, -1), torch.diagonal(blocks, dim1=1, dim2=2)) < 1e-12
        assert relative_error(compiled_sqrt @ compiled_sqrt.transpose(1, 2), blocks) < 1e-12


def odd_logits(n, c, dtype, device, contiguous, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if contiguous:
        x = torch.randn(n, c, generator=generator, dtype=dtype)
    else:  # transposed and strided: the kernels must not assume a layout
        x = torch.randn(2 * c, n, generator=generator, dtype=dtype).t()[:, ::2]
    return (3 * x).to(device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weight": True},
        {"ignore_index": 2},
        {"label_smoothing": 0.2},
        {"weight": True, "ignore_index": 1, "label_smoothing": 0.3},
        {"probabilities": True},
        {"probabilities": True, "weight": True, "label_smoothing": 0.1},
    ],
    ids=lambda o: "-".join(o) or "plain",
)
def test_cross_entropy(device, dtype, reduction, contiguous, options):
    n, c = 13, 7
    logits = odd_logits(n, c, dtype, device, contiguous)
    generator = torch.Generator().manual_seed(1)
    if options.get("probabilities"):
        target = torch.softmax(torch.randn(n, c, generator=generator, dtype=dtype), 1).to(device)
    else:
        target = torch.randint(0, c, (n,), generator=generator)
        if "ignore_index" in options:
            target[::3] = options["ignore_index"]
        target = target.to(device)
    weight = torch.rand(c, generator=generator, dtype=dtype).add(0.5).to(device) if options.get("weight") else None
    ignore_index = options.get("ignore_index", -100)
    smoothing = options.get("label_smoothing", 0.0)
    args = (target, weight, ignore_index, smoothing, reduction)

    def loss_of_output(z):
        return F.cross_entropy(
            z,
            target.cpu(),
            weight=None if weight is None else weight.cpu(),
            ignore_index=ignore_index,
            label_smoothing=smoothing,
            reduction=reduction,
        )

    check_loss_op("cross_entropy_hessian_diag", "cross_entropy_hessian_sqrt", args, {}, loss_of_output, logits, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(9,), (9, 1), (8, 5), (4, 3, 2)])
@pytest.mark.parametrize("weights", ["none", "weight", "pos_weight", "both"])
def test_bce_with_logits(device, dtype, reduction, shape, weights):
    generator = torch.Generator().manual_seed(2)
    logits = (4 * torch.randn(shape, generator=generator, dtype=dtype)).to(device)
    target = torch.rand(shape, generator=generator, dtype=dtype).round().to(device)
    last = shape[-1]
    weight = (
        torch.rand(shape, generator=generator, dtype=dtype).add(0.2).to(device)
        if weights in ("weight", "both")
        else None
    )
    pos_weight = (
        torch.rand(last, generator=generator, dtype=dtype).mul(3).to(device)
        if weights in ("pos_weight", "both")
        else None
    )
    args = (target, weight, pos_weight, reduction)

    def loss_of_output(z):
        return F.binary_cross_entropy_with_logits(
            z,
            target.cpu(),
            weight=None if weight is None else weight.cpu(),
            pos_weight=None if pos_weight is None else pos_weight.cpu(),
            reduction=reduction,
        )

    check_loss_op(
        "bce_with_logits_hessian_diag", "bce_with_logits_hessian_sqrt", args, {}, loss_of_output, logits, dtype
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(6,), (6, 3), (5, 2, 3)])
def test_mse(device, dtype, reduction, shape):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(shape, generator=generator, dtype=dtype).to(device)
    target = torch.randn(shape, generator=generator, dtype=dtype).to(device)

    def loss_of_output(z):
        return ((z - target.cpu()) ** 2).mean() if reduction == "mean" else ((z - target.cpu()) ** 2).sum()

    check_loss_op("mse_loss_hessian_diag", "mse_loss_hessian_sqrt", (reduction,), {}, loss_of_output, logits, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows, classes", [(1, 1), (3, 2), (37, 129), (5, 1000), (300, 10)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_softmax_kernels_large_and_odd(device, dtype, rows, classes, contiguous):
    logits = odd_logits(rows, classes, dtype, device, contiguous, seed=rows + classes)
    scale = torch.rand(rows, dtype=dtype).to(device)
    for name in ("softmax_hessian_diag", "softmax_hessian_sqrt", "softmax_hessian_columns"):
        compiled = getattr(torch.ops.torch_secorder, name)(logits, scale)
        assert relative_error(compiled, getattr(reference_ops, name)(logits, scale)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows, classes", [(1, 1), (4, 2), (9, 10), (3, 300)])
@pytest.mark.parametrize("ties", [False, True])
def test_softmax_hessian_columns_span_the_hessian(device, dtype, rows, classes, ties):
    """C - 1 columns whose outer products sum to scale (diag(p) - p p^T), also when classes tie for the top
    (the kernels and the reference all take the first) and with a zero scale."""
    logits = odd_logits(rows, classes, dtype, device, True, seed=rows * classes)
    if ties:
        logits[:, : min(2, classes)] = logits.max() + 1.0
    scale = torch.rand(rows, dtype=dtype).to(device)
    scale[0] = 0.0
    columns = torch.ops.torch_secorder.softmax_hessian_columns(logits, scale)
    assert columns.shape == (rows, classes - 1, classes)
    p = torch.softmax(logits.double(), 1)
    expected = scale.double()[:, None, None] * (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1))
    product = columns.double().transpose(1, 2) @ columns.double()
    assert (product - expected).abs().max() < (1e-12 if dtype == torch.float64 else 1e-6)
    assert relative_error(columns, reference_ops.softmax_hessian_columns(logits, scale)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sigmoid_kernel_extreme_logits(device, dtype):
    logits = torch.tensor([-800.0, -40.0, -5.0, 0.0, 1e-8, 7.0, 40.0, 800.0], dtype=dtype).to(device)
    scale = torch.linspace(0.5, 2.0, 8, dtype=dtype).to(device)
    compiled = torch.ops.torch_secorder.sigmoid_hessian_diag(logits, scale)
    assert torch.isfinite(compiled).all()
    assert relative_error(compiled, reference_ops.sigmoid_hessian_diag(logits, scale)) < TOL[dtype]
    big = torch.randn(100_003, dtype=dtype).mul(5).to(device)
    ones = torch.ones_like(big)
    assert (
        relative_error(
            torch.ops.torch_secorder.sigmoid_hessian_diag(big, ones), reference_ops.sigmoid_hessian_diag(big, ones)
        )
        < TOL[dtype]
    )


def test_empty_batch(device):
    logits = torch.zeros(0, 4, dtype=torch.float64, device=device)
    scale = torch.zeros(0, dtype=torch.float64, device=device)
    assert torch.ops.torch_secorder.softmax_hessian_sqrt(logits, scale).shape == (0, 4, 4)
    assert torch.ops.torch_secorder.softmax_hessian_diag(logits, scale).shape == (0, 4)
    assert torch.ops.torch_secorder.softmax_hessian_columns(logits, scale).shape == (0, 3, 4)


def test_python_face_uses_reference_when_a_graph_is_needed():
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 2, 1, 1])
    diag = ops.cross_entropy_hessian_diag(logits, target)
    assert diag.grad_fn is not None  # differentiable
    with torch.no_grad():
        plain = ops.cross_entropy_hessian_diag(logits, target)
    assert plain.grad_fn is None
    assert relative_error(diag, plain) < 1e-12
    # the derivative of the curvature agrees with autograd through the loss itself
    (grad,) = torch.autograd.grad(diag.sum(), logits)
    (expected,) = torch.autograd.grad(
        torch.diagonal(per_sample_blocks_graph(logits, target), dim1=1, dim2=2).sum(), logits
    )
    assert relative_error(grad, expected) < 1e-10


def per_sample_blocks_graph(logits, target):
    p = torch.softmax(logits, 1)
    return (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)) / logits.shape[0]


def test_bad_arguments_are_named():
    logits = torch.randn(4, 3)
    with pytest.raises(ValueError, match="reduction"):
        ops.cross_entropy_hessian_diag(logits, torch.zeros(4, dtype=torch.long), reduction="batchmean")
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ops.cross_entropy_hessian_diag(logits, torch.zeros(4, dtype=torch.long), weight=torch.ones(5))
    with pytest.raises(RuntimeError, match="scale must have shape"):
        ops.softmax_hessian_diag(logits, torch.ones(3))
    with pytest.raises(RuntimeError, match="target must have the shape"):
        ops.bce_with_logits_hessian_diag(logits, torch.ones(4))
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        ops.softmax_hessian_sqrt(torch.randn(2, 3, 4), torch.ones(2))


def opcheck_samples(device):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64).to(device)
    scale = torch.rand(6, generator=generator, dtype=torch.float64).to(device)
    target = torch.tensor([0, 1, 2, 3, 1, 0], device=device)
    weight = torch.rand(4, generator=generator, dtype=torch.float64).to(device)
    binary = torch.rand(6, 4, generator=generator, dtype=torch.float64).round().to(device)
    return [
        ("softmax_hessian_diag", (x, scale)),
        ("softmax_hessian_sqrt", (x, scale)),
        ("softmax_hessian_columns", (x, scale)),
        ("sigmoid_hessian_diag", (x, torch.rand_like(x))),
        ("mse_loss_hessian_diag", (x, "mean")),
        ("mse_loss_hessian_sqrt", (x, "sum")),
        ("cross_entropy_hessian_diag", (x, target, weight, 1, 0.1, "mean")),
        ("cross_entropy_hessian_sqrt", (x, target, None, -100, 0.0, "sum")),
        ("bce_with_logits_hessian_diag", (x, binary, None, weight, "mean")),
        ("bce_with_logits_hessian_sqrt", (x, binary, torch.rand_like(x), None, "sum")),
    ]


@pytest.mark.parametrize("index", range(10))
def test_opcheck(device, index):
    name, args = opcheck_samples(device)[index]
    torch.library.opcheck(getattr(torch.ops.torch_secorder, name).default, args)
