"""The structural rule family against the float64 brute force."""

import torch
import torch.nn as nn
from helpers import D, assert_backprop_exact


def test_nested_sequentials_dropout_identity_and_frozen_parameters():
    torch.manual_seed(8)
    inner = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Tanh())
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(inner, nn.Identity()), nn.Linear(4, 2)).double().eval()
    model[0].bias.requires_grad_(False)
    diag = assert_backprop_exact(
        model, nn.CrossEntropyLoss(), torch.randn(5, 3, dtype=D), torch.tensor([0, 1, 1, 0, 1])
    )
    assert torch.equal(diag[1], torch.zeros(4, dtype=D))
