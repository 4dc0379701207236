"""The exact Hessian-backprop engine: every module and loss, alone and in random chains, against float64 brute force."""

import functools
import random
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_backprop_exact, brute_force, randomise_batch_norm, relative_error
from models import ACTIVATIONS

from torch_secorder import explain_method, model_hessian_diagonal

D = torch.float64


# ---------------------------------------------------------------- losses
def loss_cases(samples, outputs, generator):
    classes = torch.randint(0, outputs, (samples,), generator=generator)
    classes[0] = 1
    probabilities = torch.softmax(torch.randn(samples, outputs, generator=generator, dtype=D), 1)
    binary = torch.rand(samples, outputs, generator=generator, dtype=D).round()
    weight = torch.rand(outputs, generator=generator, dtype=D) + 0.5
    regression = torch.randn(samples, outputs, generator=generator, dtype=D)
    return {
        "mse-mean": (nn.MSELoss(), regression),
        "mse-sum": (functools.partial(F.mse_loss, reduction="sum"), regression),
        "ce-mean": (nn.CrossEntropyLoss(), classes),
        "ce-sum-options": (
            nn.CrossEntropyLoss(weight=weight, ignore_index=1, label_smoothing=0.15, reduction="sum"),
            classes,
        ),
        "ce-functional": (F.cross_entropy, classes),
        "ce-probabilities": (nn.CrossEntropyLoss(label_smoothing=0.1), probabilities),
        "bce-pos-weight": (nn.BCEWithLogitsLoss(pos_weight=weight), binary),
        "bce-weight-sum": (nn.BCEWithLogitsLoss(weight=weight, reduction="sum"), binary),
    }


@pytest.mark.parametrize(
    "name",
    [
        "mse-mean",
        "mse-sum",
        "ce-mean",
        "ce-sum-options",
        "ce-functional",
        "ce-probabilities",
        "bce-pos-weight",
        "bce-weight-sum",
    ],
)
def test_losses(name):
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(7, 4, generator=generator, dtype=D)
    loss_fn, y = loss_cases(7, 3, generator)[name]
    assert_backprop_exact(model, loss_fn, x, y)


def test_nll_after_log_softmax_and_single_output_bce():
    torch.manual_seed(2)
    x = torch.randn(6, 4, dtype=D)
    model = nn.Sequential(nn.Linear(4, 3), nn.SiLU(), nn.Linear(3, 3), nn.LogSoftmax(dim=1)).double()
    assert_backprop_exact(
        model,
        nn.NLLLoss(weight=torch.tensor([0.5, 1.0, 2.0], dtype=D), ignore_index=2),
        x,
        torch.tensor([0, 1, 2, 1, 0, 2]),
    )
    model = nn.Sequential(nn.Linear(4, 3), nn.ELU(), nn.Linear(3, 1)).double()
    assert_backprop_exact(model, F.binary_cross_entropy_with_logits, x, torch.rand(6, 1, dtype=D).round())


def random_chain(seed):
    """A random chain of supported modules on images or vectors, its inputs, targets and loss."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    samples = rng.randint(2, 5)
    layers = []
    if rng.random() < 0.5:
        channels, size = rng.randint(1, 3), rng.randint(5, 8)
        x = torch.randn(samples, channels, size, size, generator=generator, dtype=D)
        for _ in range(rng.randint(1, 2)):
            out = rng.randint(1, 4)
            groups = rng.choice([g for g in (1, 2) if channels % g == 0 and out % g == 0])
            layers.append(
                nn.Conv2d(
                    channels,
                    out,
                    rng.choice([1, 2, 3]),
                    stride=rng.choice([1, 2]),
                    padding=rng.choice([0, 1]),
                    groups=groups,
                )
            )
            channels = out
            if rng.random() < 0.4:
                layers.append(nn.BatchNorm2d(channels))
            layers.append(rng.choice(ACTIVATIONS)())
        if rng.random() < 0.5:
            layers.append(
                rng.choice([nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(2, ceil_mode=True), nn.AdaptiveAvgPool2d(2)])
            )
        layers.append(nn.Flatten())
    else:
        x = torch.randn(samples, rng.randint(2, 5), generator=generator, dtype=D)
    features = nn.Sequential(*layers).double()(x).shape[1] if layers else x.shape[1]
    for _ in range(rng.randint(0, 2)):
        width = rng.randint(2, 6)
        layers += [nn.Linear(features, width), rng.choice(ACTIVATIONS)()]
        features = width
    outputs = rng.randint(1, 4)
    layers.append(nn.Linear(features, outputs))
    model = randomise_batch_norm(nn.Sequential(*layers).double(), generator)
    losses = loss_cases(samples, outputs, generator)
    name = rng.choice(sorted(losses))
    loss_fn, y = losses[name]
    if outputs == 1 and name.startswith("ce"):
        loss_fn, y = losses["mse-mean"]
    return model, x, y, loss_fn


@pytest.mark.parametrize("seed", range(40))
def test_random_chains(seed):
    model, x, y, loss_fn = random_chain(seed)
    assert_backprop_exact(model, loss_fn, x, y)


@pytest.mark.parametrize("seed", [3, 11, 17])
def test_streaming_columns_under_a_tiny_budget(seed):
    model, x, y, loss_fn = random_chain(seed)
    assert_backprop_exact(model, loss_fn, x, y, memory_budget=1)


def test_deep_smooth_network_with_tiny_budget_and_dense_switch():
    torch.manual_seed(9)
    layers = [nn.Linear(4, 6), nn.Tanh()]
    for _ in range(4):
        layers += [nn.Linear(6, 6), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(6, 3)).double()
    x, y = torch.randn(5, 4, dtype=D), torch.randn(5, 3, dtype=D)
    assert_backprop_exact(model, F.mse_loss, x, y)
    assert_backprop_exact(model, F.mse_loss, x, y, memory_budget=1)


def test_float32_agrees_with_float64():
    torch.manual_seed(10)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 5), nn.GELU(), nn.Linear(5, 3)
    ).double()
    x, y = torch.randn(6, 2, 8, 8, dtype=D), torch.randint(0, 3, (6,))
    expected = model_hessian_diagonal(model, nn.CrossEntropyLoss(), x, y, method="backprop")
    actual = model_hessian_diagonal(model.float(), nn.CrossEntropyLoss(), x.float(), y, method="backprop")
    assert all(a.dtype == torch.float32 for a in actual)
    assert relative_error(actual, expected) < 1e-5


def test_equals_the_generic_method():
    model, x, y, loss_fn = random_chain(21)
    backprop = model_hessian_diagonal(model, loss_fn, x, y, method="backprop")
    generic = model_hessian_diagonal(model, loss_fn, x, y, method="autograd")
    assert relative_error(backprop, generic) < 1e-10


def test_create_graph_is_differentiable():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=D), torch.randint(0, 2, (5,))
    params = list(model.parameters())
    backprop = model_hessian_diagonal(model, nn.CrossEntropyLoss(), x, y, create_graph=True, method="backprop")
    generic = model_hessian_diagonal(model, nn.CrossEntropyLoss(), x, y, create_graph=True, method="autograd")
    assert relative_error(backprop, generic) < 1e-10
    mine = torch.autograd.grad(sum((d * d).sum() for d in backprop), params)
    theirs = torch.autograd.grad(sum((d * d).sum() for d in generic), params)
    assert relative_error(list(mine), list(theirs)) < 1e-9


# ---------------------------------------------------------------- dispatch
def test_auto_uses_backprop_when_supported():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    choice = explain_method(model, nn.MSELoss())
    assert choice.method == "backprop"
    x, y = torch.randn(4, 3, dtype=D), torch.randn(4, 2, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        auto = model_hessian_diagonal(model, nn.MSELoss(), x, y)
    engine = model_hessian_diagonal(model, nn.MSELoss(), x, y, method="backprop")
    assert all(torch.equal(a, b) for a, b in zip(auto, engine))


class Custom(nn.Module):
    def forward(self, x):
        return torch.func.vmap(torch.sin)(x)  # vmap takes tensors, not the proxies of a trace


@pytest.mark.parametrize(
    "model, loss_fn, message",
    [
        (
            nn.Sequential(nn.Linear(3, 3), nn.GroupNorm(1, 3), nn.Linear(3, 2)),
            nn.MSELoss(),
            r"module '1' \(GroupNorm\)",
        ),
        (nn.Sequential(nn.Linear(3, 3), Custom(), nn.Linear(3, 2)), nn.MSELoss(), r"torch.fx cannot trace"),
        (
            nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).train(),
            nn.MSELoss(),
            r"module '1' \(BatchNorm1d\): BatchNorm in training mode",
        ),
        (
            nn.Sequential(nn.Linear(3, 3), nn.AlphaDropout(0.3), nn.Linear(3, 2)).train(),
            nn.MSELoss(),
            r"AlphaDropout\(p=0.3\) in training mode",
        ),
        (nn.Sequential(nn.Linear(3, 2)), nn.NLLLoss(), r"NLLLoss without a plain LogSoftmax"),
    ],
)
def test_unsupported_models_fall_back_with_one_warning_or_raise(model, loss_fn, message):
    model = model.double()
    x = torch.randn(4, 3, dtype=D)
    y = torch.randn(4, 2, dtype=D) if not isinstance(loss_fn, nn.NLLLoss) else torch.tensor([0, 1, 1, 0])
    assert explain_method(model, loss_fn).method == "autograd"
    assert message.replace("\\", "")[:8] in str(explain_method(model, loss_fn)).replace("\\", "")
    torch.manual_seed(3)
    with pytest.warns(RuntimeWarning, match=message) as caught:
        auto = model_hessian_diagonal(model, loss_fn, x, y)
    assert len([w for w in caught if "torch_secorder" in str(w.message)]) == 1
    torch.manual_seed(3)  # a dropout layer draws the same mask in the brute force's forward
    assert relative_error(auto, brute_force(model, loss_fn, x, y)) < 1e-10
    with pytest.raises(NotImplementedError, match=message):
        model_hessian_diagonal(model, loss_fn, x, y, method="backprop")


def test_kernels_and_pure_torch_engine_agree():
    from torch_secorder import ops

    model, x, y, loss_fn = random_chain(5)
    with_kernels = model_hessian_diagonal(model, loss_fn, x, y, method="backprop")
    with ops.references_only():
        pure = model_hessian_diagonal(model, loss_fn, x, y, method="backprop")
    assert relative_error(with_kernels, pure) < 1e-12


@pytest.mark.parametrize("seed", [0, 4, 7, 12])
def test_cuda_matches_cpu(seed):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, x, y, loss_fn = random_chain(seed)
    on_cpu = model_hessian_diagonal(model, loss_fn, x, y, method="backprop")
    if isinstance(loss_fn, nn.Module):
        loss_fn = loss_fn.cuda()
    elif isinstance(loss_fn, functools.partial):
        loss_fn = functools.partial(
            loss_fn.func, **{k: v.cuda() if torch.is_tensor(v) else v for k, v in loss_fn.keywords.items()}
        )
    on_gpu = model_hessian_diagonal(model.cuda(), loss_fn, x.cuda(), y.cuda(), method="backprop")
    assert all(d.is_cuda for d in on_gpu)
    assert relative_error(on_gpu, on_cpu) < 1e-10


def test_bad_targets_raise_like_the_loss_itself():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    x = torch.randn(2, 3, dtype=D)
    with pytest.raises((IndexError, RuntimeError), match="out of bounds|out of range"):
        model_hessian_diagonal(model, nn.CrossEntropyLoss(), x, torch.tensor([0, 7]), method="backprop")


@pytest.mark.parametrize(
    "model, x, y, message",
    [
        (
            nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(0), nn.Linear(3 * 4 * 4, 2)),
            torch.randn(2, 6, 6, dtype=D),
            torch.randn(2, dtype=D),
            "Conv2d on an unbatched input",
        ),
        (
            nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 4)),
            torch.randn(4, dtype=D),
            torch.randn(4, dtype=D),
            "Linear on an unbatched input of shape \\(4,\\)",
        ),
        (
            nn.Sequential(nn.Linear(4, 3), nn.Flatten(0), nn.Linear(15, 5)),
            torch.randn(5, 4, dtype=D),
            torch.randn(5, dtype=D),
            "Flatten on an input of shape \\(5, 3\\) whose batch axis",
        ),
        pytest.param(
            nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)),
            torch.randn(5, 4, dtype=D),
            torch.randn(5, 1, dtype=D),
            "mse with targets of shape \\(5, 1\\) broadcast",
            marks=pytest.mark.filterwarnings("ignore:Using a target size:UserWarning"),  # F.mse_loss's own
        ),
    ],
)
def test_shapes_only_the_forward_pass_shows_fall_back(model, x, y, message):
    model = model.double()
    with pytest.warns(RuntimeWarning, match=message):
        auto = model_hessian_diagonal(model, F.mse_loss, x, y)
    with pytest.raises(NotImplementedError, match=message):
        model_hessian_diagonal(model, F.mse_loss, x, y, method="backprop")
    if "broadcast" not in message:  # brute force agrees with the generic result the fallback gave
        assert relative_error(auto, brute_force(model, F.mse_loss, x, y)) < 1e-10


def test_a_module_called_on_its_own_output_is_exact():
    """The second call's input is moved by the first: the Hessian's mixed term between the uses is formed."""
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(3, 2)).double()
    x, y = torch.randn(4, 3, dtype=D), torch.randn(4, 2, dtype=D)
    assert explain_method(model, F.mse_loss).method == "backprop"
    assert relative_error(model_hessian_diagonal(model, F.mse_loss, x, y), brute_force(model, F.mse_loss, x, y)) < 1e-10


def test_half_precision_uses_the_references(monkeypatch):
    from torch_secorder import ops, reference_ops

    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(torch.bfloat16)
    x, y = torch.randn(5, 4, dtype=torch.bfloat16), torch.randint(0, 2, (5,))
    expected = model_hessian_diagonal(model.double(), nn.CrossEntropyLoss(), x.double(), y, method="backprop")
    model = model.to(torch.bfloat16)
    used = []
    for name in ("cross_entropy_sample_scale", "factor_diagonal"):
        original = getattr(reference_ops, name)
        monkeypatch.setattr(
            reference_ops, name, lambda *a, _name=name, _original=original: used.append(_name) or _original(*a)
        )
    monkeypatch.setattr(ops, "_compiled", lambda name: pytest.fail(f"the compiled {name} ran on bfloat16"))
    diag = model_hessian_diagonal(model, nn.CrossEntropyLoss(), x, y, method="backprop")
    assert {"cross_entropy_sample_scale", "factor_diagonal"} <= set(used)
    assert all(d.dtype == torch.bfloat16 for d in diag)
    assert relative_error(diag, expected) < 5e-2


def test_explain_method_reads_the_call_as_the_call_does():
    """A one-key dict batch is run on the engine by the call: explain_method says so; with targets it also sees
    what only the loss on the output shows, and names the same reason the call's warning names."""

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.tanh(x))

    torch.manual_seed(0)
    model, x = Keyword().double(), torch.randn(5, 4, dtype=D)
    assert explain_method(model, nn.CrossEntropyLoss(), {"x": x}).method == "backprop"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_hessian_diagonal(model, nn.CrossEntropyLoss(), {"x": x}, torch.tensor([0, 1, 2, 1, 0]))
    chain = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    assert explain_method(chain, nn.MSELoss(), x, targets=torch.randn(5, 2, dtype=D)).method == "backprop"
    choice = explain_method(chain, nn.MSELoss(), x, targets=torch.randn(5, 1, dtype=D))
    assert choice.method == "autograd" and "broadcast" in choice.reason
    with pytest.warns(RuntimeWarning, match=re.escape(choice.reason)):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Using a target size", UserWarning)  # F.mse_loss's own
            model_hessian_diagonal(chain, nn.MSELoss(), x, torch.randn(5, 1, dtype=D))
