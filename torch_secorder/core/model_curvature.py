"""One dispatch for every model-level diagonal (Hessian, GGN, Fisher; summed or per sample): the engine
where it supports the model, else the generic method, with one warning saying why and what it will cost."""

import dataclasses
import time
import warnings
import weakref

import torch

from ..backprop import Unsupported, backprop_hessian_diagonal
from ..backprop.losses import recognise
from ..forward_pass import library_call, library_forward, same_random_draws
from ..gradient_hooks import gradient_hooks_off
from ..memory import block_cache_scope
from . import dispatch, distributed, validation
from .matching import ParameterDiagonals, tag_flat
from .generic import (buffers_restored, check_strict_requires_grad, generic_hessian_diagonal, normal_inputs,
                      normal_tensor)
from .generic_curvature import generic_model_curvature

PROJECTION_THRESHOLD = 1000  # Hessian-vector products (each about a gradient) beyond which the fallback says how long

_NAMES = {"hessian": "Hessian", "ggn": "GGN", "fisher_mc": "Monte-Carlo Fisher", "fisher_empirical": "empirical Fisher"}


def model_diagonal(api, model, loss_fn, inputs, targets, request, *, create_graph, strict, method, chunk_size,
                   memory_budget, progress, return_loss=False, flat=False, all_reduce=False):
    """The diagonal `request` names for every tensor in model.parameters(); api names the caller in errors.
    return_loss: (loss, diagonals). flat: one vector over the parameters that require grad (per sample:
    (N, that many)), in model.parameters() order. all_reduce: with torch.distributed initialised and each rank
    holding a shard of the batch, the diagonal (and loss) of the global batch's loss on every rank."""
    model = validation.model_to_run(model, inputs)
    params = validation.check_model_arguments(model, loss_fn, inputs, targets)
    validation.check_flag(create_graph, "create_graph")
    validation.check_flag(strict, "strict")
    validation.check_flag(return_loss, "return_loss")
    validation.check_flag(flat, "flat")
    distributed.check_all_reduce(all_reduce, request.per_sample)
    validation.check_method(method)
    validation.check_chunking(chunk_size, memory_budget)
    validation.check_progress(progress)
    validation.check_not_inference_tensors(model, params)
    spec = None
    if request.kind != "hessian":
        spec = recognise(loss_fn)
        if isinstance(spec, str):
            raise ValueError(f"{api}: loss_fn is not supported: {spec}; the {_NAMES[request.kind]} needs the "
                             "loss's curvature in the model output, known for MSE, cross-entropy, "
                             "BCE-with-logits and NLL")
    with block_cache_scope():  # a `with`, not a decorator: warnings keep pointing at the caller
        losses = []
        request = dataclasses.replace(request, record_loss=losses.append)
        with torch.inference_mode(False):  # inference_mode switches autograd off: the call runs outside it
            # data made under inference_mode may feed autograd once copied outside it (a cheap clone)
            called, input_tuple = validation.model_call(model, normal_inputs(inputs))
            targets = normal_tensor(targets)
            # the diagonal is that of the loss the forward defines: gradient hooks stay out of every pass
            with gradient_hooks_off(called), library_call(), same_random_draws({p.device for p in params}):
                diagonals = _dispatch(model, called, loss_fn, input_tuple, targets, spec, request, create_graph,
                                      strict, method, chunk_size, memory_budget, progress, params)
                if return_loss and not losses:  # the generic GGN / Fisher / per-sample passes: one forward more
                    with torch.no_grad(), buffers_restored(model), library_forward():
                        losses.append(loss_fn(called(*input_tuple), targets))
        # under torch.autocast the passes compute in the autocast dtype; each result has its parameter's dtype
        diagonals = [d if d.dtype == p.dtype else d.to(p.dtype) for d, p in zip(diagonals, params)]
        if all_reduce:
            reduced = distributed.reduce_diagonals(list(diagonals) + losses[:1],
                                                   distributed.local_normaliser(loss_fn, targets))
            diagonals, losses = reduced[:len(diagonals)], reduced[len(diagonals):]
        if flat:
            trainable = [(d, p) for d, p in zip(diagonals, params) if p.requires_grad]
            start = 1 if request.per_sample else 0
            diagonals = tag_flat(torch.cat([d.flatten(start) for d, _ in trainable], dim=start) if trainable
                                 else next(model.parameters(), torch.zeros(0)).new_zeros(0),
                                 [p for _, p in trainable])
        else:
            diagonals = ParameterDiagonals(diagonals, params)  # matched to parameters by identity (optim.py)
        if not return_loss:
            return diagonals
        return losses[0].detach().reshape(()), diagonals


def _dispatch(user_model, model, loss_fn, input_tuple, targets, spec, request, create_graph, strict, method,
              chunk_size, memory_budget, progress, params):
    """model: the module to call with input_tuple (user_model itself, or its keyword wrapper for dict inputs,
    whose parameters are user_model's, listed in params)."""
    if method != "autograd":
        chain, reason = dispatch.backprop_plan(model, loss_fn, input_tuple)
        if reason is None:
            try:
                return _backprop(chain, model, loss_fn, input_tuple[0], targets, params, request, create_graph,
                                 strict, memory_budget, progress)
            except Unsupported as error:  # what only the forward pass shows (shapes); nothing was computed yet
                reason = str(error)
        reason = f"Hessian backpropagation does not support {reason}"
        if method == "backprop":
            raise NotImplementedError(f"method='backprop': {reason}; use method='auto' or 'autograd'")
        if _first_time(user_model, loss_fn, reason):
            repeats = _batch_size(input_tuple, targets) if request.per_sample else 1
            warnings.warn(f"torch_secorder: {reason}; using the generic autograd method (exact, slower)"
                          f"{_projection(model, loss_fn, input_tuple, targets, params, repeats)}",
                          RuntimeWarning, stacklevel=4)
    def forward(*args):
        with library_forward():  # no hooks registered, reentrant checkpoints direct, the call's random draw
            return model(*args)

    with buffers_restored(model):
        if request.kind == "hessian" and not request.per_sample:
            def loss_func():  # generic_hessian_diagonal runs it as a library forward pass
                loss = loss_fn(model(*input_tuple), targets)
                validation.check_scalar_loss(loss, "loss_fn")
                request.record_loss(loss.detach())
                return loss

            return generic_hessian_diagonal(loss_func, params, None, create_graph, strict, "loss_fn",
                                            method="autograd", chunk_size=chunk_size,
                                            memory_budget=memory_budget, progress=progress)
        return generic_model_curvature(forward, loss_fn, spec, input_tuple, targets, params, request,
                                       create_graph=create_graph, strict=strict, chunk_size=chunk_size,
                                       memory_budget=memory_budget, progress=progress)


_WARNED = weakref.WeakKeyDictionary()  # model -> {(loss kind, reason)} already warned about


def _first_time(model, loss_fn, reason):
    """The fallback warning comes once per model, loss and reason, not on every batch of a training loop."""
    kind = type(loss_fn) if isinstance(loss_fn, torch.nn.Module) else getattr(loss_fn, "__qualname__", type(loss_fn))
    seen = _WARNED.setdefault(model, set())
    if (kind, reason) in seen:
        return False
    seen.add((kind, reason))
    return True


def _batch_size(input_tuple, targets):
    for tensor in (*validation.tensor_leaves(input_tuple), targets):
        if tensor.dim() > 0:
            return tensor.shape[0]
    return 1


def _backprop(chain, model, loss_fn, inputs, targets, params, request, create_graph, strict, memory_budget, progress):
    if strict:
        check_strict_requires_grad(params)
    with buffers_restored(model):
        diagonals = backprop_hessian_diagonal(chain, loss_fn, inputs, targets, params, create_graph=create_graph,
                                              memory_budget=memory_budget, request=request)
    if progress is not None:
        total = sum(p.numel() for p in params)
        progress(total, total)
    return diagonals


def _projection(model, loss_fn, input_tuple, targets, params, repeats=1):
    """'; projected ...' for the fallback warning when the generic method will take more than about 1,000
    gradients: one gradient is timed (a small price next to what follows), else ''. repeats: per-sample
    diagonals take one pass per sample."""
    entries = sum(p.numel() for p in params if p.requires_grad) * repeats
    if entries <= PROJECTION_THRESHOLD:
        return ""
    active = [p for p in params if p.requires_grad]
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
    except Exception:  # noqa: BLE001  (the method itself reports what is wrong)
        return ""
    per = " per sample" if repeats > 1 else ""
    # measured on CPU: a batched Hessian-vector product cost 0.1 to 2 gradients (less on small models)
    return (f"; projected roughly {_duration(entries * seconds)}: {entries} Hessian-vector products (one per "
            f"parameter entry{per}), each 0.1 to 2 times a gradient ({seconds * 1e3:.1f} ms here)")


def _duration(seconds):
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"
