"""One dispatch for every model-level diagonal (Hessian, GGN, Fisher; summed or per sample): the engine
where it supports the model, else the generic method, with one warning saying why and what it will cost."""

import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .._forward_pass import (
    attention_twice_differentiable,
    library_call,
    library_forward,
    random_state,
    same_random_draws,
)
from .._gradient_hooks import changes_gradients, gradient_hooks_off
from ..backprop import EnginePlan, Unsupported, predicted_cost, run_plan
from ..backprop.gradients import Gradients
from ..losses import CurvatureRequest, check_scalar_loss, recognise
from ..memory import block_cache_scope
from . import _distributed as distributed
from . import _gradients as gradients
from . import _validation as validation
from ._batched_hvp import projected_seconds
from ._generic import (
    buffers_restored,
    check_strict_requires_grad,
    generic_hessian_diagonal,
    normal_inputs,
    normal_tensor,
)
from ._generic_curvature import generic_model_curvature
from ._matching import ParameterDiagonals, tag_flat
from ._validation import ModelInputs
from .method_choice import backprop_plan

COST_FLOOR = 0.5  # seconds the engine is predicted to take below which auto never trades it for the generic method
PROJECTION_THRESHOLD = 1000  # Hessian-vector products (each about a gradient) beyond which the fallback says how long

_NAMES = {"hessian": "Hessian", "ggn": "GGN", "fisher_mc": "Monte-Carlo Fisher", "fisher_empirical": "empirical Fisher"}


@dataclass(frozen=True)
class CallOptions:
    """How a call computes, as the public functions took it (checked)."""

    create_graph: bool
    strict: bool
    method: str
    chunk_size: Optional[int]
    memory_budget: int
    progress: Optional[Callable]


@dataclass
class ModelCall:
    """What one call runs: `model` is the module to call with `inputs` (the user's model, or its keyword wrapper
    for dict inputs, whose parameters are user_model's, listed in params); loss is loss_fn recognised (None
    where only the Hessian is asked for: the generic method needs no loss rule)."""

    user_model: torch.nn.Module
    model: torch.nn.Module
    loss_fn: Callable
    loss: object
    inputs: tuple
    targets: torch.Tensor
    params: list


def model_diagonal(
    api: str,
    model: torch.nn.Module,
    loss_fn: Callable,
    inputs: ModelInputs,
    targets: Tensor,
    request: CurvatureRequest,
    *,
    create_graph: bool,
    strict: bool,
    method: str,
    chunk_size: Optional[int],
    memory_budget: int,
    progress: Optional[Callable],
    return_loss: bool = False,
    flat: bool = False,
    all_reduce: bool = False,
    backward: bool = False,
) -> Any:
    """The diagonal `request` names for every tensor in model.parameters(); api names the caller in errors.
    return_loss: (loss, diagonals). flat: one vector over the parameters that require grad (per sample:
    (N, that many)), in model.parameters() order. all_reduce: with torch.distributed initialised and each rank
    holding a shard of the batch, the diagonal (and loss) of the global batch's loss on every rank. backward:
    also the work of loss.backward(): each parameter's .grad accumulates the gradient of the same loss (the
    global batch's with all_reduce), from the engine's own forward pass; returns (loss, diagonals)."""
    model = validation.model_to_run(model, inputs)
    params = validation.check_model_arguments(model, loss_fn, inputs, targets)
    validation.check_flag(create_graph, "create_graph")
    validation.check_flag(strict, "strict")
    validation.check_flag(return_loss, "return_loss")
    validation.check_flag(flat, "flat")
    validation.check_flag(backward, "backward")
    distributed.check_all_reduce(all_reduce, request.per_sample)
    validation.check_method(method)
    validation.check_chunking(chunk_size, memory_budget)
    validation.check_progress(progress)
    validation.check_not_inference_tensors(model, params)
    options = CallOptions(create_graph, strict, method, chunk_size, memory_budget, progress)
    loss = None
    if request.kind != "hessian":
        loss = recognise(loss_fn)
        if isinstance(loss, str):
            raise ValueError(
                f"{api}: loss_fn is not supported: {loss}; the {_NAMES[request.kind]} needs the "
                "loss's curvature in the model output, known for MSE, cross-entropy, "
                "BCE-with-logits and NLL"
            )
    with block_cache_scope():  # a `with`, not a decorator: warnings keep pointing at the caller
        with torch.inference_mode(False):  # inference_mode switches autograd off: the call runs outside it
            # data made under inference_mode may feed autograd once copied outside it (a cheap clone)
            called, input_tuple = validation.model_call(model, normal_inputs(inputs))
            call = ModelCall(model, called, loss_fn, loss, input_tuple, normal_tensor(targets), params)
            hooked = backward and changes_gradients(called)  # checked before hooks are set aside
            draw = random_state({p.device for p in params})  # every pass of the call draws from it
            # the diagonal is that of the loss the forward defines: gradient hooks stay out of every pass (the
            # model's hook lock is taken before library_call, never inside it)
            with gradient_hooks_off(called), library_call(), same_random_draws(state=draw):
                with gradients.watching_hook_registrations() as registered:
                    loss_value, diagonals, grads = _dispatch(call, request, options, backward and not hooked)
                if backward and not hooked and grads is None:  # the generic method: one forward and backward
                    loss_value, grads = gradients.of_loss(call)
                if (return_loss or backward) and loss_value is None:  # generic GGN / Fisher / per sample
                    with torch.no_grad(), buffers_restored(model), library_forward():
                        loss_value = loss_fn(called(*input_tuple), call.targets)
            if backward and (hooked or registered()):  # backward() with its hooks, on the same random draw
                gradients.check_no_all_reduce(all_reduce)
                with library_call(), same_random_draws(state=draw):
                    loss_value, grads = gradients.backward_with_hooks(call), None
        # under torch.autocast the passes compute in the autocast dtype; each result has its parameter's dtype
        diagonals = [d if d.dtype == p.dtype else d.to(p.dtype) for d, p in zip(diagonals, params)]
        if all_reduce:
            losses = [] if loss_value is None else [loss_value]
            local = [] if grads is None else gradients.dense(grads, params)
            reduced = distributed.reduce_diagonals(
                list(diagonals) + losses + local, distributed.local_normaliser(loss_fn, call.targets)
            )
            diagonals = reduced[: len(diagonals)]
            loss_value = reduced[len(diagonals)] if losses else None
            grads = reduced[len(diagonals) + len(losses) :] if grads is not None else None
        if grads is not None:
            gradients.accumulate(params, grads)
        if flat:
            trainable = [(d, p) for d, p in zip(diagonals, params) if p.requires_grad]
            start = 1 if request.per_sample else 0
            diagonals = tag_flat(
                torch.cat([d.flatten(start) for d, _ in trainable], dim=start)
                if trainable
                else next(model.parameters(), torch.zeros(0)).new_zeros(0),
                [p for _, p in trainable],
            )
        else:
            diagonals = ParameterDiagonals(diagonals, params)  # matched to parameters by identity (optim.py)
        if not (return_loss or backward):
            return diagonals
        assert loss_value is not None  # computed above when return_loss or backward
        return loss_value.detach().reshape(()), diagonals


def _dispatch(
    call: ModelCall, request: CurvatureRequest, options: CallOptions, with_gradients: bool = False
) -> Tuple[Optional[Tensor], List[Tensor], Optional[list]]:
    """(the loss the passes computed, or None where they computed none; diagonals; with_gradients: the loss's
    gradient per parameter in call.params where the engine computed it (None entries where the loss does not
    reach one), else None)."""
    if options.method != "autograd":
        plan, reason = backprop_plan(call.model, call.loss_fn, call.inputs)
        cheaper = None
        if plan is not None and options.method == "auto":
            cheaper = _cheaper_generic(plan, call, request, options.memory_budget)
        if plan is not None and cheaper is None:
            try:
                return _backprop(plan, call, request, options, with_gradients)
            except Unsupported as error:  # what only the forward pass shows (shapes); nothing was computed yet
                reason = str(error)
        if cheaper is None:
            reason = f"Hessian backpropagation does not support {reason}"
            if options.method == "backprop":
                raise NotImplementedError(f"method='backprop': {reason}; use method='auto' or 'autograd'")
        if _first_time(call.user_model, call.loss_fn, cheaper or reason):
            if cheaper is not None:
                message = f"torch_secorder: {cheaper}; using the generic autograd method (exact)"
            else:
                repeats = _batch_size(call.inputs, call.targets) if request.per_sample else 1
                message = (
                    f"torch_secorder: {reason}; using the generic autograd method (exact, slower)"
                    f"{_projection(call, options.memory_budget, repeats)}"
                )
            warnings.warn(message, RuntimeWarning, stacklevel=4)
    model, loss_fn, targets = call.model, call.loss_fn, call.targets

    def forward(*args: Any) -> Any:
        with library_forward():  # no hooks registered, reentrant checkpoints direct, the call's random draw
            return model(*args)

    with buffers_restored(model):
        if request.kind == "hessian" and not request.per_sample:
            losses = []

            def loss_func() -> Tensor:  # generic_hessian_diagonal runs it as a library forward pass
                loss = loss_fn(model(*call.inputs), targets)
                check_scalar_loss(loss, "loss_fn")
                losses.append(loss.detach())
                return loss

            diagonals = generic_hessian_diagonal(
                loss_func,
                call.params,
                None,
                options.create_graph,
                options.strict,
                "loss_fn",
                method="autograd",
                chunk_size=options.chunk_size,
                memory_budget=options.memory_budget,
                progress=options.progress,
            )
            return (losses[0] if losses else None), diagonals, None
        diagonals = generic_model_curvature(
            forward, loss_fn, call.loss, call.inputs, targets, call.params, request, options
        )
        return None, diagonals, None


_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(loss kind, reason)} already warned about


def _first_time(model: torch.nn.Module, loss_fn: Callable, reason: str) -> bool:
    """The fallback warning comes once per model, loss and reason, not on every batch of a training loop."""
    kind = type(loss_fn) if isinstance(loss_fn, torch.nn.Module) else getattr(loss_fn, "__qualname__", type(loss_fn))
    seen = _WARNED.setdefault(model, set())
    if (kind, reason) in seen:
        return False
    seen.add((kind, reason))
    return True


def _batch_size(input_tuple: tuple, targets: Tensor) -> int:
    for tensor in (*validation.tensor_leaves(input_tuple), targets):
        if tensor.dim() > 0:
            return tensor.shape[0]
    return 1


def _backprop(
    plan: EnginePlan, call: ModelCall, request: CurvatureRequest, options: CallOptions, with_gradients: bool
) -> Tuple[Tensor, List[Tensor], Optional[list]]:
    if options.strict:
        check_strict_requires_grad(call.params)
    asked = Gradients([p for p in call.params if p.requires_grad]) if with_gradients else None
    with buffers_restored(call.model):
        loss, diagonals = run_plan(
            plan,
            call.loss_fn,
            call.inputs,
            call.targets,
            call.params,
            create_graph=options.create_graph,
            memory_budget=options.memory_budget,
            request=request,
            gradients=asked,
        )
    if options.progress is not None:
        total = sum(p.numel() for p in call.params)
        options.progress(total, total)
    grads = None if asked is None else gradients.aligned(asked.params, asked.values, call.params)
    return loss.detach(), diagonals, grads


def _projection(call: ModelCall, memory_budget: int, repeats: int = 1) -> str:
    """'; projected ...' for the fallback warning when the generic method will take more than about 1,000
    gradients: one gradient is timed (a small price next to what follows), else ''. repeats: per-sample
    diagonals take one pass per sample."""
    entries = sum(p.numel() for p in call.params if p.requires_grad) * repeats
    if entries <= PROJECTION_THRESHOLD:
        return ""
    timing = _generic_timing(call, memory_budget)
    if timing is None:
        return ""
    seconds, generic = timing
    per = " per sample" if repeats > 1 else ""
    if generic is None:
        return (
            f"; projected roughly {_duration(entries * seconds)}: {entries} Hessian-vector products (one per "
            f"parameter entry{per}), each 0.1 to 2 times a gradient ({seconds * 1e3:.1f} ms here)"
        )
    return (
        f"; projected roughly {_duration(repeats * (generic + seconds))}: {entries} Hessian-vector products (one per "
        f"parameter entry{per}), batched, timed on two chunks here (a gradient: {seconds * 1e3:.1f} ms)"
    )


def _generic_timing(call: ModelCall, memory_budget: int) -> Optional[Tuple[float, Optional[float]]]:
    """(seconds of one gradient, the generic method's projected seconds or None where the loss has no gradient),
    timed on this call (a warm gradient, then two chunks of the generic method: projected_seconds); None where
    the timing itself fails."""
    model, loss_fn, input_tuple, targets = call.model, call.loss_fn, call.inputs, call.targets
    active = [p for p in call.params if p.requires_grad]
    try:
        with buffers_restored(model), torch.enable_grad():
            for _ in range(2):  # the second one warm
                start = time.perf_counter()
                with library_forward():
                    loss = loss_fn(model(*input_tuple), targets)
                if loss.requires_grad:
                    torch.autograd.grad(loss, active, allow_unused=True)
                if loss.is_cuda:
                    torch.cuda.synchronize(loss.device)
                seconds = time.perf_counter() - start
            # chunks of the generic method itself, timed: batched products cost from a tenth of a gradient
            # (small models) to several, so a gradient's time alone misjudges it by that much
            generic = None
            if loss.requires_grad:
                with library_forward(), attention_twice_differentiable():  # as the generic method records it
                    loss = loss_fn(model(*input_tuple), targets)
                grads = torch.autograd.grad(loss, active, allow_unused=True, create_graph=True)
                generic = projected_seconds(loss, active, grads, memory_budget)
    except Exception:
        return None
    return seconds, generic


# model -> {(input shapes and dtypes, loss kind): why the generic method is cheaper, or None}: auto's cost choice
_COST_CHOICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cheaper_generic(plan: EnginePlan, call: ModelCall, request: CurvatureRequest, memory_budget: int) -> Optional[str]:
    """Why auto takes the generic method for a model the engine supports: the engine's predicted time
    (backprop/cost.py) is above the generic method's, timed on this call; None where the engine is cheaper. Made
    once per model, input shapes and loss; the generic method is timed only where the engine is predicted to take
    more than COST_FLOOR (below that, auto never trades it) and more than the generic method's floor."""
    if request.kind != "hessian" or request.per_sample:  # those the generic method takes once per sample or more
        return None
    signature = (
        tuple((tuple(x.shape), x.dtype, x.device.type) for x in validation.tensor_leaves(call.inputs)),
        getattr(call.loss_fn, "__qualname__", type(call.loss_fn)),
    )
    choices = _COST_CHOICES.setdefault(call.user_model, {})
    if signature not in choices:
        choices[signature] = _cost_choice(plan, call, memory_budget)
    return choices[signature]


def _cost_choice(plan: EnginePlan, call: ModelCall, memory_budget: int) -> Optional[str]:
    entries = sum(p.numel() for p in call.params if p.requires_grad)
    try:
        cost = predicted_cost(plan, call.inputs, memory_budget)
        leaves = validation.tensor_leaves(call.inputs)
        device, dtype = leaves[0].device, next((p.dtype for p in call.params), leaves[0].dtype)
        engine = cost.seconds(device, dtype)
        least_generic = cost.least_generic_seconds(entries, device, dtype)
    except Exception:  # the prediction's own forward: the call itself will say what is wrong
        return None
    if engine <= max(COST_FLOOR, least_generic):  # the generic method is timed only where it could be faster
        return None
    seconds, products = _generic_timing(call, memory_budget) or (0.0, None)
    if products is None:  # the generic method cannot run here (a vmap without batching rules, no derivative)
        return None
    generic = products + seconds
    if engine <= generic:
        return None
    return (
        f"the generic method is predicted faster here: the engine's {cost.columns} columns per sample cost about "
        f"{_duration(engine)} ({engine / max(seconds, 1e-9):.0f} gradients), the generic method's {entries} "
        f"Hessian-vector products {_duration(generic)} (backprop/cost.py; method='backprop' runs the engine)"
    )


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
