"""The elementwise rule family against the float64 brute force."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import D, assert_backprop_exact
from models import ACTIVATIONS


@pytest.mark.parametrize("make_activation", ACTIVATIONS)
def test_each_activation(make_activation):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(3, 4), make_activation(), nn.Linear(4, 4), make_activation(), nn.Linear(4, 2)
    ).double()
    assert_backprop_exact(model, F.mse_loss, torch.randn(5, 3, dtype=D), torch.randn(5, 2, dtype=D))
