"""The batch_norm rule family against the float64 brute force."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import D, assert_backprop_exact, randomise_batch_norm


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_pooling_and_batch_norm(dims):
    torch.manual_seed(5)
    generator = torch.Generator().manual_seed(5)
    conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
    pools = {
        1: (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d),
        2: (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d),
        3: (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d),
    }[dims]
    size = {1: 12, 2: 8, 3: 6}[dims]
    x = torch.randn(3, 2, *([size] * dims), dtype=D)
    model = nn.Sequential(
        conv(2, 3, 3, padding=1),
        bn(3),
        nn.Softplus(),
        pools[0](3, stride=2, padding=1),
        conv(3, 3, 2),
        nn.ReLU(),
        pools[1](2, ceil_mode=True),
        pools[2](1),
        nn.Flatten(),
        nn.Linear(3, 2),
        nn.BatchNorm1d(2),
        nn.Sigmoid(),
        nn.Linear(2, 2),
    ).double()
    randomise_batch_norm(model, generator)
    assert_backprop_exact(model, F.mse_loss, x, torch.randn(3, 2, dtype=D))
