"""GGN, Fisher and per-sample diagonals and the Hutchinson estimator, against float64 brute force (torch.func
Jacobians of the model output and the loss's Hessian in it) and, for the random ones, statistically."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import Y5, D, expected_fallback, randomise_batch_norm, relative_error, vectors
from models import (
    GLU,
    Attention,
    BagOfWords,
    ClassMLP,
    DenseBlock,
    FunctionalCNN,
    FusedGLU,
    PreNormMLP,
    ResidualMLP,
    TokenMLP,
    exact_zoo,
)
from torchvision_style import BasicBlock, ResNet

from torch_secorder import (
    explain_method,
    hessian_diagonal,
    hessian_diagonal_estimate,
    model_fisher_diagonal,
    model_ggn_diagonal,
    model_hessian_diagonal,
    model_hessian_diagonal_estimate,
)
from torch_secorder.testing import dense_ggn_diagonal, dense_per_sample_hessian_diagonal

IDS = torch.tensor([[1, 2, 2, 0], [3, 0, 0, 6], [1, 1, 1, 1], [5, 4, 3, 2], [0, 0, 0, 0]])


def graph_zoo():
    """(name, model, inputs, targets, loss_fn) for models the graph engine runs (classes, residuals, norms)."""
    cases = [
        ("class-mlp", ClassMLP, vectors(6)),
        ("residual-mlp", ResidualMLP, vectors(6)),
        ("functional-cnn", FunctionalCNN, vectors(2, 10, 10)),
        ("densenet", DenseBlock, vectors(2, 4, 4)),
        ("glu", GLU, vectors(6)),
        ("fused-glu", FusedGLU, vectors(6)),
        ("prenorm-mlp", PreNormMLP, vectors(5)),
        ("attention", Attention, vectors(4, 3)),
        ("bag-of-words", BagOfWords, IDS),
        ("token-mlp", TokenMLP, IDS % 7),
        ("resnet", lambda: ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3, width=2, in_channels=1), vectors(1, 8, 8)),
    ]
    result = []
    for name, build, x in cases:
        torch.manual_seed(0)
        model = build().double().eval()
        randomise_batch_norm(model, torch.Generator().manual_seed(2))
        result.append((name, model, x, Y5, F.cross_entropy))
    return result


def supported(case):
    return not isinstance(case[4], nn.SmoothL1Loss)  # the GGN needs a known loss curvature


ZOO = [case for case in exact_zoo() if supported(case)] + graph_zoo()


def engine(function, model, loss_fn, *args, **kwargs):
    """function(..., method='backprop') with warnings as errors (no silent fallback) where the engine supports
    the model (all but the training-mode BatchNorm of the zoo), else the generic method."""
    if explain_method(model, loss_fn).method != "backprop":
        return function(model, loss_fn, *args, method="autograd", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return function(model, loss_fn, *args, method="backprop", **kwargs)


def test_the_zoo_runs_through_the_engine():
    generic = [name for name, model, _, _, loss_fn in ZOO if explain_method(model, loss_fn).method != "backprop"]
    assert generic == ["conv-bn-pool"]  # BatchNorm in training mode


# ---------------------------------------------------------------- exact: GGN and per-sample diagonals
@pytest.mark.parametrize("case", ZOO, ids=lambda case: case[0])
def test_ggn_diagonal_against_the_jacobians(case):
    name, model, x, y, loss_fn = case
    expected = dense_ggn_diagonal(model, loss_fn, x, y)
    actual = engine(model_ggn_diagonal, model, loss_fn, x, y)
    for a, p in zip(actual, model.parameters()):
        assert a.shape == p.shape and a.dtype == p.dtype
    assert relative_error(actual, expected) < 1e-10
    assert relative_error(model_ggn_diagonal(model, loss_fn, x, y, method="autograd"), expected) < 1e-10
    assert all(bool((a >= -1e-12 * max(1.0, float(a.abs().max()))).all()) for a in actual)  # PSD: no negatives


# the ResNet's dense per-sample references take half a minute: in the full suite, not in make test-fast
PER_SAMPLE_ZOO = [
    pytest.param(case, id=case[0], marks=[pytest.mark.slow] if case[0] == "resnet" else []) for case in ZOO
]


@pytest.mark.parametrize("case", PER_SAMPLE_ZOO)
def test_per_sample_ggn_and_hessian_diagonals(case):
    name, model, x, y, loss_fn = case
    samples = x.shape[0]
    expected_ggn = dense_ggn_diagonal(model, loss_fn, x, y, per_sample=True)
    expected_hessian = dense_per_sample_hessian_diagonal(model, loss_fn, x, y)
    for method_call in (engine, lambda f, *a, **k: f(*a, method="autograd", **k)):
        ggn = method_call(model_ggn_diagonal, model, loss_fn, x, y, per_sample=True)
        hessian = method_call(model_hessian_diagonal, model, loss_fn, x, y, per_sample=True)
        for g, h, p in zip(ggn, hessian, model.parameters()):
            assert g.shape == h.shape == (samples, *p.shape)
        assert relative_error(ggn, expected_ggn) < 1e-10
        assert relative_error(hessian, expected_hessian) < 1e-10
    with expected_fallback(model, loss_fn):
        summed = model_hessian_diagonal(model, loss_fn, x, y)
    assert relative_error([h.sum(0) for h in hessian], summed) < 1e-10


def per_sample_gradient_squares(model, loss_fn, x, y, normaliser):
    """The empirical Fisher by definition: normaliser * sum_n (gradient of sample n's term of the loss)^2."""
    params = list(model.parameters())
    output = model(x).detach()
    total = [torch.zeros_like(p) for p in params]
    for n in range(x.shape[0]):
        mask = torch.zeros(x.shape[0], *[1] * (output.dim() - 1), dtype=output.dtype)
        mask[n] = 1
        live = model(x)
        grads = torch.autograd.grad(loss_fn(output + (live - output) * mask, y), params, allow_unused=True)
        for t, g in zip(total, grads):
            if g is not None:
                t += normaliser * g * g
    return total


@pytest.mark.parametrize("case", ZOO, ids=lambda case: case[0])
def test_empirical_fisher_is_the_scaled_sum_of_squared_per_sample_gradients(case):
    name, model, x, y, loss_fn = case
    reduction = getattr(loss_fn, "reduction", "mean")
    output = model(x)
    if reduction == "sum":
        normaliser = 1
    elif isinstance(loss_fn, (nn.MSELoss, nn.BCEWithLogitsLoss)) or loss_fn is F.mse_loss:
        normaliser = output.numel()
    else:
        normaliser = x.shape[0]
    expected = per_sample_gradient_squares(model, loss_fn, x, y, normaliser)
    actual = engine(model_fisher_diagonal, model, loss_fn, x, y, "empirical")
    assert relative_error(actual, expected) < 1e-10
    per_sample = engine(model_fisher_diagonal, model, loss_fn, x, y, "empirical", per_sample=True)
    assert relative_error([t.sum(0) for t in per_sample], expected) < 1e-10
    assert relative_error(model_fisher_diagonal(model, loss_fn, x, y, "empirical", method="autograd"), expected) < 1e-10


def test_frozen_parameters_get_zeros_in_every_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,))
    for method in ("backprop", "autograd"):
        for result in (
            model_ggn_diagonal(model, F.cross_entropy, x, y, method=method, per_sample=True),
            model_hessian_diagonal(model, F.cross_entropy, x, y, method=method, per_sample=True),
        ):
            assert result[0].shape == (6, 5, 4) and torch.equal(result[0], torch.zeros(6, 5, 4, dtype=D))
            assert float(result[1].abs().sum()) > 0


def test_nll_after_log_softmax_has_the_ggn_of_cross_entropy_on_the_logits():
    torch.manual_seed(0)
    logits = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with_log_softmax = nn.Sequential(logits, nn.LogSoftmax(dim=1))
    x, y = torch.randn(6, 5, dtype=D), torch.randint(0, 3, (6,))
    expected = model_ggn_diagonal(logits, F.cross_entropy, x, y)
    assert relative_error(engine(model_ggn_diagonal, with_log_softmax, nn.NLLLoss(), x, y), expected) < 1e-12
    assert relative_error(model_ggn_diagonal(with_log_softmax, nn.NLLLoss(), x, y, method="autograd"), expected) < 1e-12


def test_the_ggn_differs_from_the_hessian_only_by_the_second_derivatives_of_the_model():
    """A linear model has no second derivatives: GGN = Hessian; with tanh it differs (and stays >= 0)."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 5, dtype=D), torch.randint(0, 3, (8,))
    linear = nn.Sequential(nn.Linear(5, 3)).double()
    assert (
        relative_error(
            model_ggn_diagonal(linear, F.cross_entropy, x, y), model_hessian_diagonal(linear, F.cross_entropy, x, y)
        )
        < 1e-12
    )
    curved = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    assert (
        relative_error(
            model_ggn_diagonal(curved, F.cross_entropy, x, y), model_hessian_diagonal(curved, F.cross_entropy, x, y)
        )
        > 1e-3
    )


def test_a_model_the_engine_refuses_falls_back_once_for_the_ggn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model.register_forward_hook(lambda module, inputs, output: None)  # on the container: refused
    x, y = torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = model_ggn_diagonal(model, F.cross_entropy, x, y, per_sample=True)
    assert len([w for w in caught if "torch_secorder" in str(w.message)]) == 1
    assert relative_error(actual, dense_ggn_diagonal(model, F.cross_entropy, x, y, per_sample=True)) < 1e-10
    with pytest.raises(NotImplementedError, match="hook"):
        model_ggn_diagonal(model, F.cross_entropy, x, y, method="backprop")


# ---------------------------------------------------------------- statistics: MC Fisher and Hutchinson
def z_scores(draws, expected):
    """(mean - expected) / standard error of the mean, per entry, over the leading axis of draws."""
    mean = draws.mean(0)
    error = draws.std(0) / draws.shape[0] ** 0.5
    keep = error > 1e-12 * max(1.0, float(expected.abs().max()))
    return ((mean - expected) / error)[keep]


@pytest.mark.parametrize(
    "loss_fn, targets",
    [
        (nn.CrossEntropyLoss(), lambda g: torch.randint(0, 3, (8,), generator=g)),
        (
            nn.CrossEntropyLoss(reduction="sum", weight=torch.tensor([1.0, 2.0, 0.5], dtype=D)),
            lambda g: torch.randint(0, 3, (8,), generator=g),
        ),
        (nn.MSELoss(), lambda g: torch.randn(8, 3, generator=g, dtype=D)),
        (
            nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 1.0, 0.5], dtype=D)),
            lambda g: torch.rand(8, 3, generator=g, dtype=D).round(),
        ),
    ],
    ids=["ce", "ce-weighted-sum", "mse", "bce-pos-weight"],
)
def test_monte_carlo_fisher_is_an_unbiased_estimate_of_the_ggn(loss_fn, targets):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 4, generator=generator, dtype=D), targets(generator)
    expected = torch.cat([g.reshape(-1) for g in model_ggn_diagonal(model, loss_fn, x, y)])
    for method in ("backprop", "autograd"):
        draws = torch.stack(
            [
                torch.cat(
                    [
                        f.reshape(-1)
                        for f in model_fisher_diagonal(
                            model, loss_fn, x, y, mc_samples=2, generator=generator, method=method
                        )
                    ]
                )
                for _ in range(300)
            ]
        )
        z = z_scores(draws, expected)
        assert z.numel() > 40
        assert float(z.abs().max()) < 5.0, float(z.abs().max())  # 5 standard errors: p < 1e-4 for 58 entries
        # about 95% within two, loosely: the entries share their draws, so they are correlated
        assert 0.75 < float((z.abs() < 2).double().mean())
        # the check has power: the same draws against a GGN 25% off fail it
        assert float(z_scores(draws, expected * 1.25).abs().max()) > 5.0


def test_monte_carlo_fisher_is_reproducible_with_a_generator_and_averages_its_draws():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))
    first = model_fisher_diagonal(model, F.cross_entropy, x, y, generator=torch.Generator().manual_seed(3))
    second = model_fisher_diagonal(model, F.cross_entropy, x, y, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    many = model_fisher_diagonal(
        model, F.cross_entropy, x, y, mc_samples=20000, generator=torch.Generator().manual_seed(4)
    )
    assert relative_error(many, model_ggn_diagonal(model, F.cross_entropy, x, y)) < 0.05


def test_hutchinson_is_unbiased_and_its_standard_error_matches_the_spread():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))
    exact = torch.cat([h.reshape(-1) for h in model_hessian_diagonal(model, F.cross_entropy, x, y)])
    generator = torch.Generator().manual_seed(0)
    runs = [model_hessian_diagonal_estimate(model, F.cross_entropy, x, y, 20, generator=generator) for _ in range(200)]
    estimates = torch.stack([torch.cat([d.reshape(-1) for d in run.diagonal]) for run in runs])
    reported = torch.stack([torch.cat([e.reshape(-1) for e in run.standard_error]) for run in runs])
    z = z_scores(estimates, exact)
    assert float(z.abs().max()) < 5.0 and 0.75 < float((z.abs() < 2).double().mean())
    # the reported standard error of one run is the spread of the runs (ratio of RMS values, per entry)
    observed = estimates.std(0)
    varying = observed > 1e-12
    ratio = reported.pow(2).mean(0).sqrt()[varying] / observed[varying]
    assert 0.85 < float(ratio.median()) < 1.15 and float(ratio.min()) > 0.6, ratio
    assert all(run.probes == 20 for run in runs)


def test_hutchinson_stops_at_the_target_relative_error_and_warns_at_the_cap():
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=D)
    matrix = a @ a.T + 6 * torch.eye(6, dtype=D)  # diagonally dominant: few probes suffice
    x = torch.randn(6, dtype=D, requires_grad=True)
    estimate = hessian_diagonal_estimate(
        lambda: 0.5 * x @ matrix @ x,
        [x],
        target_rel_error=0.05,
        generator=torch.Generator().manual_seed(0),
        chunk_size=4,
    )
    assert estimate.relative_error <= 0.05 and estimate.probes < 10000
    diagonal, error = estimate  # unpacks as a pair
    assert float(((diagonal[0] - matrix.diagonal()).abs() / error[0].clamp_min(1e-12)).max()) < 5
    with pytest.warns(RuntimeWarning, match="not target_rel_error"):
        hessian_diagonal_estimate(lambda: 0.5 * x @ matrix @ x, [x], 8, target_rel_error=1e-6)


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_zero_for_linear_parameters():
    x = torch.tensor([1.0, 2.0, 3.0], dtype=D, requires_grad=True)
    b = torch.tensor([1.0, -1.0], dtype=D, requires_grad=True)
    estimate = hessian_diagonal_estimate(lambda: (x**3).sum() + b.sum() * 2, [x, b], 4)
    assert torch.allclose(estimate.diagonal[0], 6 * x.detach()) and torch.equal(
        estimate.standard_error[0], torch.zeros(3, dtype=D)
    )
    assert torch.equal(estimate.diagonal[1], torch.zeros(2, dtype=D))
    assert torch.allclose(estimate.diagonal[0], hessian_diagonal(lambda: (x**3).sum(), [x])[0])


# ---------------------------------------------------------------- bad input
def test_bad_arguments_get_clear_errors():
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 4, dtype=D), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="loss_fn is not supported.*SmoothL1Loss"):
        model_ggn_diagonal(model, nn.SmoothL1Loss(), x, torch.randn(5, 3, dtype=D))
    with pytest.raises(ValueError, match="kind must be one of"):
        model_fisher_diagonal(model, F.cross_entropy, x, y, "true")
    with pytest.raises(ValueError, match="mc_samples must be a positive int"):
        model_fisher_diagonal(model, F.cross_entropy, x, y, mc_samples=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        model_fisher_diagonal(model, F.cross_entropy, x, y, generator=3)
    with pytest.raises(TypeError, match="per_sample must be True or False"):
        model_hessian_diagonal(model, F.cross_entropy, x, y, per_sample="yes")
    with pytest.raises(ValueError, match="n_probes must be an int >= 2"):
        model_hessian_diagonal_estimate(model, F.cross_entropy, x, y, 1)
    with pytest.raises(ValueError, match="target_rel_error must be a positive number"):
        model_hessian_diagonal_estimate(model, F.cross_entropy, x, y, target_rel_error=-1)
    with pytest.raises(ValueError, match="negative class weights"):
        model_fisher_diagonal(model, nn.CrossEntropyLoss(weight=torch.tensor([1.0, -1.0, 1.0], dtype=D)), x, y)
    log_probs_missing = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).double()
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="not log-probabilities"):
        model_ggn_diagonal(log_probs_missing, nn.NLLLoss(), x, y)


@pytest.mark.parametrize("groups", [1, 2])
def test_per_sample_diagonals_below_max_pooling(groups):
    """Factors kept on the pooled grid: per sample, conv1 gathers its selected inputs (Q K = 288 < V P = 576)
    and conv2 scatters its columns back (Q K = 216 > V P = 144); with groups they are always scattered."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 4, 3, padding=1, groups=groups),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).double()
    x, y = torch.randn(5, 2, 8, 8, dtype=D), torch.randint(0, 10, (5,))
    expected = dense_per_sample_hessian_diagonal(model, F.cross_entropy, x, y)
    assert (
        relative_error(engine(model_hessian_diagonal, model, F.cross_entropy, x, y, per_sample=True), expected) < 1e-10
    )
    assert (
        relative_error(
            engine(model_ggn_diagonal, model, F.cross_entropy, x, y, per_sample=True),
            dense_ggn_diagonal(model, F.cross_entropy, x, y, per_sample=True),
        )
        < 1e-10
    )


@pytest.mark.parametrize(
    "loss_fn, targets",
    [
        (F.cross_entropy, torch.randint(0, 3, (0,))),
        (F.mse_loss, torch.randn(0, 3, dtype=D)),
        (nn.BCEWithLogitsLoss(), torch.rand(0, 3, dtype=D)),
    ],
    ids=["ce", "mse", "bce"],
)
def test_an_empty_batch_gives_zeros_in_every_form(loss_fn, targets):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(0, 4, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("backprop", "autograd"):
            for per_sample in (False, True):
                results = [model_ggn_diagonal(model, loss_fn, x, targets, method=method, per_sample=per_sample)]
                results += [
                    model_fisher_diagonal(model, loss_fn, x, targets, kind, method=method, per_sample=per_sample)
                    for kind in ("mc", "empirical")
                ]
                for result in results:
                    for diagonal, param in zip(result, model.parameters()):
                        shape = (0, *param.shape) if per_sample else param.shape
                        assert diagonal.shape == shape and float(diagonal.abs().sum()) == 0


class GroupedConvolutions(nn.Module):
    """RegNet / ShuffleNet-style grouped and depthwise convolutions after curved activations (factor columns and a
    diagonal term arrive at their outputs), with a skip connection (the graph engine)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.head = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        h = h + self.depthwise(torch.sigmoid(self.grouped(h)))
        return self.head(F.softplus(h).flatten(1))


def grouped_chain():  # the chain engine: a curved activation's diagonal term arrives with the factors
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(6, 6, 3, padding=1, groups=3),
        nn.Sigmoid(),
        nn.Conv2d(6, 6, 3, padding=1, groups=6),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3),
    )


@pytest.mark.parametrize("make", [GroupedConvolutions, grouped_chain], ids=["graph", "chain"])
def test_grouped_convolutions_take_every_group_at_once(make):
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(5, 2, 4, 4, dtype=D), torch.randint(0, 3, (5,))
    assert explain_method(model, F.cross_entropy).method == "backprop"
    for per_sample in (False, True):
        expected = dense_per_sample_hessian_diagonal(model, F.cross_entropy, x, y)
        if not per_sample:
            expected = [d.sum(0) for d in expected]
        actual = engine(model_hessian_diagonal, model, F.cross_entropy, x, y, per_sample=per_sample)
        assert relative_error(actual, expected) < 1e-10
        ggn = engine(model_ggn_diagonal, model, F.cross_entropy, x, y, per_sample=per_sample)
        assert relative_error(ggn, dense_ggn_diagonal(model, F.cross_entropy, x, y, per_sample=per_sample)) < 1e-10
