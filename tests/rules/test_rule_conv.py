"""The conv rule family against the float64 brute force."""

import pytest
import torch
import torch.nn as nn
from helpers import D, assert_backprop_exact


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=2, dilation=2, padding=2),
        dict(kernel_size=3, padding="same", dilation=2),
        dict(kernel_size=2, padding="same"),
        dict(kernel_size=3, groups=2, padding=1),
        dict(kernel_size=1, stride=3, bias=False),
        dict(kernel_size=(3, 1), stride=(1, 2), padding=(1, 0)),
        dict(kernel_size=4, padding="same"),  # even kernel: 'same' pads one more after
        dict(kernel_size=2, padding="valid"),
        dict(kernel_size=5, stride=3, padding=2),
    ],
    ids=str,
)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # torch's own, on the model
def test_convolution_corners(conv, dims):
    if dims != 2 and isinstance(conv["kernel_size"], tuple):
        pytest.skip("2-D kernel shape")
    torch.manual_seed(4)
    conv_class = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    size = {1: 9, 2: 7, 3: 5}[dims]
    x = torch.randn(3, 4, *([size] * dims), dtype=D)
    layer = conv_class(4, 6, **conv)
    out_features = layer(x.float()).numel() // 3
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(out_features, 3)).double()
    assert_backprop_exact(model, nn.CrossEntropyLoss(), x, torch.tensor([0, 2, 1]))


GEOMETRIES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=2, stride=2),
    dict(kernel_size=3, stride=2, dilation=2, padding=2),
    dict(kernel_size=4, padding="same"),
    dict(kernel_size=2, padding="valid"),
    dict(kernel_size=1),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_convolution_below_max_pooling_reads_the_pooled_positions(geometry):
    """After a max pooling whose windows do not overlap the curvature stays on the pooled grid: the weight
    diagonal of the convolution under it reads only the selected positions of its input patches."""
    torch.manual_seed(9)
    x = torch.randn(3, 2, 10, 10, dtype=D)
    conv = nn.Conv2d(2, 3, **geometry)
    features = nn.MaxPool2d(2)(conv(x.float())).numel() // 3
    model = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(features, 3)).double()
    assert_backprop_exact(model, nn.CrossEntropyLoss(), x, torch.tensor([0, 2, 1]))
