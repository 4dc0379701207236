"""The linear rule family against the float64 brute force."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import D, assert_backprop_exact


def test_linear_with_extra_leading_axes():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Flatten(), nn.Linear(10, 2)).double()
    assert_backprop_exact(model, F.mse_loss, torch.randn(3, 5, 3, dtype=D), torch.randn(3, 2, dtype=D))
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)).double()
    assert_backprop_exact(model, F.mse_loss, torch.randn(3, 2, 2, 3, dtype=D), torch.randn(3, 2, 2, 2, dtype=D))
