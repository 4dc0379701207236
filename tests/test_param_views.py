"""Parameters reshaped, expanded, indexed or scaled before they meet the input (timm's ConvNeXt
`x.mul(self.gamma.reshape(1, -1, 1, 1))`, ViT's `cls_token.expand(N, -1, -1)` and position embeddings): the
node that reads such a view is affine in the parameter, so the engine takes its projections through the view,
exact; a parameter transformed any other way before use steps aside naming it."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import Y5, D, assert_steps_aside, exact, vectors


class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(3) + 0.5)
        self.fc = nn.Linear(48, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).mul(self.gamma.reshape(1, -1, 1, 1))
        return self.fc(F.gelu(h).flatten(1))


class ClassToken(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 6))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 6))
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        tokens = self.embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.pos_embed[:, : tokens.shape[1]] * 0.5
        return self.head(self.norm(torch.tanh(tokens))[:, 0])


class Lookup(nn.Module):
    """A parameter table indexed by the input's integer ids, transposed first (Swin's bias table, say)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, 7))
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.table.t()[ids]).sum(1))


def test_a_parameter_reshaped_before_a_product():
    exact(LayerScale(), torch.randn(5, 2, 4, 4, dtype=D, generator=torch.Generator().manual_seed(1)))


def test_a_class_token_expanded_over_the_batch_and_a_sliced_position_embedding():
    exact(ClassToken(), torch.randn(5, 4, 4, dtype=D, generator=torch.Generator().manual_seed(2)))


def test_a_parameter_transposed_and_indexed_by_the_input():
    ids = torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(3))
    exact(Lookup(), ids)


class Transformed(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        scale = self.scale.reshape(1, -1)
        if self.how == "exp":
            scale = scale.exp()
        elif self.how == "divisor":
            scale = 1 / scale
        elif self.how == "weight":
            return F.linear(torch.tanh(self.a(x)), self.b.weight * scale[:, :3].t())
        return self.b(torch.tanh(self.a(x) * scale))


def test_a_scaled_view_is_exact():
    torch.manual_seed(0)
    exact(Transformed("view"), vectors(6))


@pytest.mark.parametrize(
    "how, message",
    [
        ("exp", "parameter(s) ['scale'] transformed by exp"),
        ("divisor", "parameter(s) ['scale'] transformed by"),
        ("weight", "parameter(s) ['b.weight', 'scale'] transformed by mul"),
    ],
)
def test_a_parameter_transformed_otherwise_steps_aside(how, message):
    torch.manual_seed(0)
    model = Transformed(how).double().eval()
    assert_steps_aside(model, vectors(6), Y5, message)
