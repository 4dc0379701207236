"""The pooling rule family against the float64 brute force."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import D, assert_backprop_exact


def test_overlapping_max_pool_windows():
    torch.manual_seed(6)
    x = torch.randn(4, 1, 7, 7, dtype=D)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 2), nn.GELU(), nn.MaxPool2d(3, stride=1), nn.Flatten(), nn.Linear(32, 2)
    ).double()
    assert_backprop_exact(model, F.mse_loss, x, torch.randn(4, 2, dtype=D))


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(2, stride=2, dilation=2),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.MaxPool2d(2, stride=3),
        nn.MaxPool2d((2, 3), stride=(2, 1), ceil_mode=True),
    ],
    ids=repr,
)
def test_max_pool_windows_that_overlap_or_leave_gaps(pool):
    torch.manual_seed(12)
    x = torch.randn(3, 2, 9, 9, dtype=D)
    conv = nn.Conv2d(2, 3, 2)
    features = pool(conv(x.float())).numel() // 3
    model = nn.Sequential(
        conv, nn.Softplus(), pool, nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(features // 3 * 2, 2)
    ).double()
    assert_backprop_exact(model, nn.CrossEntropyLoss(), x, torch.tensor([0, 1, 1]))
