"""Hessian-backprop contraction ops: compiled kernels vs pure-torch references vs plain definitions."""

import pytest
import torch
from helpers import relative_error

from torch_secorder import ops, reference_ops

pytestmark = pytest.mark.skipif(not ops.compiled_ops_loaded(), reason="compiled ops not built")

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def signs_like(samples, columns, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(samples, columns, generator=generator) < 0.3, -1.0, 1.0).to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (17, 33, 129), (4, 300, 2)])
@pytest.mark.parametrize("layout", ["contiguous", "columns_major", "strided"])
@pytest.mark.parametrize("with_signs", [False, True])
def test_factor_diagonal(device, dtype, shape, layout, with_signs):
    samples, columns, features = shape
    generator = torch.Generator().manual_seed(sum(shape))
    if layout == "contiguous":
        factors = torch.randn(samples, columns, features, generator=generator, dtype=dtype)
    elif layout == "columns_major":  # (V, N, D) storage, as after a convolution transpose
        factors = torch.randn(columns, samples, features, generator=generator, dtype=dtype).transpose(0, 1)
    else:
        factors = torch.randn(samples, columns, 2 * features, generator=generator, dtype=dtype)[:, :, ::2]
    factors = factors.to(device)
    signs = signs_like(samples, columns, dtype, device, 1) if with_signs else None
    result = torch.ops.torch_secorder.factor_diagonal(factors, signs)
    # definition: the diagonal of S^T diag(signs) S for every sample
    weights = torch.ones(samples, columns, dtype=dtype, device=device) if signs is None else signs
    dense = torch.einsum("nvd,nv,nve->nde", factors, weights, factors)
    assert relative_error(result, torch.diagonal(dense, dim1=1, dim2=2)) < TOL[dtype]
    assert relative_error(result, reference_ops.factor_diagonal(factors, signs)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 3, 4, 5, 6), (7, 10, 17, 33, 19), (3, 2, 40, 1, 300)])
@pytest.mark.parametrize("with_signs", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
def test_affine_weight_diagonal(device, dtype, shape, with_signs, contiguous):
    samples, columns, outs, ins, positions = shape
    generator = torch.Generator().manual_seed(sum(shape))
    if contiguous:
        factors = torch.randn(samples, columns, outs, positions, generator=generator, dtype=dtype)
        inputs = torch.randn(samples, ins, positions, generator=generator, dtype=dtype)
    else:
        factors = torch.randn(columns, samples, outs, positions, generator=generator, dtype=dtype).transpose(0, 1)
        inputs = torch.randn(samples, positions, ins, generator=generator, dtype=dtype).transpose(1, 2)
    factors, inputs = factors.to(device), inputs.to(device)
    signs = signs_like(samples, columns, dtype, device, 2) if with_signs else None
    result = torch.ops.torch_secorder.affine_weight_diagonal(factors, signs, inputs)
    assert result.shape == (outs, ins) and result.dtype == dtype and result.device == factors.device
    weights = torch.ones(samples, columns, dtype=dtype, device=device) if signs is None else signs
    products = torch.einsum("nvop,nkp->nvok", factors, inputs)
    expected = torch.einsum("nv,nvok->ok", weights, products * products)
    assert relative_error(result, expected) < TOL[dtype]
    assert relative_error(result, reference_ops.affine_weight_diagonal(factors, signs, inputs)) < TOL[dtype]


def test_bad_arguments_are_named():
    with pytest.raises(RuntimeError, match=r"signs must have shape \(N, V\)"):
        ops.factor_diagonal(torch.randn(2, 3, 4), torch.ones(3, 2))
    with pytest.raises(RuntimeError, match="inputs .* must match factors"):
        ops.affine_weight_diagonal(torch.randn(2, 3, 4, 5), None, torch.randn(2, 6, 4))
    with pytest.raises(RuntimeError, match="inputs has dtype"):
        ops.affine_weight_diagonal(torch.randn(2, 3, 4, 5), None, torch.randn(2, 6, 5, dtype=torch.float64))


@pytest.mark.parametrize("name", ["factor_diagonal", "affine_weight_diagonal"])
@pytest.mark.parametrize("with_signs", [False, True])
def test_opcheck(device, name, with_signs):
    generator = torch.Generator().manual_seed(4)
    signs = signs_like(3, 4, torch.float64, device, 3) if with_signs else None
    if name == "factor_diagonal":
        args = (torch.randn(3, 4, 5, generator=generator, dtype=torch.float64).to(device), signs)
    else:
        args = (
            torch.randn(3, 4, 2, 6, generator=generator, dtype=torch.float64).to(device),
            signs,
            torch.randn(3, 5, 6, generator=generator, dtype=torch.float64).to(device),
        )
    torch.library.opcheck(getattr(torch.ops.torch_secorder, name).default, args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1, 1, 1), (3, 4, 5, 6, 7, 20), (9, 10, 16, 33, 27, 130), (6, 1, 5, 12, 19, 40)]
)  # one column: the in-place row sums
@pytest.mark.parametrize("with_signs", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
def test_selected_weight_diagonal(device, dtype, shape, with_signs, per_sample):
    samples, columns, outs, selected, ins, positions = shape
    generator = torch.Generator().manual_seed(sum(shape))
    factors = torch.randn(samples, columns, outs, selected, generator=generator, dtype=dtype).to(device)
    indices = torch.randint(0, positions, (samples, outs, selected), generator=generator).to(device)
    inputs = torch.randn(samples, positions, ins, generator=generator, dtype=dtype).transpose(1, 2).to(device)
    signs = signs_like(samples, columns, dtype, device, 5) if with_signs else None
    result = torch.ops.torch_secorder.selected_weight_diagonal(factors, signs, indices, inputs, per_sample)
    # definition: scatter the selected values to full positions, then the dense formula
    full = torch.zeros(samples, columns, outs, positions, dtype=dtype, device=device)
    full.scatter_add_(3, indices.unsqueeze(1).expand(-1, columns, -1, -1), factors)
    weights = torch.ones(samples, columns, dtype=dtype, device=device) if signs is None else signs
    products = torch.einsum("nvop,nkp->nvok", full, inputs)
    expected = torch.einsum(f"nv,nvok->{'nok' if per_sample else 'ok'}", weights, products * products)
    assert result.shape == expected.shape
    assert relative_error(result, expected) < TOL[dtype]
    reference = reference_ops.selected_weight_diagonal(factors, signs, indices, inputs, per_sample)
    assert relative_error(result, reference) < TOL[dtype]


def test_selected_weight_diagonal_checks_indices():
    with pytest.raises(RuntimeError, match="indices must be int64"):
        ops.selected_weight_diagonal(
            torch.randn(2, 3, 4, 5), None, torch.zeros(2, 4, 5, dtype=torch.int32), torch.randn(2, 6, 9)
        )
    with pytest.raises(RuntimeError, match="out of range"):
        ops.selected_weight_diagonal(torch.randn(2, 3, 4, 5), None, torch.full((2, 4, 5), 9), torch.randn(2, 6, 9))


@pytest.mark.parametrize("with_signs", [False, True])
def test_opcheck_selected(device, with_signs):
    generator = torch.Generator().manual_seed(6)
    args = (
        torch.randn(3, 4, 2, 5, generator=generator, dtype=torch.float64).to(device),
        signs_like(3, 4, torch.float64, device, 7) if with_signs else None,
        torch.randint(0, 8, (3, 2, 5), generator=generator).to(device),
        torch.randn(3, 6, 8, generator=generator, dtype=torch.float64).to(device),
    )
    torch.library.opcheck(torch.ops.torch_secorder.selected_weight_diagonal.default, args)
    torch.library.opcheck(torch.ops.torch_secorder.selected_weight_diagonal.default, args + (True,))


@pytest.mark.parametrize("op", ["affine", "selected"])
@pytest.mark.parametrize("columns", [1, 4])
def test_strided_factors_and_inputs_need_no_copy(device, op, columns):
    """(V, N, O, P) storage seen as (N, V, O, P), as a convolution transpose leaves it, and inputs read with gaps."""
    generator = torch.Generator().manual_seed(11)
    samples, outs, positions, ins = 3, 5, 12, 6
    factors = torch.randn(columns, samples, outs, 2 * positions, generator=generator, dtype=torch.float64)
    factors = factors.transpose(0, 1)[..., ::2].to(device)
    inputs = torch.randn(samples, 2 * ins, positions, generator=generator, dtype=torch.float64)[:, ::2].to(device)
    signs = signs_like(samples, columns, torch.float64, device, 3)
    if op == "affine":
        result = torch.ops.torch_secorder.affine_weight_diagonal(factors, signs, inputs)
        expected = reference_ops.affine_weight_diagonal(factors.contiguous(), signs, inputs.contiguous())
    else:
        indices = torch.randint(0, positions, (samples, outs, positions), generator=generator).to(device)
        result = torch.ops.torch_secorder.selected_weight_diagonal(factors, signs, indices, inputs)
        expected = reference_ops.selected_weight_diagonal(factors.contiguous(), signs, indices, inputs.contiguous())
    assert relative_error(result, expected) < 1e-12


@pytest.mark.parametrize("op", ["affine", "selected"])
def test_cuda_atomics_say_they_are_nondeterministic(device, op):
    if device.type != "cuda":
        pytest.skip("the CPU kernels are deterministic")
    factors = torch.randn(2, 3, 4, 5, device=device, dtype=torch.float64)
    inputs = torch.randn(2, 6, 5, device=device, dtype=torch.float64)
    indices = torch.randint(0, 5, (2, 4, 5), device=device)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="deterministic"):
            if op == "affine":
                torch.ops.torch_secorder.affine_weight_diagonal(factors, None, inputs)
            else:
                torch.ops.torch_secorder.selected_weight_diagonal(factors, None, indices, inputs)
    finally:
        torch.use_deterministic_algorithms(False)


def test_cuda_kernel_checks_indices_on_the_device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import subprocess
    import sys

    script = (
        "import torch; from torch_secorder import ops\n"
        "f = torch.randn(2, 3, 4, 5, device='cuda'); x = torch.randn(2, 6, 9, device='cuda')\n"
        "ops.selected_weight_diagonal(f, None, torch.full((2, 4, 5), 9, device='cuda'), x)\n"
        "torch.cuda.synchronize()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "assert" in done.stderr.lower(), done.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 9), (8, 10, 64, 1), (2, 3, 4, 300), (0, 2, 3, 4)])
@pytest.mark.parametrize("with_signs", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_channel_weight_diagonal(device, dtype, shape, with_signs, layout):
    """sum_n sum_v sign (sum_p S[n, v, c, p] X[n, c, p])^2; the transposed layout is LayerNorm's (rows as positions)."""
    samples, columns, channels, positions = shape
    generator = torch.Generator().manual_seed(sum(shape))
    if layout == "contiguous":
        factors = torch.randn(samples, columns, channels, positions, generator=generator, dtype=dtype)
        values = torch.randn(samples, channels, positions, generator=generator, dtype=dtype)
    else:
        factors = torch.randn(samples, columns, positions, channels, generator=generator, dtype=dtype).transpose(2, 3)
        values = torch.randn(samples, positions, channels, generator=generator, dtype=dtype).transpose(1, 2)
    factors, values = factors.to(device), values.to(device)
    signs = signs_like(samples, columns, dtype, device, 9) if with_signs else None
    result = torch.ops.torch_secorder.channel_weight_diagonal(factors, signs, values)
    assert result.shape == (channels,) and result.dtype == dtype and result.device == factors.device
    weights = torch.ones(samples, columns, dtype=dtype, device=device) if signs is None else signs
    projections = (factors * values.unsqueeze(1)).sum(3)  # definition, by broadcasting
    expected = (weights.unsqueeze(2) * projections * projections).sum((0, 1))
    assert relative_error(result, expected) < TOL[dtype]
    assert relative_error(result, reference_ops.channel_weight_diagonal(factors, signs, values)) < TOL[dtype]


@pytest.mark.parametrize("with_signs", [False, True])
def test_opcheck_channel(device, with_signs):
    generator = torch.Generator().manual_seed(8)
    args = (
        torch.randn(3, 4, 2, 5, generator=generator, dtype=torch.float64).to(device),
        signs_like(3, 4, torch.float64, device, 7) if with_signs else None,
        torch.randn(3, 2, 5, generator=generator, dtype=torch.float64).to(device),
    )
    torch.library.opcheck(torch.ops.torch_secorder.channel_weight_diagonal.default, args)


def test_channel_weight_diagonal_names_bad_arguments():
    with pytest.raises(RuntimeError, match=r"values must be \(N, C, P\)"):
        ops.channel_weight_diagonal(torch.randn(2, 3, 4, 5), None, torch.randn(2, 4, 6))
    with pytest.raises(RuntimeError, match="values has dtype"):
        ops.channel_weight_diagonal(torch.randn(2, 3, 4, 5), None, torch.randn(2, 4, 5, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(3, 9, 5, 7, 1), (4, 10, 6, 8, 4), (2, 3, 4, 5, 16)])
@pytest.mark.parametrize("with_signs", [False, True])
def test_weight_diagonal_over_position_pairs_equals_the_kernel(shape, with_signs):
    """The engine expands the square over position pairs when few positions meet many columns: same numbers."""
    from torch_secorder.backprop.rules.shared_weight import factor_weight_diagonal

    samples, columns, outs, ins, positions = shape
    generator = torch.Generator().manual_seed(sum(shape))
    factors = torch.randn(samples, columns, outs, positions, generator=generator, dtype=torch.float64)
    inputs = torch.randn(samples, ins, positions, generator=generator, dtype=torch.float64)
    signs = signs_like(samples, columns, torch.float64, "cpu", 4) if with_signs else None
    expected = reference_ops.affine_weight_diagonal(factors, signs, inputs)
    for budget in (1 << 24, 1):  # one chunk of samples, and one sample at a time
        result = factor_weight_diagonal(factors, signs, inputs, max_elements=budget, force_pairs=True)
        assert relative_error(result, expected) < 1e-12
        per_sample = factor_weight_diagonal(
            factors, signs, inputs, max_elements=budget, force_pairs=True, per_sample=True
        )
        for n in range(samples):
            one = reference_ops.affine_weight_diagonal(
                factors[n : n + 1], None if signs is None else signs[n : n + 1], inputs[n : n + 1]
            )
            assert relative_error(per_sample[n], one) < 1e-12
