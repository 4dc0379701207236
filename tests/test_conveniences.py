"""What laplace-torch and training loops need from the API: the loss, a flat vector, dict inputs, one warning."""

import collections
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import relative_error

from torch_secorder import model_fisher_diagonal, model_ggn_diagonal, model_hessian_diagonal

D = torch.float64


def small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return model, torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,))


def hooked(model):
    """A model the engine refuses: a forward hook on the container (the engine runs it without calling it)."""
    model.register_forward_hook(lambda module, inputs, output: None)
    return model


@pytest.mark.parametrize("method", ["backprop", "autograd"])
@pytest.mark.parametrize(
    "function",
    [model_hessian_diagonal, model_ggn_diagonal, lambda *a, **k: model_fisher_diagonal(*a, kind="empirical", **k)],
    ids=["hessian", "ggn", "empirical-fisher"],
)
def test_return_loss_and_flat(function, method):
    model, x, y = small()
    model[0].bias.requires_grad_(False)
    loss, flat = function(model, F.cross_entropy, x, y, method=method, return_loss=True, flat=True)
    assert torch.allclose(loss, F.cross_entropy(model(x), y), rtol=1e-14) and not loss.requires_grad
    diagonals = function(model, F.cross_entropy, x, y, method=method)
    trainable = [d for d, p in zip(diagonals, model.parameters()) if p.requires_grad]
    assert flat.shape == (sum(d.numel() for d in trainable),)
    assert torch.equal(flat, torch.cat([d.reshape(-1) for d in trainable]))
    per_sample = function(model, F.cross_entropy, x, y, method=method, per_sample=True, flat=True)
    assert per_sample.shape == (6, flat.numel()) and relative_error(per_sample.sum(0), flat) < 1e-12


class KeywordModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding, self.head = nn.Embedding(7, 3), nn.Linear(3, 3)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.embedding(input_ids))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return self.head(h.mean(1))


def test_dict_inputs_call_the_model_with_keywords():
    torch.manual_seed(0)
    model = KeywordModel().double()
    ids, mask = torch.randint(0, 7, (5, 4)), torch.tensor([[1.0, 1, 0, 0]] * 5, dtype=D)
    y = torch.randint(0, 3, (5,))
    expected = model_hessian_diagonal(lambda_model(model, mask), F.cross_entropy, ids, y, method="autograd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one named input: the engine still takes the model
        one = model_hessian_diagonal(model, F.cross_entropy, {"input_ids": ids}, y, method="backprop")
    assert relative_error(one, model_hessian_diagonal(model, F.cross_entropy, ids, y)) < 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two named inputs: the engine, one input node each
        both = model_hessian_diagonal(model, F.cross_entropy, {"input_ids": ids, "attention_mask": mask}, y)
    assert relative_error(both, expected) < 1e-12
    with pytest.raises(ValueError, match="batch size"):
        model_hessian_diagonal(model, F.cross_entropy, {"input_ids": ids[:3]}, y)


class BranchesOnTheInputType(nn.Module):
    """Takes a mapping or a tensor, as laplace-torch's and Hugging Face-style models do: a trace, which stands a
    tensor in for the input, would follow the other branch than a call with a mapping."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))

    def forward(self, batch):
        if isinstance(batch, collections.abc.Mapping):
            return self.net(batch["x"] * 2)
        return self.net(batch)


@pytest.mark.parametrize("function", [model_hessian_diagonal, model_ggn_diagonal])
def test_a_mapping_given_whole_to_the_forward_is_not_traced_as_a_tensor(function):
    torch.manual_seed(0)
    model = BranchesOnTheInputType().double()
    x, y = torch.randn(6, 3, dtype=D), torch.randint(0, 2, (6,))
    batch = collections.UserDict(x=x)
    with pytest.raises(NotImplementedError, match="a model input that is a UserDict, not a tensor"):
        function(model, F.cross_entropy, (batch,), y, method="backprop")
    with pytest.warns(RuntimeWarning, match="a model input that is a UserDict"):
        got = function(model, F.cross_entropy, (batch,), y)
    # the mapping branch doubles x: the same as the tensor branch on 2 x, which the engine computes
    assert relative_error(got, function(model, F.cross_entropy, 2 * x, y, method="backprop")) < 1e-12


def lambda_model(model, mask):
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids):
            return self.inner(ids, attention_mask=mask)

    return Masked()


def test_the_fallback_warning_comes_once_per_model_and_loss():
    model, x, y = small()
    model = hooked(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model_hessian_diagonal(model, F.cross_entropy, x, y)
        model_hessian_diagonal(model, nn.MSELoss(), x, torch.randn(6, 3, dtype=D))  # another loss: warned again
    ours = [w for w in caught if "torch_secorder" in str(w.message)]
    assert len(ours) == 2, [str(w.message) for w in ours]
    other, _, _ = small()
    with pytest.warns(RuntimeWarning, match="torch_secorder"):  # another model: warned again
        model_hessian_diagonal(hooked(other), F.cross_entropy, x, y)
