"""Rules that form a pair's diagonal term 2 s (B^T l)(B^T r) themselves (Linear over positions, Embedding's rows),
against the per-sample projections multiplied: the same numbers, summed and per sample."""

import pytest
import torch
import torch.nn as nn

from torch_secorder.backprop.rules import LayerRecord, rule_for

D = torch.float64


def _projections(module, x, columns):
    """(N, V, *param.shape) per parameter: the vjp of each sample's output with each column."""
    params = dict(module.named_parameters())

    def one(sample, sample_columns):
        def of_params(*tensors):
            return torch.func.functional_call(module, dict(zip(params, tensors)), (sample.unsqueeze(0),))

        output, vjp = torch.func.vjp(of_params, *params.values())
        return torch.func.vmap(vjp)(sample_columns.reshape(sample_columns.shape[0], *output.shape))

    return dict(zip(params.values(), torch.func.vmap(one)(x, columns)))


def _expected(module, x, left, right, signs, per_sample):
    width = signs.shape[1]
    projected = _projections(module, x, torch.cat([left.flatten(2), right.flatten(2)], dim=1))
    result = {}
    for param, value in projected.items():
        product = 2 * value[:, :width] * value[:, width:] * signs.reshape(*signs.shape, *[1] * param.dim())
        result[id(param)] = product.sum(1) if per_sample else product.sum((0, 1))
    return result


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize(
    "case",
    [
        (lambda: nn.Linear(5, 4), lambda g: torch.randn(3, 5, generator=g, dtype=D)),
        (lambda: nn.Linear(5, 4), lambda g: torch.randn(3, 6, 2, 5, generator=g, dtype=D)),
        (lambda: nn.Embedding(9, 4, padding_idx=0), lambda g: torch.randint(0, 9, (3, 7), generator=g)),
        (lambda: nn.Conv2d(4, 6, 1), lambda g: torch.randn(3, 4, 1, 1, generator=g, dtype=D)),
        (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), lambda g: torch.randn(3, 3, 7, 6, generator=g, dtype=D)),
        (lambda: nn.Conv1d(2, 4, 3, dilation=2, bias=False), lambda g: torch.randn(3, 2, 9, generator=g, dtype=D)),
        (lambda: nn.Conv3d(2, 3, 2, padding="same"), lambda g: torch.randn(3, 2, 3, 3, 2, generator=g, dtype=D)),
    ],
    ids=["linear", "linear-positions", "embedding", "conv-1x1", "conv-strided", "conv1d-dilated", "conv3d-same"],
)
def test_pair_diagonals_equal_the_projections_multiplied(case, per_sample):
    make_module, make_input = case
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    module = make_module().double()
    x = make_input(generator)
    x[:, :2] = 3 if not x.is_floating_point() else x[:, :2]  # a token repeated within a sample adds before squaring
    output = module(x)
    width = 5
    left = torch.randn(3, width, *output.shape[1:], generator=generator, dtype=D)
    right = torch.randn(3, width, *output.shape[1:], generator=generator, dtype=D)
    signs = torch.sign(torch.randn(3, width, generator=generator, dtype=D))
    record = LayerRecord(module, x, output, wanted=frozenset(id(p) for p in module.parameters()))
    actual = rule_for(module).pair_diagonals(record, left, right, signs, per_sample=per_sample)
    expected = _expected(module, x, left, right, signs, per_sample)
    assert {id(p) for p, _ in actual} == set(expected)
    for param, value in actual:
        torch.testing.assert_close(value, expected[id(param)], rtol=1e-12, atol=1e-12)


def test_a_convolution_with_groups_or_many_positions_leaves_the_pairs_to_the_projections():
    generator = torch.Generator().manual_seed(2)
    for module, x in [
        (nn.Conv2d(4, 4, 3, groups=2), torch.randn(2, 4, 5, 5, generator=generator, dtype=D)),
        (nn.Conv2d(2, 3, 1), torch.randn(2, 2, 9, 9, generator=generator, dtype=D)),  # 81 positions
    ]:
        module = module.double()
        output = module(x)
        columns = torch.randn(2, 3, *output.shape[1:], generator=generator, dtype=D)
        record = LayerRecord(module, x, output, wanted=frozenset(id(p) for p in module.parameters()))
        assert not rule_for(module).forms_pairs(record)
        assert rule_for(module).pair_diagonals(record, columns, columns, torch.ones(2, 3, dtype=D)) is None
