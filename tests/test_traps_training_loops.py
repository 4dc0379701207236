"""Traps met inside training loops: threads, state a forward reads, gradient hooks, checkpointing, optimizers
taking diagonals back, and the tools people put around models. Each case gives the float64 brute force of the
forward as written (<= 1e-10) under every method, or one clear error; never a silent wrong number.
"""

import types
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import D, brute_force, relative_error
from torch.utils.checkpoint import checkpoint

from torch_secorder import explain_method, hessian_diagonal, model_ggn_diagonal, model_hessian_diagonal
from torch_secorder.optim import SophiaDiagonal

METHODS = ("auto", "backprop", "autograd")
SCALE = 1.0  # a module-level global a forward reads (test_state_read_by_the_forward)


class Residual(nn.Module):
    """A non-chain model: the graph engine runs it."""

    def __init__(self):
        super().__init__()
        self.a, self.mid, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        h = h + torch.tanh(self.mid(h))
        return self.out(h)


def chain():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def built(kind, seed=0):
    torch.manual_seed(seed)
    return (Residual() if kind == "graph" else chain()).double()


def batch(seed=0, samples=6):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(samples, 4, dtype=D, generator=generator), torch.randint(0, 3, (samples,), generator=generator)


def computed(model, x, y, method, loss_fn=F.cross_entropy, **kwargs):
    """The diagonal, with the rule for warnings: none from backprop and autograd, at most the fallback's from auto."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = model_hessian_diagonal(model, loss_fn, x, y, method=method, **kwargs)
    assert len(caught) <= (1 if method == "auto" else 0), [str(w.message) for w in caught]
    return result


# ---------------------------------------------------------------- 1. threads
@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "hooked"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["graph", "chain"])
def test_concurrent_calls_on_one_model_are_exact(kind, method, hooked):
    model = built(kind)
    batches = [batch(seed) for seed in range(4)]
    truths = [brute_force(model, F.cross_entropy, x, y) for x, y in batches]
    if hooked:  # the calls set hooks aside and put them back: one at a time, and the hook is back after all
        last = model.out if kind == "graph" else model[2]
        last.weight.register_hook(lambda grad: grad * 2)
        HOOKS["module backward scale"](model)
    calls = 24 if method != "autograd" else 8

    def one(index):
        x, y = batches[index % 4]
        return relative_error(computed(model, x, y, method), truths[index % 4])

    with ThreadPoolExecutor(4) as pool:
        errors = list(pool.map(one, range(calls)))
    assert max(errors) < 1e-10, errors
    if hooked:
        assert last.weight._backward_hooks and (model.mid if kind == "graph" else model[1])._backward_hooks


def test_traces_never_overlap_another_calls_forward():
    """torch.fx patches nn.Module.__call__ for every thread while it traces: a generic call's forward in one thread
    and an engine call's trace in another must not meet (they did: a Proxy reached the loss)."""
    graph_model, chain_model = built("graph"), built("chain")
    x, y = batch()
    truths = {id(m): brute_force(m, F.cross_entropy, x, y) for m in (graph_model, chain_model)}
    jobs = [(graph_model, "auto"), (graph_model, "autograd"), (chain_model, "autograd"), (graph_model, "backprop")]

    def one(index):
        model, method = jobs[index % len(jobs)]
        return relative_error(computed(model, x, y, method), truths[id(model)])

    with ThreadPoolExecutor(4) as pool:
        errors = list(pool.map(one, range(96)))
    assert max(errors) < 1e-10, errors


# ---------------------------------------------------------------- 2. state read by the forward
class ReadsState(nn.Module):
    """A residual forward that reads Python state at each call: a config dict, a namespace, a module global and
    a list flag."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(4, 6), nn.Linear(6, 3)
        self.cfg, self.ns, self.flags = {"t": 1.0}, types.SimpleNamespace(t=1.0), [False]

    def forward(self, x):
        h = self.a(x)
        if self.flags[0]:
            h = torch.tanh(h)
        h = h + torch.sin(h) * self.cfg["t"] * self.ns.t * SCALE
        return self.out(h)


def _tanh_forward(self, x):
    h = self.a(x)
    return self.out(torch.tanh(h) * h)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("change", ["dict", "namespace", "global", "list flag", "class forward"])
def test_state_read_by_the_forward_is_read_at_every_call(change, method, monkeypatch):
    torch.manual_seed(0)
    model = ReadsState().double()
    x, y = batch()
    first = computed(model, x, y, method)
    assert relative_error(first, brute_force(model, F.cross_entropy, x, y)) < 1e-10
    if change == "dict":
        model.cfg["t"] = 3.0
    elif change == "namespace":
        model.ns.t = -2.0
    elif change == "global":
        monkeypatch.setattr(__import__(__name__), "SCALE", 4.0)
    elif change == "list flag":
        model.flags[0] = True
    else:
        monkeypatch.setattr(ReadsState, "forward", _tanh_forward)
    expected = brute_force(model, F.cross_entropy, x, y)
    assert relative_error(expected, first) > 1e-3  # the change matters
    assert relative_error(computed(model, x, y, method), expected) < 1e-10


def test_the_trace_leaves_no_attribute_on_the_model():
    class WithConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x):
            return self.a(x) * torch.tensor(2.0, dtype=D) + torch.tanh(x[:, :3])

    torch.manual_seed(0)
    model = WithConstant().double()
    before = set(vars(model))
    x, y = batch()
    assert relative_error(computed(model, x, y, "backprop"), brute_force(model, F.cross_entropy, x, y)) < 1e-10
    assert set(vars(model)) == before


# ---------------------------------------------------------------- 3. gradient hooks
def _hook_parameter_scale(model):
    return [
        model.a.weight.register_hook(lambda grad: grad * 2)
        if hasattr(model, "a")
        else model[0].weight.register_hook(lambda grad: grad * 2)
    ]


def _hook_parameter_clamp(model):
    last = model.out if hasattr(model, "out") else model[2]
    return [last.weight.register_hook(lambda grad: grad.clamp(-1e-4, 1e-4))]


def _hook_module_backward_scale(model):
    module = model.mid if hasattr(model, "mid") else model[1]
    return [module.register_full_backward_hook(lambda m, grad_input, grad_output: (3 * grad_input[0],))]


def _hook_forward_registers_reversal(model):
    """A forward hook that watches (the engine runs it) and puts a gradient hook on the output (not registered)."""
    module = model.mid if hasattr(model, "mid") else model[1]

    def reverse(m, inputs, output):
        output.register_hook(lambda grad: -grad)

    return [module.register_forward_hook(reverse)]


def _hook_global_backward(model):
    return [
        torch.nn.modules.module.register_module_full_backward_hook(
            lambda m, grad_input, grad_output: tuple(None if g is None else 2 * g for g in grad_input)
        )
    ]


HOOKS = {
    "parameter scale": _hook_parameter_scale,
    "parameter clamp": _hook_parameter_clamp,
    "module backward scale": _hook_module_backward_scale,
    "reversal": _hook_forward_registers_reversal,
    "global backward": _hook_global_backward,
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["graph", "chain"])
@pytest.mark.parametrize("hook", list(HOOKS))
def test_gradient_hooks_do_not_change_the_result(hook, kind, method):
    x, y = batch()
    expected = brute_force(built(kind), F.cross_entropy, x, y)  # the same weights, no hooks
    model = built(kind)
    handles = HOOKS[hook](model)
    try:
        assert relative_error(computed(model, x, y, method), expected) < 1e-10
        ggn = model_ggn_diagonal(model, F.cross_entropy, x, y, method="autograd")
        assert relative_error(ggn, model_ggn_diagonal(built(kind), F.cross_entropy, x, y)) < 1e-10
    finally:
        for handle in handles:
            handle.remove()


def test_hooks_are_back_and_untouched_after_a_call():
    model = built("graph")
    x, y = batch()
    seen = []
    model.a.weight.register_hook(lambda grad: seen.append("tensor") or grad * 2)
    model.mid.register_full_backward_hook(lambda m, gi, go: seen.append("module") or None)
    for method in METHODS:
        computed(model, x, y, method)
    assert seen == []  # the library's own gradients never reach the user's hooks
    F.cross_entropy(model(x), y).backward()
    assert sorted(seen) == ["module", "tensor"]
    plain = built("graph")
    F.cross_entropy(plain(x), y).backward()
    assert torch.allclose(model.a.weight.grad, 2 * plain.a.weight.grad)


def test_hessian_diagonal_of_a_function_ignores_hooks_on_its_params():
    p = torch.randn(5, dtype=D, requires_grad=True)
    handle = p.register_hook(lambda grad: grad * 2)
    assert torch.allclose(hessian_diagonal(lambda: (p**3).sum(), [p])[0], 6 * p.detach(), rtol=1e-12)
    (p**2).sum().backward()
    assert torch.allclose(p.grad, 4 * p.detach())  # the hook is back
    handle.remove()


# ---------------------------------------------------------------- 4. checkpointing
class Checkpointed(nn.Module):
    def __init__(self, mode, first):
        super().__init__()
        self.mode, self.first = mode, first
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def _block(self, h):
        return torch.tanh(self.b(torch.tanh(self.a(h)) if self.first else h))

    def forward(self, x):
        h = x if self.first else torch.tanh(self.a(x))
        if self.mode == "plain":
            h = self._block(h)
        else:
            h = checkpoint(self._block, h, use_reentrant=self.mode == "reentrant")
        return self.c(h)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("first", [True, False], ids=["first block", "middle block"])
@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_checkpointed_blocks_are_part_of_the_forward(mode, first, method):
    torch.manual_seed(0)
    plain = Checkpointed("plain", first).double()
    model = Checkpointed(mode, first).double()
    model.load_state_dict(plain.state_dict())
    x, y = batch()
    expected = brute_force(plain, F.cross_entropy, x, y)  # torch.func cannot run checkpoints
    actual = computed(model, x, y, method, strict=True)
    assert relative_error(actual, expected) < 1e-10
    assert all(d.abs().sum() > 0 for d in actual)


# ---------------------------------------------------------------- 5. diagonals taken back by an optimizer
def _groups(model):
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.1}]


@pytest.mark.parametrize("form", ["list", "flat", "dict", "estimate"])
def test_sophia_matches_diagonals_to_parameters_by_identity(form):
    from torch_secorder import model_hessian_diagonal_estimate

    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    model[1].bias.requires_grad_(False)  # a frozen parameter, in the optimizer all the same
    optimizer = SophiaDiagonal(_groups(model))
    x, y = batch()
    exact = model_hessian_diagonal(model, F.cross_entropy, x, y)
    if form == "list":
        given = exact
    elif form == "flat":
        given = model_hessian_diagonal(model, F.cross_entropy, x, y, flat=True)
    elif form == "dict":
        given = dict(zip(model.parameters(), exact))
    else:
        given = model_hessian_diagonal_estimate(
            model, F.cross_entropy, x, y, 4, generator=torch.Generator().manual_seed(0)
        )
        exact = given.diagonal
    optimizer.update_curvature(given)
    for param, diagonal in zip(model.parameters(), exact):
        if param.requires_grad:
            assert torch.equal(optimizer.state[param]["curvature"], diagonal)
        else:
            assert "curvature" not in optimizer.state[param]


def test_sophia_names_a_parameter_without_a_diagonal():
    model = built("chain")
    extra = nn.Parameter(torch.zeros(5, dtype=D))
    optimizer = SophiaDiagonal([{"params": list(model.parameters())}, {"params": [extra]}])
    x, y = batch()
    with pytest.raises(ValueError, match=r"no diagonal for param_groups\[1\]\['params'\]\[0\] \(shape \(5,\)\)"):
        optimizer.update_curvature(model_hessian_diagonal(model, F.cross_entropy, x, y))
    with pytest.raises(ValueError, match="one diagonal per parameter"):
        optimizer.update_curvature([torch.zeros(1)] * 2)


# ---------------------------------------------------------------- 6. non-finite inputs
def test_an_infinite_input_never_gives_nan_where_the_gradient_is_finite():
    model = built("chain")
    x, y = batch()
    x[1, 2] = float("inf")
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    nan_gradient = [torch.isnan(p.grad) for p in model.parameters()]
    engine = model_hessian_diagonal(model, F.cross_entropy, x, y, method="backprop")
    assert all(torch.equal(torch.isnan(d), pattern) for d, pattern in zip(engine, nan_gradient))
    with pytest.raises(FloatingPointError, match="where the gradient is finite"):
        model_hessian_diagonal(model, F.cross_entropy, x, y, method="autograd")


# ---------------------------------------------------------------- 7. tools around models, argument mistakes
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch._dynamo
@pytest.mark.parametrize("method", METHODS)
def test_a_compiled_model_runs_its_original_module(method):
    model = built("graph")
    x, y = batch()
    compiled = torch.compile(model)
    assert relative_error(computed(compiled, x, y, method), brute_force(model, F.cross_entropy, x, y)) < 1e-10
    if method != "autograd":
        assert explain_method(compiled, F.cross_entropy).method == "backprop"


@pytest.mark.parametrize("method", METHODS)
def test_lazy_modules_are_initialised_as_a_first_call_would(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = batch()
    actual = computed(model, x, y, method)
    assert [d.shape for d in actual] == [p.shape for p in model.parameters()]
    assert relative_error(actual, brute_force(model, F.cross_entropy, x, y)) < 1e-10


def test_a_loss_returning_a_python_float_is_named():
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError, match="loss_fn must return a tensor, got float"):
            model_hessian_diagonal(built("chain"), lambda output, target: 1.0, x, y)


@pytest.mark.parametrize("name,value", [("create_graph", "no"), ("strict", None), ("create_graph", 1)])
def test_flags_must_be_bools(name, value):
    x, y = batch()
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        model_hessian_diagonal(built("chain"), F.cross_entropy, x, y, **{name: value})
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        hessian_diagonal(lambda: (p**3).sum(), [p], **{name: value})


@pytest.mark.parametrize("method", METHODS)
def test_autocast_results_have_the_parameters_dtype(method):
    torch.manual_seed(0)
    model = chain()
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = computed(model, x.float(), y, method)
    assert [d.dtype for d in actual] == [torch.float32] * 4
    reference = model_hessian_diagonal(model.double(), F.cross_entropy, x, y)
    assert relative_error([a.double() for a in actual], reference) < 0.03  # bfloat16 products: 0.3-1% measured


def test_the_whole_batch_as_inputs_is_named_before_any_fallback():
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"inputs is a tuple of 2.*pass inputs=x, targets=y"):
            model_hessian_diagonal(built("chain"), F.cross_entropy, (x, y), y)


# ---------------------------------------------------------------- train mode
class DropoutNet(nn.Module):
    def __init__(self, noise=False, drop=None):
        super().__init__()
        self.a, self.b, self.noise = nn.Linear(4, 6), nn.Linear(6, 3), noise
        self.drop = drop if drop is not None else nn.Dropout(0.5)

    def forward(self, x):
        if self.drop.inplace:  # on the Linear's output, which its backward does not read (PyTorch's own rule)
            return self.b(torch.tanh(self.drop(self.a(x))))
        h = torch.tanh(self.a(x))
        if self.noise:  # noise injection written in the forward: the engine runs it
            return self.b(h + 0.5 * torch.randn_like(h) * h)
        return self.b(self.drop(h))


class FunctionalDropouts(nn.Module):
    """Dropout as functional calls, twice (two draws in one forward), one of them in place, and Dropout1d."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.drop1d = nn.Dropout1d(0.4)

    def forward(self, x):
        h = F.dropout(torch.tanh(self.a(x)), 0.3, training=self.training)
        h = torch.sigmoid(self.b(h))
        h = self.drop1d(h.unsqueeze(2)).squeeze(2)
        return self.c(F.dropout(h * 1.0, 0.2, training=self.training, inplace=True))


class NamedDropout(nn.Dropout):
    """A subclass that keeps nn.Dropout's forward (a project's own name for it)."""


DROPOUT_MODELS = {
    "dropout": lambda: DropoutNet(),
    "subclass": lambda: DropoutNet(drop=NamedDropout(0.5)),
    "noise": lambda: DropoutNet(noise=True),
    "in place": lambda: DropoutNet(drop=nn.Dropout(0.5, inplace=True)),
    "functional": FunctionalDropouts,
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", list(DROPOUT_MODELS))
def test_random_forwards_give_the_hessian_of_the_draw_the_model_would_make_next(kind, method):
    torch.manual_seed(0)
    model = DROPOUT_MODELS[kind]().double().train()
    x, y = batch()
    if method != "autograd":
        assert explain_method(model, F.cross_entropy, x).method == "backprop"
    torch.manual_seed(5)
    actual = computed(model, x, y, method)
    torch.manual_seed(5)  # the brute force's forward draws from the same state: the same mask
    expected = brute_force(model, F.cross_entropy, x, y)
    assert relative_error(actual, expected) < 1e-10
    torch.manual_seed(6)
    assert relative_error(brute_force(model, F.cross_entropy, x, y), expected) > 1e-3  # another draw differs
    torch.manual_seed(5)
    per_sample = model_hessian_diagonal(model, F.cross_entropy, x, y, per_sample=True, method=method)
    assert relative_error([d.sum(0) for d in per_sample], expected) < 1e-10  # every pass saw that mask
    torch.manual_seed(5)
    ggn = model_ggn_diagonal(model, F.cross_entropy, x, y, method=method)
    torch.manual_seed(5)
    assert relative_error(ggn, model_ggn_diagonal(model, F.cross_entropy, x, y, method="autograd")) < 1e-10


def test_batch_norm_in_train_mode_is_the_train_mode_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double().train()
    x, y = batch()
    running = model[1].running_mean.clone()
    actual = computed(model, x, y, "auto")
    assert relative_error(actual, brute_force(model, F.cross_entropy, x, y)) < 1e-10  # batch statistics
    assert torch.equal(model[1].running_mean, running)
