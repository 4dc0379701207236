"""The conv_transpose rule family against the float64 brute force."""

import pytest
import torch
import torch.nn as nn
from helpers import exact, vectors


@pytest.mark.parametrize("transpose", [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d])
def test_transposed_convolutions(transpose):
    torch.manual_seed(0)
    dims = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}[transpose]
    size = (3,) * dims
    layer = transpose(2, 2, 3, stride=2, padding=1, output_padding=1, dilation=1)
    with torch.no_grad():
        features = layer(torch.zeros(1, 2, *size)).numel()
    exact(nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(features, 3)), vectors(2, *size))
