"""Hutchinson's estimator of the Hessian diagonal, with a per-entry standard error the user can read.

For Rademacher probes v (entries +-1), E[v * (H v)] = diag(H): each probe gives one unbiased sample
v_i (H v)_i per entry. The estimate is their mean, its standard error the sample standard deviation over
sqrt(probes). Probes go through batched Hessian-vector products, many per double backward (as the exact
generic method's unit vectors do), chunked to the memory budget; with target_rel_error, chunks are drawn
until the estimated ||estimate - diag(H)|| / ||diag(H)|| reaches it (or n_probes, the cap, is spent).
"""

import warnings
from typing import Callable, List, Optional

import torch
from torch import Tensor
from torch.nn import Module

from .._forward_pass import attention_twice_differentiable, library_call, library_forward
from .._gradient_hooks import gradient_hooks_off
from ..losses import check_scalar_loss
from ..memory import block_cache_scope
from . import _validation as validation
from ._batched_hvp import DEFAULT_MEMORY_BUDGET, choose_chunk_size, is_out_of_memory, saved_tensor_bytes
from ._generic import (
    buffers_restored,
    first_order_grads,
    inference_tensors_explained,
    normal_inputs,
    normal_tensor,
)
from ._matching import ParameterDiagonals
from ._validation import ModelInputs

__all__ = ["DiagonalEstimate", "hessian_diagonal_estimate", "model_hessian_diagonal_estimate"]

DEFAULT_PROBES = 100
DEFAULT_MAX_PROBES = 10_000  # the cap when only target_rel_error is given


class DiagonalEstimate(tuple):
    """(diagonal, standard_error): lists with one tensor per parameter, unpackable as a pair; also
    .probes (how many were drawn) and .relative_error, the expected ||estimate - diag(H)|| / ||diag(H)||
    over all entries (inf when the noise is as large as the estimate itself)."""

    probes: int
    relative_error: float

    def __new__(cls, diagonal, standard_error, probes):
        estimate = super().__new__(cls, (diagonal, standard_error))
        estimate.probes = probes
        estimate.relative_error = _relative_error(diagonal, standard_error)
        return estimate

    @property
    def diagonal(self):
        return self[0]

    @property
    def standard_error(self):
        return self[1]

    def __repr__(self):
        return f"DiagonalEstimate(probes={self.probes}, relative_error={self.relative_error:.3g})"


def hessian_diagonal_estimate(
    func: Callable[[], Tensor],
    params: List[Tensor],
    n_probes: Optional[int] = None,
    *,
    target_rel_error: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> DiagonalEstimate:
    """Hutchinson estimate of the Hessian diagonal of func() (a scalar) in params, with its standard error.

    n_probes: Rademacher probes to draw (default 100); with target_rel_error, the most to draw (default
    10,000), stopping once the estimated relative error (DiagonalEstimate.relative_error) <= target_rel_error
    (checked after each chunk; a warning if the cap comes first). generator: a torch.Generator on the
    parameters' device, for reproducible probes. Cost: one Hessian-vector product (about one to two
    gradients) per probe.

    Returns DiagonalEstimate (diagonal, standard_error), one tensor per parameter each (zeros where the loss
    is at most linear in a parameter: its diagonal is exactly zero).
    """
    if not callable(func):
        raise TypeError(f"func must be a callable returning the loss, got {type(func).__name__}")
    params = validation.check_params(params)
    probes, cap = _check_estimate_arguments(n_probes, target_rel_error, generator, params)
    validation.check_chunking(chunk_size, memory_budget)
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        inference_tensors_explained("func"),
        attention_twice_differentiable(),
        block_cache_scope(),
        library_call(),
    ):
        return _estimate(func, params, probes, cap, target_rel_error, generator, chunk_size, memory_budget, "func")


def model_hessian_diagonal_estimate(
    model: Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: ModelInputs,
    targets: Tensor,
    n_probes: Optional[int] = None,
    *,
    target_rel_error: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> DiagonalEstimate:
    """hessian_diagonal_estimate of loss_fn(model(inputs), targets) for every tensor in model.parameters().

    For models too large for an exact diagonal. Where explain_method says the engine supports the model,
    model_hessian_diagonal is exact and usually costs less than a few dozen probes (README: curvature table).
    """
    model = validation.model_to_run(model, inputs)
    params = validation.check_model_arguments(model, loss_fn, inputs, targets)
    validation.check_not_inference_tensors(model, params)
    probes, cap = _check_estimate_arguments(n_probes, target_rel_error, generator, params)
    validation.check_chunking(chunk_size, memory_budget)
    with torch.inference_mode(False), block_cache_scope():
        called, input_tuple = validation.model_call(model, normal_inputs(inputs))
        targets = normal_tensor(targets)

        def loss_func():
            with library_forward():
                return loss_fn(called(*input_tuple), targets)

        with (
            buffers_restored(model),
            torch.enable_grad(),
            inference_tensors_explained("loss_fn"),
            attention_twice_differentiable(),
            gradient_hooks_off(called),
            library_call(),
        ):
            return _estimate(
                loss_func, params, probes, cap, target_rel_error, generator, chunk_size, memory_budget, "loss_fn"
            )


def _check_estimate_arguments(n_probes, target_rel_error, generator, params):
    """(probes to draw now, cap): without a target both are n_probes."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        devices = {p.device.type for p in params}
        if devices and generator.device.type not in devices:
            raise ValueError(f"generator is on {generator.device} but the parameters are on {sorted(devices)}")
    if n_probes is not None and (not isinstance(n_probes, int) or isinstance(n_probes, bool) or n_probes < 2):
        raise ValueError(f"n_probes must be an int >= 2 (a standard error needs two probes) or None, got {n_probes!r}")
    if target_rel_error is not None:
        if (
            isinstance(target_rel_error, bool)
            or not isinstance(target_rel_error, (int, float))
            or not 0 < target_rel_error
        ):
            raise ValueError(f"target_rel_error must be a positive number or None, got {target_rel_error!r}")
        return None, n_probes or DEFAULT_MAX_PROBES
    probes = n_probes or DEFAULT_PROBES
    return probes, probes


def _estimate(func, params, probes, cap, target, generator, chunk_size, memory_budget, source):
    loss = func()
    check_scalar_loss(loss, source)
    loss = loss.reshape(())
    grads = first_order_grads(loss, params)
    # a gradient without a graph: the loss is at most linear in that parameter, whose Hessian rows are zero
    active = [i for i, grad in enumerate(grads) if grad is not None and grad.grad_fn is not None]
    sums = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
    squares = [torch.zeros_like(s) for s in sums]
    drawn = 0
    if active:
        grad_flat = torch.cat([grads[i].reshape(-1) for i in active])
        entries = grad_flat.numel()
        like = params[active[0]]
        step = chunk_size or choose_chunk_size(
            entries,
            like.element_size(),
            saved_tensor_bytes(loss),
            entries * like.element_size(),
            memory_budget,
            like.device.type,
        )
        while drawn < cap:
            count = min(step, cap - drawn)
            if target is not None and drawn == 0:
                count = min(cap, max(count, 2))  # a standard error needs two probes
            signs = torch.randint(0, 2, (count, entries), generator=generator, device=like.device)
            vectors = signs.to(like.dtype).mul_(2).sub_(1)
            try:
                products = _batched_hvp(grad_flat, [params[i] for i in active], vectors)
            except RuntimeError as error:
                if is_out_of_memory(error) and step > 1:
                    step //= 2
                    continue
                raise
            offset = 0
            for index, product in zip(active, products):
                size = params[index].numel()
                samples = (vectors[:, offset : offset + size] * product.reshape(count, -1)).double()
                sums[index] += samples.sum(0).reshape(params[index].shape)
                squares[index] += (samples * samples).sum(0).reshape(params[index].shape)
                offset += size
            drawn += count
            if target is not None and drawn >= 2:
                mean, spread = _moments(sums, squares, drawn, params)
                if _relative_error(mean, spread) <= target:
                    break
        if target is not None and drawn >= cap:
            mean, spread = _moments(sums, squares, drawn, params)
            reached = _relative_error(mean, spread)
            if reached > target:
                warnings.warn(
                    f"torch_secorder: {drawn} probes (the cap, n_probes) reached a relative standard error "
                    f"of {reached:.3g}, not target_rel_error={target}",
                    RuntimeWarning,
                    stacklevel=3,
                )
    else:
        drawn = probes or 2
    mean, spread = _moments(sums, squares, max(drawn, 2), params)
    return DiagonalEstimate(ParameterDiagonals(mean, params), spread, drawn)


def _batched_hvp(grad_flat, params, vectors):
    """vectors (K, P) @ d(grad_flat)/d(params): a tuple of (K, *param.shape), zeros for unused parameters."""

    def one(vector):
        return torch.autograd.grad(grad_flat, params, vector, retain_graph=True, allow_unused=True)

    try:
        products = torch.func.vmap(one)(vectors)
    except RuntimeError as error:
        if is_out_of_memory(error):
            raise
        products = torch.autograd.grad(
            grad_flat, params, vectors, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    return [
        torch.zeros(vectors.shape[0], *p.shape, dtype=p.dtype, device=p.device) if product is None else product
        for p, product in zip(params, products)
    ]


def _moments(sums, squares, drawn, params):
    means, errors = [], []
    for total, square, param in zip(sums, squares, params):
        mean = total / drawn
        variance = ((square - drawn * mean * mean) / (drawn - 1)).clamp_min(0)
        means.append(mean.to(param.dtype))
        errors.append((variance / drawn).sqrt().to(param.dtype))
    return means, errors


def _relative_error(diagonal, standard_error):
    """||standard error|| / ||diag(H)||, with ||diag(H)||^2 estimated as ||estimate||^2 - ||standard error||^2
    (the estimate's expected squared norm is ||diag(H)||^2 plus its variance: dividing by ||estimate||
    would call a noise-dominated estimate accurate)."""
    squared = sum(float((d.double() ** 2).sum()) for d in diagonal)
    error = sum(float((e.double() ** 2).sum()) for e in standard_error)
    signal = squared - error
    if error == 0:
        return 0.0
    return (error / signal) ** 0.5 if signal > 0 else float("inf")
