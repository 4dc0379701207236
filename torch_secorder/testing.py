"""Brute-force references for checking Hessian diagonals (slow; for tests and comparisons).

dense_hessian_diagonal builds the whole Hessian of a flat parameter vector with
reverse-over-reverse torch.func (torch.func.hessian's forward-over-reverse
fails through F.mse_loss in torch 2.13); sampled_hessian_diagonal takes one
Hessian-vector product per requested entry, for models too big for that.
"""

import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev

from ._forward_pass import attention_twice_differentiable


def _unflatten(flat, shapes):
    return [tensor[0] for tensor in _unflatten_batched(flat.unsqueeze(0), shapes)]


def dense_hessian_diagonal(loss_of_params, params):
    """Diagonal of the full Hessian of loss_of_params(*params), one tensor per parameter."""
    shapes = [p.shape for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])

    def loss_of_flat(vector):
        return loss_of_params(*_unflatten(vector, shapes))

    with attention_twice_differentiable():  # fused attention kernels have no double backward
        hessian = jacrev(jacrev(loss_of_flat))(flat)
    return _unflatten(torch.diagonal(hessian), shapes)


def sampled_hessian_diagonal(loss_of_params, params, indices):
    """H[k, k] for flat indices k of parameter i, as {(i, k): value}; one HVP per entry."""
    values = {}
    leaves = [p.detach().requires_grad_(True) for p in params]
    with attention_twice_differentiable():  # fused attention kernels have no double backward
        loss = loss_of_params(*leaves)
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    for i, k in indices:
        (row,) = torch.autograd.grad(grads[i].reshape(-1)[k], leaves[i], retain_graph=True, allow_unused=True)
        values[(i, k)] = 0.0 if row is None else row.reshape(-1)[k].item()
    return values


def model_loss_of_params(model, loss_fn, inputs, targets):
    """loss_fn(model(inputs), targets) as a function of the model's parameters (in model.parameters() order);
    inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs (a Hugging Face batch)."""
    names = [name for name, _ in model.named_parameters()]
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    keywords = inputs if isinstance(inputs, dict) else {}
    input_tuple = () if isinstance(inputs, dict) else inputs if isinstance(inputs, tuple) else (inputs,)

    def loss_of_params(*params):
        state = dict(zip(names, params))
        state.update({name: buffer.clone() for name, buffer in buffers.items()})
        return loss_fn(functional_call(model, state, input_tuple, keywords), targets)

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


def _flat_model_output(model, inputs):
    """(output, output as a function of the flat parameter vector, flat vector, shapes)."""
    params = list(model.parameters())
    names = [name for name, _ in model.named_parameters()]
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    input_tuple = inputs if isinstance(inputs, tuple) else (inputs,)
    shapes = [p.shape for p in params]

    def output_of_flat(vector):
        state = dict(zip(names, _unflatten(vector, shapes)))
        state.update({name: buffer.clone() for name, buffer in buffers.items()})
        return functional_call(model, state, input_tuple)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return output_of_flat(flat).detach(), output_of_flat, flat, shapes


def _loss_of_output(loss_fn):
    """NLL is read at the log-probabilities as cross-entropy (softmax of log-probabilities is the same
    distribution): the GGN split at the logits."""
    if isinstance(loss_fn, torch.nn.NLLLoss) or loss_fn is F.nll_loss:
        return lambda output, targets: loss_fn(torch.log_softmax(output, dim=1), targets)
    return loss_fn


def dense_ggn_diagonal(model, loss_fn, inputs, targets, per_sample=False):
    """diag(sum_n J_n^T H_nn J_n) from the full Jacobian of the model output and the loss's full Hessian in
    that output (reverse over reverse); per_sample: (N, *shape) per parameter."""
    output, output_of_flat, flat, shapes = _flat_model_output(model, inputs)
    jacobian = jacrev(output_of_flat)(flat).reshape(output.shape[0], -1, flat.numel())  # (N, D, P)
    loss = _loss_of_output(loss_fn)
    hessian = jacrev(jacrev(lambda o: loss(o.reshape(output.shape), targets)))(output.reshape(-1))
    samples, features = jacobian.shape[:2]
    blocks = hessian.reshape(samples, features, samples, features).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    per = torch.einsum("ndp,nde,nep->np", jacobian, blocks, jacobian)
    if per_sample:
        return _unflatten_batched(per, shapes)
    return _unflatten(per.sum(0), shapes)


def dense_per_sample_hessian_diagonal(model, loss_fn, inputs, targets):
    """(N, *shape) per parameter: the Hessian diagonal of the loss with only sample n's output depending on
    the parameters (the others held at their values)."""
    output, output_of_flat, flat, shapes = _flat_model_output(model, inputs)
    results = []
    for sample in range(output.shape[0]):
        mask = torch.zeros(output.shape[0], *[1] * (output.dim() - 1), dtype=output.dtype)
        mask[sample] = 1

        def loss_of_flat(vector, mask=mask):
            live = output_of_flat(vector)
            return loss_fn(output + (live - output) * mask, targets)

        results.append(torch.diagonal(jacrev(jacrev(loss_of_flat))(flat)))
    return _unflatten_batched(torch.stack(results), shapes)


def _unflatten_batched(rows, shapes):
    tensors, offset = [], 0
    for shape in shapes:
        count = 1
        for size in shape:
            count *= size
        tensors.append(rows[:, offset : offset + count].reshape(rows.shape[0], *shape))
        offset += count
    return tensors
