"""The layer_norm rule family against the float64 brute force."""

import torch
import torch.nn as nn
from helpers import exact, vectors


def test_layer_norm_over_several_rows_and_axes():
    torch.manual_seed(0)
    exact(
        nn.Sequential(
            nn.Linear(3, 6), nn.Unflatten(1, (2, 3)), nn.LayerNorm(3), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3)
        ),
        vectors(3),
    )
    exact(nn.Sequential(nn.Conv2d(2, 2, 2), nn.LayerNorm([2, 2, 2]), nn.Flatten(), nn.Linear(8, 3)), vectors(2, 3, 3))
