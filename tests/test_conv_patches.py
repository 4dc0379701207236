"""tap_major_patches (the convolution weight rules' input patches) against F.unfold's definition, in every geometry
the modules accept: 1-3 spatial dimensions, stride, dilation, numeric / 'same' (even kernels pad one more after) /
'valid' padding."""

import pytest
import torch
import torch.nn as nn

from torch_secorder.backprop.rules.conv import _weight_order, tap_major_patches, unfold

GEOMETRIES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=2, stride=2),
    dict(kernel_size=3, stride=2, dilation=2, padding=2),
    dict(kernel_size=4, padding="same"),
    dict(kernel_size=3, dilation=2, padding="same"),
    dict(kernel_size=2, padding="valid"),
    dict(kernel_size=5, stride=3, padding=2),
    dict(kernel_size=1),
]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_patches_hold_what_each_output_position_reads(dims, geometry):
    torch.manual_seed(0)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](3, 4, **geometry).double()
    x = torch.randn(2, 3, *([9] * dims), dtype=torch.float64)
    patches = tap_major_patches(conv, x)  # (N, P, taps, C)
    samples, positions, taps, channels = patches.shape
    assert (samples, positions, channels) == (2, conv(x)[0, 0].numel(), 3)
    in_weight_order = _weight_order(patches.flatten(2), taps, channels).transpose(1, 2)  # (N, C taps, P)
    assert torch.equal(in_weight_order, unfold(conv, x))
    # and the patches reproduce the convolution itself
    out = torch.einsum("nptc,oct->nop", patches, conv.weight.detach().flatten(2))
    expected = (conv(x) - conv.bias.detach().reshape(1, -1, *([1] * dims))).detach().flatten(2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
