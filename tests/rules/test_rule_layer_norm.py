"""The layer_norm rule family against the float64 brute force."""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import exact, vectors

from torch_secorder import model_hessian_diagonal


def test_layer_norm_over_several_rows_and_axes():
    torch.manual_seed(0)
    exact(
        nn.Sequential(
            nn.Linear(3, 6), nn.Unflatten(1, (2, 3)), nn.LayerNorm(3), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3)
        ),
        vectors(3),
    )
    exact(nn.Sequential(nn.Conv2d(2, 2, 2), nn.LayerNorm([2, 2, 2]), nn.Flatten(), nn.Linear(8, 3)), vectors(2, 3, 3))


class TinyScaleBlock(nn.Module):
    """ConvNeXt's block: a residual whose LayerNorm branch is scaled by 1e-6 (its layer scale at init)."""

    def __init__(self):
        super().__init__()
        self.embed, self.inner, self.norm = nn.Linear(4, 8), nn.Linear(8, 8), nn.LayerNorm(8)
        self.up, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + 1e-6 * self.up(nn.functional.gelu(self.norm(self.inner(h))))
        return self.head(h)


def test_layer_norm_under_a_tiny_scale_is_as_accurate_in_float32_as_the_generic_method():
    """The LayerNorm term's columns are balanced: with |u| << |x^| their squares once cancelled to far below their
    rounding (float32: errors 3000x the diagonal of the weights below the norm)."""
    torch.manual_seed(0)
    model, x, y = TinyScaleBlock(), torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    reference = model_hessian_diagonal(copy.deepcopy(model).double(), F.cross_entropy, x.double(), y, method="autograd")

    def error(diagonals):
        return max(((d.double() - r).abs().max() / r.abs().max()).item() for d, r in zip(diagonals, reference))

    engine = error(model_hessian_diagonal(model, F.cross_entropy, x, y, method="backprop"))
    generic = error(model_hessian_diagonal(model, F.cross_entropy, x, y, method="autograd"))
    assert engine < 10 * max(generic, 1e-7), (engine, generic)
