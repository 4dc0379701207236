"""What the library's own forward passes change about the forward as written: nothing in the loss.

- Tensor.register_hook inside them (a forward hook or a forward that puts a gradient hook on an activation)
  registers nothing: gradient hooks are not part of the loss (gradient_hooks.py sets the others aside).
- torch.utils.checkpoint(..., use_reentrant=True) runs its function directly. The reentrant variant hides
  the parameters inside it from torch.autograd.grad (their gradients come back None, or PyTorch raises),
  though the loss depends on them; called directly it computes the same values with a graph that reaches
  them. The non-reentrant variant needs nothing: autograd.grad and double backward go through it.

- Inside a call (same_random_draws), every forward pass starts from the random state the call began with: all
  passes of a call (the generic method runs several: a reference output, one pass per sample for per-sample
  diagonals) see the same dropout masks, the ones the model's own next forward would have drawn.

All of these apply only to the thread that runs the library's call.
"""

import threading
from collections import OrderedDict
from contextlib import contextmanager

import torch
import torch.utils.checkpoint as checkpoint_module
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

_STATE = threading.local()
_INSTALL_LOCK = threading.Lock()
_ORIGINAL_APPLY = None


class _NoTensorHooks(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.register_hook:
            return RemovableHandle(OrderedDict())  # nothing registered; removing it is a no-op
        return func(*args, **(kwargs or {}))


def _checkpoint_apply(function, preserve_rng_state, *args):
    """CheckpointFunction.apply as installed: the original outside the library's forward passes."""
    if getattr(_STATE, "depth", 0):
        return function(*args)
    return _ORIGINAL_APPLY(function, preserve_rng_state, *args)


def _install_checkpoint_switch():
    global _ORIGINAL_APPLY
    with _INSTALL_LOCK:
        function_class = getattr(checkpoint_module, "CheckpointFunction", None)
        if _ORIGINAL_APPLY is None and function_class is not None:
            _ORIGINAL_APPLY = function_class.apply
            function_class.apply = _checkpoint_apply


@contextmanager
def same_random_draws(devices=()):
    """For a whole call: each forward pass in it starts from the random state (CPU, and the CUDA devices given)
    that the call began with."""
    cuda = [torch.device(device) for device in devices if torch.device(device).type == "cuda"]
    saved = getattr(_STATE, "random", None)
    _STATE.random = (torch.get_rng_state(), [(device, torch.cuda.get_rng_state(device)) for device in cuda])
    try:
        yield
    finally:
        _STATE.random = saved


def _replay_random_state():
    state = getattr(_STATE, "random", None)
    if state is not None:
        torch.set_rng_state(state[0])
        for device, device_state in state[1]:
            torch.cuda.set_rng_state(device_state, device)


@contextmanager
def library_forward():
    """For a forward pass the library runs (see the module's text)."""
    if _ORIGINAL_APPLY is None:
        _install_checkpoint_switch()
    _replay_random_state()
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        with _NoTensorHooks():
            yield
    finally:
        _STATE.depth -= 1
