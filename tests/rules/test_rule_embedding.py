"""The embedding rule family against the float64 brute force."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import D, assert_backprop_exact, assert_steps_aside, exact
from models import BagOfWords, TokenMLP
from torch.nn.utils import prune

from torch_secorder import explain_method, model_hessian_diagonal


def test_embedding_models():
    ids = torch.tensor([[1, 2, 2, 0], [3, 0, 0, 6], [1, 1, 1, 1], [5, 4, 3, 2], [0, 0, 0, 0]])
    torch.manual_seed(0)
    diagonals = exact(BagOfWords(), ids)
    assert torch.equal(diagonals[0][0], torch.zeros(4, dtype=D))  # padding_idx
    torch.manual_seed(0)
    exact(TokenMLP(), ids % 7)


def embedding_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(6, 3, padding_idx=1), nn.Flatten(), nn.Linear(9, 3)).double()
    ids = torch.tensor([[0, 1, 2], [3, 3, 3], [5, 1, 0], [2, 4, 4], [1, 1, 1]])
    return model, ids, torch.tensor([0, 2, 1, 1, 0])


def test_embedding_every_trap():
    model, ids, y = embedding_model()
    diag = assert_backprop_exact(model, F.cross_entropy, ids, y)
    assert torch.equal(diag[0][1], torch.zeros(3, dtype=D))  # padding_idx gets no gradient, so no curvature
    assert diag[0][3].abs().min() > 0  # a token repeated in one sample: projections summed before squaring
    model[0].__class__ = type("PlainEmbedding", (nn.Embedding,), {})
    assert_backprop_exact(model, F.cross_entropy, ids, y)
    model[0].__class__ = type(
        "OwnEmbedding", (nn.Embedding,), {"forward": lambda self, i: 2 * nn.Embedding.forward(self, i)}
    )
    assert explain_method(model, F.cross_entropy).method == "backprop"  # its forward read through: F.embedding
    assert_backprop_exact(model, F.cross_entropy, ids, y)
    model, ids, y = embedding_model()
    handle = model[0].register_forward_hook(lambda m, inputs, output: output * 1.5)
    assert_steps_aside(model, ids, y, "forward hook", explained=False)  # found where the engine runs the hook
    handle.remove()
    prune.random_unstructured(model[0], "weight", amount=0.4)
    assert_backprop_exact(model, F.cross_entropy, ids, y)
    empty = model_hessian_diagonal(model, nn.CrossEntropyLoss(reduction="sum"), ids[:0], y[:0], method="backprop")
    assert all(torch.equal(d, torch.zeros_like(p)) for d, p in zip(empty, model.parameters()))


@pytest.mark.parametrize(
    "option, message", [({"max_norm": 1.0}, "max_norm"), ({"scale_grad_by_freq": True}, "scale_grad_by_freq")]
)
def test_embedding_options_without_a_derivative_rule_step_aside(option, message):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3, **option), nn.Flatten(), nn.Linear(9, 3)).double()
    ids = torch.tensor([[0, 1, 2], [3, 3, 3], [5, 1, 0]])
    assert message in explain_method(model, F.cross_entropy).reason
    steps_aside = model_hessian_diagonal(model, F.cross_entropy, ids, torch.tensor([0, 1, 2]), method="autograd")
    assert all(torch.isfinite(d).all() for d in steps_aside)
