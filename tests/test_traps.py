"""Traps: models that only look supported, and inputs PyTorch handles. Every registered rule runs here
(through the registry): a new rule must give exact numbers or step aside in each of these cases.

The rule for each case: with method="auto" the engine gives the exact result (float64 brute force,
<= 1e-10) or falls back with one warning naming the module and the reason; method="backprop"
raises NotImplementedError naming it. Never NaN, zeros for a parameter that matters, or a crash.
"""

import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import D, assert_backprop_exact, assert_steps_aside, brute_force, randomise_batch_norm, relative_error
from torch.nn.utils import parametrize, prune

from torch_secorder import explain_method, hessian_diagonal, model_hessian_diagonal, ops, reference_ops
from torch_secorder.backprop import rules as registry
from torch_secorder.backprop.rules.batch_norm import FunctionalBatchNorm
from torch_secorder.backprop.rules.elementwise import ElementwiseRule
from torch_secorder.core import _batched_hvp as batched_hvp

# A module of each registered type and the per-sample shape of its input. A new rule needs a line here
# (test_every_registered_type_has_an_example fails otherwise), except activations, which get a default.
EXAMPLES = {
    nn.Linear: (lambda: nn.Linear(4, 3), (4,)),
    nn.Conv1d: (lambda: nn.Conv1d(2, 3, 2), (2, 5)),
    nn.Conv2d: (lambda: nn.Conv2d(2, 2, 2, padding=1), (2, 3, 3)),
    nn.Conv3d: (lambda: nn.Conv3d(1, 2, 2), (1, 3, 3, 3)),
    nn.BatchNorm1d: (lambda: nn.BatchNorm1d(4), (4,)),
    nn.BatchNorm2d: (lambda: nn.BatchNorm2d(2), (2, 3, 3)),
    nn.BatchNorm3d: (lambda: nn.BatchNorm3d(1), (1, 2, 2, 2)),
    FunctionalBatchNorm: (lambda: FunctionalBatchNorm(2), (2, 3)),  # the module of an F.batch_norm call
    nn.MaxPool1d: (lambda: nn.MaxPool1d(2), (2, 4)),
    nn.MaxPool2d: (lambda: nn.MaxPool2d(2), (2, 4, 4)),
    nn.MaxPool3d: (lambda: nn.MaxPool3d(2), (1, 2, 2, 2)),
    nn.AvgPool1d: (lambda: nn.AvgPool1d(2), (2, 4)),
    nn.AvgPool2d: (lambda: nn.AvgPool2d(2), (2, 4, 4)),
    nn.AvgPool3d: (lambda: nn.AvgPool3d(2), (1, 2, 2, 2)),
    nn.AdaptiveAvgPool1d: (lambda: nn.AdaptiveAvgPool1d(2), (2, 5)),
    nn.AdaptiveAvgPool2d: (lambda: nn.AdaptiveAvgPool2d(2), (2, 3, 3)),
    nn.AdaptiveAvgPool3d: (lambda: nn.AdaptiveAvgPool3d(1), (1, 2, 2, 2)),
    nn.Flatten: (lambda: nn.Flatten(), (2, 3)),
    nn.Unflatten: (lambda: nn.Unflatten(1, (2, 2)), (4,)),
    nn.Identity: (lambda: nn.Identity(), (4,)),
    nn.Dropout: (lambda: nn.Dropout(0.5), (4,)),
    nn.Dropout1d: (lambda: nn.Dropout1d(0.5), (2, 3)),
    nn.Dropout2d: (lambda: nn.Dropout2d(0.5), (2, 2, 2)),
    nn.Dropout3d: (lambda: nn.Dropout3d(0.5), (1, 2, 2, 2)),
    nn.AlphaDropout: (lambda: nn.AlphaDropout(0.5), (4,)),
    nn.LayerNorm: (lambda: nn.LayerNorm(4), (4,)),
    nn.ConvTranspose1d: (lambda: nn.ConvTranspose1d(2, 3, 2, stride=2), (2, 3)),
    nn.ConvTranspose2d: (lambda: nn.ConvTranspose2d(2, 2, 2, stride=2, padding=1, output_padding=1), (2, 3, 3)),
    nn.ConvTranspose3d: (lambda: nn.ConvTranspose3d(1, 2, 2), (1, 2, 2, 2)),
}
# Embedding reads integer ids, so it cannot sit behind the Linear of chain_around: its traps are below
EMBEDDING_TRAPS = (nn.Embedding,)
# PyTorch has no second derivative of hardsigmoid: neither the brute force nor the generic fallback these traps
# compare with can run on it (tests/rules/test_rule_elementwise.py checks it against a clamp formulation)
NO_REFERENCE = (nn.Hardsigmoid,)
TYPES = [t for t in registry.registered_types() if t not in EMBEDDING_TRAPS + NO_REFERENCE]
WEIGHTED = [t for t in TYPES if "weight" in dict(EXAMPLES.get(t, (t, None))[0]().named_parameters())]


def example(module_type):
    if module_type in EXAMPLES:
        return EXAMPLES[module_type]
    assert isinstance(registry.rule_for(module_type.__new__(module_type)), ElementwiseRule), module_type
    return (lambda: module_type(), (4,))


def test_every_registered_type_has_an_example():
    for module_type in TYPES:
        example(module_type)


def chain_around(module, shape, seed=0):
    """Linear (on the last axis) -> module -> Flatten -> Linear -> 3 classes: parameters below the module,
    so its propagation is tested, and above, so its own diagonals meet a full curvature."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    below = nn.Linear(shape[-1], shape[-1])
    x = torch.randn(5, *shape, dtype=D, generator=generator)
    module = module.double().eval()
    with torch.no_grad():
        features = module(below.double()(x)).numel() // 5
    model = nn.Sequential(below, module, nn.Flatten(), nn.Linear(features, 3)).double().eval()
    randomise_batch_norm(model, generator)
    y = torch.tensor([0, 2, 1, 1, 0])
    return model, x, y


def built(module_type):
    make, shape = example(module_type)
    return make(), shape


# ---------------------------------------------------------------- every registered type
@pytest.mark.parametrize("module_type", TYPES, ids=lambda t: t.__name__)
def test_plain_and_unchanged_subclass_are_exact(module_type):
    module, shape = built(module_type)
    model, x, y = chain_around(module, shape)
    assert_backprop_exact(model, F.cross_entropy, x, y)
    # a subclass that changes nothing (a custom __init__ or repr) is the same computation
    model[1].__class__ = type("Plain" + module_type.__name__, (module_type,), {"extra_repr": lambda self: "plain"})
    assert_backprop_exact(model, F.cross_entropy, x, y)


# what a subclass's own forward meets when it is read op by op, where that is not an exact rule
OWN_FORWARD_STEPS_ASIDE = {
    nn.ConvTranspose1d: "used by conv_transpose1d (conv_transpose1d), which has no exact rule",
    nn.ConvTranspose2d: "used by conv_transpose2d (conv_transpose2d), which has no exact rule",
    nn.ConvTranspose3d: "used by conv_transpose3d (conv_transpose3d), which has no exact rule",
}


@pytest.mark.parametrize("module_type", TYPES, ids=lambda t: t.__name__)
def test_subclass_with_its_own_forward_is_read_through(module_type):
    """timm's LayerNorm and BatchNormAct2d are subclasses whose forward calls F.layer_norm / F.batch_norm: the
    trace reads such a forward op by op (here it calls the base forward and rescales), exact or stepping aside
    naming what it met, never the base class's rule applied to a forward that computes something else."""
    module, shape = built(module_type)
    model, x, y = chain_around(module, shape)
    model[1].__class__ = type(
        "Own" + module_type.__name__,
        (module_type,),
        {"forward": lambda self, inp: 1.5 * module_type.forward(self, inp) + 0.25},
    )
    if module_type in OWN_FORWARD_STEPS_ASIDE:
        assert_steps_aside(model, x, y, OWN_FORWARD_STEPS_ASIDE[module_type])
    else:
        # _BatchNorm.forward branches on input.dim(): traced with the call's values
        assert explain_method(model, F.cross_entropy, x, targets=y).method == "backprop"
        assert_backprop_exact(model, F.cross_entropy, x, y)


@pytest.mark.parametrize("module_type", TYPES, ids=lambda t: t.__name__)
def test_forward_replaced_on_the_instance_steps_aside(module_type):
    module, shape = built(module_type)
    model, x, y = chain_around(module, shape)
    original = model[1].forward
    model[1].forward = types.MethodType(lambda self, inp: torch.tanh(original(inp)), model[1])
    assert_steps_aside(model, x, y, "forward replaced on the instance")


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward", "container", "global"])
@pytest.mark.parametrize("module_type", TYPES, ids=lambda t: t.__name__)
def test_hooks_step_aside(module_type, kind):
    module, shape = built(module_type)
    model, x, y = chain_around(module, shape)
    handle, explained = None, True
    if kind == "forward":  # found where the engine runs the module's hooks around its rule: in the call
        model[1].register_forward_hook(lambda m, inputs, output: output * 1.5)
        message, explained = "forward hook (test_hooks_step_aside.<locals>.<lambda>) that changes the output", False
    elif kind == "forward_pre":
        model[1].register_forward_pre_hook(lambda m, inputs: (torch.sin(inputs[0]),))
        message, explained = "forward pre-hook (test_hooks_step_aside.<locals>.<lambda>) that changes the input", False
    elif kind == "full_backward":
        # a backward hook changes gradients, not the loss: the engine runs and the hook stays out of it
        expected = brute_force(model, F.cross_entropy, x, y)  # (torch.func cannot run backward hooks)
        model[1].register_full_backward_hook(
            lambda m, grad_input, grad_output: tuple(None if g is None else 3 * g for g in grad_input)
        )
        assert explain_method(model, F.cross_entropy).method == "backprop"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            actual = model_hessian_diagonal(model, F.cross_entropy, x, y, method="backprop")
        assert relative_error(actual, expected) < 1e-10
        return
    elif kind == "container":
        model.register_forward_hook(lambda m, inputs, output: output + output**2)
        message = "forward hook"
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, inputs, output: None)
        message = "a global module forward hook"
    try:
        assert_steps_aside(model, x, y, message, explained=explained)
    finally:
        if handle is not None:
            handle.remove()


@pytest.mark.parametrize("kind", ["in place", "kwargs pre-hook"])
def test_hooks_writing_in_place_or_with_kwargs_step_aside(kind):
    module, shape = built(nn.Linear)
    model, x, y = chain_around(module, shape)
    if kind == "in place":
        model[1].register_forward_hook(lambda m, inputs, output: output.mul_(2))
        message = "that changes the output"
    else:
        model[1].register_forward_pre_hook(lambda m, args, kwargs: ((2 * args[0],), kwargs), with_kwargs=True)
        message = "that changes the input"
    assert_steps_aside(model, x, y, message, explained=False)


class Observed(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        hidden = torch.tanh(self.first(x))
        return self.second(hidden + hidden.pow(2))


@pytest.mark.parametrize("shape", ["chain", "graph"])
def test_hooks_that_watch_run_in_the_engine_forward(shape):
    """Hooks recording activations (as feature extractors and K-FAC do) run once per engine forward, see the
    values the model's own forward gives them, and leave the engine exact."""
    torch.manual_seed(0)
    model = (nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)) if shape == "chain" else Observed()).double()
    x, y = torch.randn(6, 4, dtype=D), torch.tensor([0, 1, 2, 0, 1, 2])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    seen = []
    for index, linear in enumerate(linears):
        linear.register_forward_pre_hook(lambda m, inputs, index=index: seen.append(("in", index, inputs[0].detach())))
        linear.register_forward_hook(lambda m, inputs, out, index=index: seen.append(("out", index, out.detach())))
    model_hessian_diagonal(model, F.cross_entropy, x, y)  # the first call checks its plan against the model
    seen.clear()
    assert explain_method(model, F.cross_entropy).method == "backprop"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        actual = model_hessian_diagonal(model, F.cross_entropy, x, y, method="backprop")
    engine_seen, seen[:] = list(seen), []
    with torch.no_grad():
        model(x)
    assert [(kind, index) for kind, index, _ in engine_seen] == [(kind, index) for kind, index, _ in seen]
    assert all(torch.allclose(a, b, rtol=1e-14, atol=0) for (_, _, a), (_, _, b) in zip(engine_seen, seen))
    assert relative_error(actual, brute_force(model, F.cross_entropy, x, y)) < 1e-10


@pytest.mark.parametrize("module_type", TYPES, ids=lambda t: t.__name__)
def test_an_empty_batch_passes_every_rule(module_type):
    module, shape = built(module_type)
    model, x, y = chain_around(module, shape)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        diag = model_hessian_diagonal(model, loss_fn, x[:0], y[:0], method="backprop")
    assert all(torch.equal(d, torch.zeros_like(p)) for d, p in zip(diag, model.parameters()))


class Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight + weight**2


@pytest.mark.parametrize("module_type", WEIGHTED, ids=lambda t: t.__name__)
def test_parametrizations_step_aside(module_type):
    module, shape = built(module_type)
    model, x, y = chain_around(module, shape)
    parametrize.register_parametrization(model[1], "weight", Doubled())
    assert_steps_aside(model, x, y, "parametrization")


@pytest.mark.parametrize("module_type", WEIGHTED, ids=lambda t: t.__name__)
def test_pruning_is_exact(module_type):
    """weight = weight_orig * mask: the diagonal of weight_orig is mask^2 times that of the weight."""
    module, shape = built(module_type)
    model, x, y = chain_around(module, shape)
    torch.manual_seed(1)
    prune.random_unstructured(model[1], "weight", amount=0.4)
    prune.l1_unstructured(model[1], "bias", amount=1)
    prune.random_unstructured(model[3], "weight", amount=0.3)  # twice pruned: a PruningContainer
    prune.random_unstructured(model[3], "weight", amount=0.3)
    diag = assert_backprop_exact(model, F.cross_entropy, x, y)
    names = [name for name, _ in model.named_parameters()]
    assert "1.weight_orig" in names and diag[names.index("1.weight_orig")].abs().max() > 0
    masked = diag[names.index("1.weight_orig")][model[1].weight_mask == 0]
    assert torch.equal(masked, torch.zeros_like(masked))


def test_global_pruning_across_modules_is_exact():
    model, x, y = chain_around(nn.Linear(4, 3), (4,))
    prune.global_unstructured(
        [(model[0], "weight"), (model[1], "weight"), (model[3], "weight")],
        pruning_method=prune.L1Unstructured,
        amount=0.5,
    )
    assert_backprop_exact(model, F.cross_entropy, x, y)
    prune.remove(model[1], "weight")  # back to a plain parameter holding the pruned values
    assert_backprop_exact(model, F.cross_entropy, x, y)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: torch.nn.utils.parametrizations.weight_norm(m),
        lambda m: torch.nn.utils.parametrizations.spectral_norm(m),
        lambda m: torch.nn.utils.weight_norm(m),
        lambda m: torch.nn.utils.spectral_norm(m),
    ],
    ids=["weight_norm", "spectral_norm", "old_weight_norm", "old_spectral_norm"],
)
def test_weight_and_spectral_norm_step_aside(make):
    model, x, y = chain_around(nn.Linear(4, 3), (4,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old-style functions are deprecated
        make(model[1])
    model.eval()
    assert_steps_aside(model, x, y, "module '1'")


def test_conv_subclass_that_overrides_the_conv_forward_helper():
    class Reflected(nn.Conv2d):
        def _conv_forward(self, inp, weight, bias):
            return F.conv2d(F.pad(inp, (1, 1, 1, 1), mode="reflect"), weight, bias)

    model, x, y = chain_around(Reflected(2, 2, 2), (2, 3, 3))
    assert explain_method(model, F.cross_entropy).method == "backprop"  # read through: F.pad, then F.conv2d
    assert_backprop_exact(model, F.cross_entropy, x, y)


def test_weight_that_is_not_a_registered_parameter():
    model, x, y = chain_around(nn.Linear(4, 3), (4,))
    source = nn.Parameter(torch.randn(3, 4, dtype=D))
    del model[1].weight
    model.register_parameter("source", source)
    model[1].weight = source * 2  # computed once: the engine could not know where it comes from
    choice = explain_method(model, F.cross_entropy)
    assert choice.method == "autograd" and "weight is a plain tensor attribute" in choice.reason


# ---------------------------------------------------------------- containers and losses
class SkipSequential(nn.Sequential):
    def forward(self, x):
        return super().forward(x) + x


def test_sequential_subclass_with_its_own_forward_is_traced_not_taken_as_a_chain():
    """Its forward adds a skip connection: read as a chain it would be wrong; traced it is exact."""
    torch.manual_seed(3)
    model = nn.Sequential(SkipSequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 4, dtype=D), torch.tensor([0, 1, 2, 0, 1, 2])
    assert explain_method(model, F.cross_entropy).method == "backprop"
    assert_backprop_exact(model, F.cross_entropy, x, y)
    top = SkipSequential(nn.Linear(3, 3), nn.Sigmoid()).double()
    assert_backprop_exact(top, F.cross_entropy, torch.randn(6, 3, dtype=D), y)


def test_sequential_subclass_without_a_forward_is_a_chain():
    class Named(nn.Sequential):
        pass

    torch.manual_seed(3)
    model = Named(nn.Linear(4, 4), nn.Tanh(), Named(nn.Linear(4, 3))).double()
    assert_backprop_exact(model, F.cross_entropy, torch.randn(6, 4, dtype=D), torch.tensor([0, 1, 2, 0, 1, 2]))


def test_log_softmax_subclasses_and_hooked_loss():
    class Tempered(nn.LogSoftmax):
        def forward(self, x):
            return super().forward(x / 2)

    class Scaled(nn.LogSoftmax):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(4)
    x, y = torch.randn(6, 4, dtype=D), torch.tensor([0, 1, 2, 0, 1, 2])
    # traced: log_softmax(x / 2) is a plain LogSoftmax of x / 2, so NLL on it is cross-entropy, exact
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), Tempered(dim=1)).double()
    assert_backprop_exact(model, nn.NLLLoss(), x, y)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), Scaled(dim=1)).double()
    assert_steps_aside(model, x, y, "NLLLoss without a plain LogSoftmax", loss_fn=nn.NLLLoss())
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    loss = nn.CrossEntropyLoss()
    loss.register_forward_hook(lambda m, inputs, output: output**2)
    # the hook runs in the loss call the engine differentiates: the square of a mean couples the samples
    assert_steps_aside(model, x, y, "couples the samples of the batch", loss_fn=loss, explained=False)


def test_max_pool_returning_indices_steps_aside():
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.MaxPool2d(2, return_indices=True))
    assert "return_indices=True" in explain_method(model, F.mse_loss).reason


# ---------------------------------------------------------------- inputs PyTorch handles
def deep_model(seed=5, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, classes)).double()


@pytest.mark.parametrize("budget", [1 << 30, 1], ids=["columns", "rank-one"])
@pytest.mark.parametrize("shape", ["deep", "single"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_negative_class_weights_are_signed_columns(budget, shape, reduction):
    model = deep_model() if shape == "deep" else nn.Linear(3, 4).double()
    x = torch.randn(7, 3, dtype=D)
    weight = torch.tensor([1.0, -0.7, 2.0, -1.5], dtype=D)
    for y, smoothing in (
        (torch.tensor([0, 1, 2, 3, 1, 3, 0]), 0.1),
        (torch.softmax(torch.randn(7, 4, dtype=D), 1) - 0.2, 0.0),
    ):
        loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing, reduction=reduction)
        diag = assert_backprop_exact(model, loss_fn, x, y, memory_budget=budget)
        assert all(torch.isfinite(d).all() for d in diag)


def test_negative_weights_for_nll_after_log_softmax_and_for_bce():
    torch.manual_seed(6)
    x, y = torch.randn(6, 3, dtype=D), torch.tensor([0, 1, 2, 3, 1, 0])
    weight = torch.tensor([1.0, -2.0, 0.5, -1.0], dtype=D)
    model = nn.Sequential(nn.Linear(3, 5), nn.ELU(), nn.Linear(5, 4), nn.LogSoftmax(dim=1)).double()
    assert_backprop_exact(model, nn.NLLLoss(weight=weight, reduction="sum"), x, y)
    bce = nn.BCEWithLogitsLoss(weight=weight, pos_weight=torch.tensor([-0.5, 1.0, 2.0, 1.0], dtype=D))
    assert_backprop_exact(deep_model(), bce, x, torch.rand(6, 4, dtype=D).round())


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_target_ignored_gives_zeros_like_pytorch(weighted, reduction):
    model, x = deep_model(), torch.randn(5, 3, dtype=D)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=D) if weighted else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, ignore_index=3, reduction=reduction)
    y = torch.full((5,), 3)
    diag = assert_backprop_exact(model, loss_fn, x, y)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in diag)


@pytest.mark.parametrize("method", ["backprop", "autograd"])
@pytest.mark.parametrize(
    "loss_fn",
    [nn.CrossEntropyLoss(reduction="sum"), nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum"), nn.BCEWithLogitsLoss()],
    ids=repr,
)
def test_an_empty_batch_gives_zeros(method, loss_fn):
    model = deep_model()
    x = torch.randn(0, 3, dtype=D)
    y = torch.zeros(0, dtype=torch.long) if isinstance(loss_fn, nn.CrossEntropyLoss) else torch.zeros(0, 4, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        diag = model_hessian_diagonal(model, loss_fn, x, y, method=method)
    assert [d.shape for d in diag] == [p.shape for p in model.parameters()]
    assert all(torch.equal(d, torch.zeros_like(d)) for d in diag)


def test_inference_mode_computes_the_right_numbers():
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    with torch.inference_mode():
        (diag,) = hessian_diagonal(lambda: (p**3).sum(), [p])
    assert torch.equal(diag, torch.tensor([6.0, 12.0])) and not diag.is_inference()
    model = deep_model()
    x, y = torch.randn(6, 3, dtype=D), torch.tensor([0, 1, 2, 3, 0, 1])
    expected = brute_force(model, F.cross_entropy, x, y)
    for method in ("backprop", "autograd"):
        with torch.inference_mode():
            x_inf, y_inf = x.clone(), y.clone()  # data made under inference_mode too
            diag = model_hessian_diagonal(model, F.cross_entropy, x_inf, y_inf, method=method)
        assert relative_error(diag, expected) < 1e-10


def test_inference_tensors_that_autograd_cannot_use_raise_one_clear_error():
    with torch.inference_mode():
        q = torch.tensor([1.0, 2.0])
        data = torch.tensor([3.0, 4.0])
    with pytest.raises(RuntimeError, match=r"params\[0\] was created under torch.inference_mode"):
        hessian_diagonal(lambda: (q**3).sum(), [q])
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="func uses a tensor created under torch.inference_mode"):
        hessian_diagonal(lambda: (p**3 * data).sum(), [p])
    with torch.inference_mode():
        model = nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="model parameter 'weight' was created under torch.inference_mode"):
        model_hessian_diagonal(model, F.mse_loss, torch.randn(4, 3), torch.randn(4, 2))


@pytest.mark.parametrize(
    "loss_fn, target",
    [
        (F.mse_loss, lambda: torch.randn(6, 4)),
        (F.binary_cross_entropy_with_logits, lambda: torch.rand(6, 4).round()),
        (nn.CrossEntropyLoss(label_smoothing=0.1), lambda: torch.softmax(torch.randn(6, 4), 1)),
    ],
    ids=["mse", "bce", "ce-probabilities"],
)
def test_float32_targets_with_a_float64_model_give_what_pytorch_gives(loss_fn, target):
    """F.mse_loss promotes the targets; F.cross_entropy and BCE keep parts of the loss in the targets'
    precision. The engine gives the exact Hessian of the loss on promoted targets, the generic method
    that of PyTorch's computation: they agree to float32 rounding."""
    model, x = deep_model(), torch.randn(6, 3, dtype=D)
    y = target()
    as_pytorch_computes = brute_force(model, loss_fn, x, y)
    promoted = brute_force(model, loss_fn, x, y.double())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        engine = model_hessian_diagonal(model, loss_fn, x, y, method="backprop")
        generic = model_hessian_diagonal(model, loss_fn, x, y, method="autograd")
    assert relative_error(engine, promoted) < 1e-10
    assert relative_error(generic, as_pytorch_computes) < 1e-10
    assert relative_error(engine, as_pytorch_computes) < 1e-6


def test_progress_that_is_not_callable_fails_before_any_work():
    calls = []
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(TypeError, match="progress must be a callable progress\\(done, total\\) or None, got int"):
        hessian_diagonal(lambda: calls.append(1) or (p**3).sum(), [p], progress=5)
    assert calls == []
    with pytest.raises(TypeError, match="progress must be a callable"):
        model_hessian_diagonal(
            deep_model(), F.cross_entropy, torch.randn(2, 3, dtype=D), torch.tensor([0, 1]), progress="yes"
        )


# ---------------------------------------------------------------- compiled ops and their references
BACKENDS = {
    "compiled": lambda name: getattr(torch.ops.torch_secorder, name),
    "reference": lambda name: getattr(reference_ops, name),
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_indices_out_of_range_raise_like_cross_entropy(backend):
    op = BACKENDS[backend]
    logits = torch.randn(3, 4, dtype=D)
    for target in (torch.tensor([0, 4, 1]), torch.tensor([0, -1, 1])):
        for weight in (None, torch.ones(4, dtype=D)):
            with pytest.raises(RuntimeError, match=r"class index outside \[0, C\)"):
                op("cross_entropy_hessian_diag")(logits, target, weight, -100, 0.0, "mean")
            with pytest.raises(RuntimeError, match=r"class index outside \[0, C\)"):
                op("cross_entropy_sample_scale")(logits, target, weight, -100, 0.0, "sum")
    ignored = torch.tensor([0, -1, 1])  # -1 is fine when it is the ignore_index
    assert torch.isfinite(op("cross_entropy_hessian_diag")(logits, ignored, None, -1, 0.0, "mean")).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_square_root_factors_of_negative_scales_raise(backend):
    op = BACKENDS[backend]
    logits = torch.randn(3, 4, dtype=D)
    weight = torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=D)
    with pytest.raises(RuntimeError, match="negative per-sample scale"):
        op("cross_entropy_hessian_sqrt")(logits, torch.tensor([0, 1, 2]), weight, -100, 0.0, "sum")
    with pytest.raises(RuntimeError, match="negative per-sample scale"):
        op("bce_with_logits_hessian_sqrt")(logits, torch.ones(3, 4, dtype=D), weight, None, "sum")
    # the diagonals are fine, and signed: exactly the per-sample Hessian's diagonal
    diag = op("cross_entropy_hessian_diag")(logits, torch.tensor([0, 1, 2]), weight, -100, 0.0, "sum")
    p = torch.softmax(logits, 1)
    assert relative_error(diag, torch.tensor([1.0, -1.0, 1.0], dtype=D)[:, None] * p * (1 - p)) < 1e-14


ZERO_SIZE_CASES = [
    ("mse_loss_hessian_diag", lambda: (torch.zeros(0, 3, dtype=D), "mean")),
    ("mse_loss_hessian_sqrt", lambda: (torch.zeros(0, 3, dtype=D), "mean")),
    (
        "cross_entropy_hessian_diag",
        lambda: (torch.zeros(0, 3, dtype=D), torch.zeros(0, dtype=torch.long), None, -100, 0.0, "mean"),
    ),
    (
        "cross_entropy_hessian_sqrt",
        lambda: (torch.zeros(0, 3, dtype=D), torch.zeros(0, dtype=torch.long), None, -100, 0.0, "sum"),
    ),
    (
        "bce_with_logits_hessian_diag",
        lambda: (torch.zeros(0, 3, dtype=D), torch.zeros(0, 3, dtype=D), None, None, "mean"),
    ),
    (
        "bce_with_logits_hessian_sqrt",
        lambda: (torch.zeros(0, 3, dtype=D), torch.zeros(0, 3, dtype=D), None, None, "mean"),
    ),
    ("factor_diagonal", lambda: (torch.zeros(0, 2, 3, dtype=D), None)),
    ("factor_diagonal", lambda: (torch.zeros(2, 0, 3, dtype=D), None)),
    ("affine_weight_diagonal", lambda: (torch.zeros(2, 3, 0, 4, dtype=D), None, torch.zeros(2, 5, 4, dtype=D))),
    ("affine_weight_diagonal", lambda: (torch.zeros(0, 3, 2, 4, dtype=D), None, torch.zeros(0, 5, 4, dtype=D))),
    (
        "selected_weight_diagonal",
        lambda: (
            torch.zeros(2, 3, 0, 2, dtype=D),
            None,
            torch.zeros(2, 0, 2, dtype=torch.long),
            torch.zeros(2, 5, 4, dtype=D),
        ),
    ),
    (
        "selected_weight_diagonal",
        lambda: (
            torch.zeros(0, 3, 2, 2, dtype=D),
            None,
            torch.zeros(0, 2, 2, dtype=torch.long),
            torch.zeros(0, 5, 4, dtype=D),
        ),
    ),
]


@pytest.mark.parametrize("name, args", ZERO_SIZE_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ZERO_SIZE_CASES)])
def test_zero_size_inputs(name, args):
    compiled = BACKENDS["compiled"](name)(*args())
    reference = BACKENDS["reference"](name)(*args())
    assert compiled.shape == reference.shape and torch.equal(compiled, reference)


def test_kernels_are_decided_per_device(monkeypatch):
    monkeypatch.setattr(ops, "_kernel_cache", {})
    monkeypatch.setattr(ops, "_warned_devices", set())
    # a CPU-only build has no CUDA kernels: CUDA tensors would use the references instead of failing
    assert ops.has_kernel("factor_diagonal", "cpu")
    cuda_built = torch._C._dispatch_has_kernel_for_dispatch_key("torch_secorder::factor_diagonal", "CUDA")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ops.has_kernel("factor_diagonal", "cuda") == cuda_built
    assert cuda_built or "no cuda kernels in this build" in str(caught[0].message)
    assert ops.has_kernel("mse_loss_hessian_diag", "cuda")  # plain ATen: runs anywhere
    # a build without kernels for a device: references, one warning, same numbers
    monkeypatch.setattr(ops, "_kernel_cache", {})
    monkeypatch.setattr(ops, "_warned_devices", set())
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda name, key: False)
    used = []
    monkeypatch.setattr(ops, "_compiled", lambda name: pytest.fail(f"compiled {name} called"))
    original = reference_ops.factor_diagonal
    monkeypatch.setattr(reference_ops, "factor_diagonal", lambda *a: used.append(1) or original(*a))
    factors = torch.randn(2, 3, 4, dtype=D)
    with pytest.warns(RuntimeWarning, match="no cpu kernels in this build") as caught:
        first = ops.factor_diagonal(factors)
        ops.factor_diagonal(factors)
    assert len([w for w in caught if "torch_secorder" in str(w.message)]) == 1 and used == [1, 1]
    assert torch.equal(first, (factors**2).sum(1))


# ---------------------------------------------------------------- the generic method
def test_out_of_memory_halves_the_chunk_instead_of_giving_up_batching(monkeypatch):
    vmap_strategy = batched_hvp._STRATEGIES[0]
    sizes = []

    def tight_memory(grad_flat, param, rows, create_graph):
        sizes.append(rows.shape[0])
        if rows.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return vmap_strategy(grad_flat, param, rows, create_graph)

    monkeypatch.setattr(batched_hvp, "_STRATEGIES", (tight_memory,) + batched_hvp._STRATEGIES[1:])
    x = torch.randn(13, dtype=D, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="out of memory with (13|6) unit vectors"):
        (diag,) = hessian_diagonal(lambda: (x**4).sum(), [x], chunk_size=13)
    assert relative_error(diag, 12 * x.detach() ** 2) < 1e-15
    assert sizes[:4] == [13, 6, 3, 3] and max(sizes[3:]) <= 3  # never one backward per entry

    def always_out_of_memory(grad_flat, param, rows, create_graph):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(batched_hvp, "_STRATEGIES", (always_out_of_memory,) + batched_hvp._STRATEGIES[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(torch.OutOfMemoryError):
            hessian_diagonal(lambda: (x**4).sum(), [x], chunk_size=4)


# ---------------------------------------------------------------- embedding
