"""Brute-force references for checking Hessian diagonals (slow; for tests and comparisons).

dense_hessian_diagonal builds the whole Hessian of a flat parameter vector with
reverse-over-reverse torch.func (torch.func.hessian's forward-over-reverse
fails through F.mse_loss in torch 2.13); sampled_hessian_diagonal takes one
Hessian-vector product per requested entry, for models too big for that.
"""

import torch
from torch.func import functional_call, jacrev


def _unflatten(flat, shapes):
    tensors, offset = [], 0
    for shape in shapes:
        count = 1
        for size in shape:
            count *= size
        tensors.append(flat[offset:offset + count].reshape(shape))
        offset += count
    return tensors


def dense_hessian_diagonal(loss_of_params, params):
    """Diagonal of the full Hessian of loss_of_params(*params), one tensor per parameter."""
    shapes = [p.shape for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])

    def loss_of_flat(vector):
        return loss_of_params(*_unflatten(vector, shapes))

    hessian = jacrev(jacrev(loss_of_flat))(flat)
    return _unflatten(torch.diagonal(hessian), shapes)


def sampled_hessian_diagonal(loss_of_params, params, indices):
    """H[k, k] for flat indices k of parameter i, as {(i, k): value}; one HVP per entry."""
    values = {}
    leaves = [p.detach().requires_grad_(True) for p in params]
    loss = loss_of_params(*leaves)
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    for i, k in indices:
        (row,) = torch.autograd.grad(grads[i].reshape(-1)[k], leaves[i], retain_graph=True, allow_unused=True)
        values[(i, k)] = 0.0 if row is None else row.reshape(-1)[k].item()
    return values


def model_loss_of_params(model, loss_fn, inputs, targets):
    """loss_fn(model(inputs), targets) as a function of the model's parameters (in model.parameters() order)."""
    names = [name for name, _ in model.named_parameters()]
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    input_tuple = inputs if isinstance(inputs, tuple) else (inputs,)

    def loss_of_params(*params):
        state = dict(zip(names, params))
        state.update({name: buffer.clone() for name, buffer in buffers.items()})
        return loss_fn(functional_call(model, state, input_tuple), targets)

    return loss_of_params


def loop_hessian_diagonal(loss_fn, params, progress=None):
    """The original torch-secorder 0.0.1 approach: one double backward per parameter entry (slow; for comparison)."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    total, done = sum(p.numel() for p in params), 0
    diagonals = []
    for param, grad in zip(params, grads):
        diag = torch.zeros(param.numel(), dtype=param.dtype, device=param.device)
        if grad is not None and grad.grad_fn is not None:
            flat = grad.reshape(-1)
            for k in range(flat.numel()):
                (row,) = torch.autograd.grad(flat[k], param, retain_graph=True, allow_unused=True)
                if row is not None:
                    diag[k] = row.reshape(-1)[k]
                done += 1
                if progress is not None:
                    progress(done, total)
        else:
            done += param.numel()
        diagonals.append(diag.view_as(param))
    return diagonals
