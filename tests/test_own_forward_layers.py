"""Norm layers written the way timm writes them: subclasses of nn.LayerNorm / nn.BatchNorm2d whose own forward
calls F.layer_norm / F.batch_norm (with permutes around it, an activation after it). The engine reads such a
forward op by op; in eval mode that is exact, in train mode (batch statistics) it steps aside naming it."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import D, assert_steps_aside, exact

from torch_secorder import explain_method


class LayerNorm(nn.LayerNorm):  # timm.layers.LayerNorm
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class LayerNorm2d(nn.LayerNorm):  # timm.layers.LayerNorm2d: channels of an (N, C, H, W) map
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class BatchNormAct2d(nn.BatchNorm2d):  # timm.layers.BatchNormAct2d, its running-statistics logic kept
    def __init__(self, channels, act=nn.SiLU):
        super().__init__(channels)
        self.act = act()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            batch_statistics,
            factor,
            self.eps,
        )
        return self.act(x)


def convnet(norm):
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), norm(3), nn.GELU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))


def images():
    return torch.randn(5, 2, 4, 4, dtype=D, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("norm", [LayerNorm2d, BatchNormAct2d, lambda c: BatchNormAct2d(c, nn.Identity)])
def test_norm_layers_with_their_own_forward_on_feature_maps(norm):
    exact(convnet(norm), images())


def test_layer_norm_with_its_own_forward_on_tokens():
    model = nn.Sequential(nn.Linear(4, 6), LayerNorm(6), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))
    exact(model, torch.randn(5, 3, 4, dtype=D, generator=torch.Generator().manual_seed(4)))


def test_batch_norm_with_its_own_forward_in_train_mode_steps_aside():
    """Batch statistics couple the samples: the generic method runs it, exact, and says so."""
    model = convnet(BatchNormAct2d).double().train()
    x, y = images(), torch.tensor([0, 1, 2, 1, 0])
    assert_steps_aside(model, x, y, "F.batch_norm with batch statistics")


def test_batch_norm_without_running_statistics_in_eval_mode_steps_aside():
    model = convnet(lambda c: BatchNormAct2d(c, nn.Identity)).double().eval()
    model[1].running_mean = model[1].running_var = None  # track_running_stats=False: batch statistics in eval
    x, y = images(), torch.tensor([0, 1, 2, 1, 0])
    assert explain_method(model, F.cross_entropy).method == "autograd"
    assert_steps_aside(model, x, y, "F.batch_norm with batch statistics")


def test_the_functional_module_takes_what_f_batch_norm_takes():
    from torch_secorder.backprop.rules.batch_norm import FunctionalBatchNorm

    norm = FunctionalBatchNorm(3).eval()
    for shape in [(2, 3), (2, 3, 4), (2, 3, 4, 5), (2, 3, 2, 2, 2)]:
        x = torch.randn(shape)
        assert torch.equal(norm(x), F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias))
    with pytest.raises(ValueError, match="at least 2D"):
        norm(torch.randn(3))


class Standardise(nn.Module):
    """F.batch_norm on buffers only (no affine parameters), as a fixed input normalisation."""

    def __init__(self, channels):
        super().__init__()
        self.register_buffer("mean", torch.randn(channels, dtype=D))
        self.register_buffer("var", torch.rand(channels, dtype=D) + 0.5)

    def forward(self, x):
        return F.batch_norm(x, self.mean, self.var, training=False, eps=1e-3)


def test_batch_norm_on_buffers_only():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), Standardise(3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3))
    exact(model, images())
