"""backward=True: a call that also does loss.backward()'s work, so a curvature step costs one call.

The engine takes the parameters' gradients from its own forward pass, in the backward it runs anyway for its
curved nodes (gradients.py); the generic method computes them with one more forward and backward. Either way
the gradient of the loss as the forward defines it, accumulated into .grad through autograd, so post-accumulate
hooks run as in backward(). Where gradient hooks would change what backward() leaves in .grad (module backward
hooks, hooks on the parameters, global backward hooks, Tensor.register_hook inside the forward), the .grad comes
from one plain forward and backward with those hooks, on the same random draw as the diagonal.
"""

import contextlib

import torch

from .. import _forward_pass as forward_pass
from ._generic import buffers_restored


@contextlib.contextmanager
def watching_hook_registrations():
    """Yields a function that says whether a library forward pass in the block skipped a Tensor.register_hook."""
    before = forward_pass.skipped_hook_count()
    yield lambda: forward_pass.skipped_hook_count() != before


def aligned(asked, values, params):
    """The gradients `values` of the parameters `asked` as one entry per parameter in params (None where a
    parameter was not asked for or the loss does not reach it)."""
    found = {id(p): g for p, g in zip(asked, values or [])}
    return [found.get(id(p)) for p in params]


def of_loss(call):
    """(loss, gradients aligned with call.params) from one forward and backward, gradient hooks kept out."""
    trainable = [p for p in call.params if p.requires_grad]
    with buffers_restored(call.model), torch.enable_grad():
        with forward_pass.library_forward():
            loss = call.loss_fn(call.model(*call.inputs), call.targets)
        grads = torch.autograd.grad(loss, trainable, allow_unused=True) if loss.requires_grad and trainable else ()
    return loss.detach(), aligned(trainable, grads, call.params)


def backward_with_hooks(call):
    """loss.backward() as the user's own step would run it, hooks and all, on the call's random draw: the loss."""
    forward_pass.replay_random_state()
    with buffers_restored(call.model), torch.enable_grad():
        loss = call.loss_fn(call.model(*call.inputs), call.targets)
        if loss.requires_grad:
            loss.backward()
    return loss.detach()


def check_no_all_reduce(all_reduce):
    if all_reduce:
        raise ValueError(
            "backward=True with all_reduce=True on a model whose gradient hooks change its gradients: call "
            "backward() through the DistributedDataParallel wrapper instead, and all_reduce=True without backward"
        )


def dense(grads, params):
    """Zeros where the loss does not reach a parameter: every rank reduces the same tensors."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def accumulate(params, grads):
    """Each gradient into its parameter's .grad as backward() accumulates it (post-accumulate hooks run)."""
    pairs = [(p, g.detach()) for p, g in zip(params, grads) if g is not None and p.requires_grad]
    if pairs:
        torch.autograd.backward([p for p, _ in pairs], grad_tensors=[g for _, g in pairs])
