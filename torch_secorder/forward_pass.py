"""What the library's own forward passes change about the forward as written: nothing in the loss.

- Tensor.register_hook inside them (a forward hook or a forward that puts a gradient hook on an activation)
  registers nothing: gradient hooks are not part of the loss (gradient_hooks.py sets the others aside).
- torch.utils.checkpoint(..., use_reentrant=True) runs its function directly. The reentrant variant hides
  the parameters inside it from torch.autograd.grad (their gradients come back None, or PyTorch raises),
  though the loss depends on them; called directly it computes the same values with a graph that reaches
  them. The non-reentrant variant needs nothing: autograd.grad and double backward go through it.

Both apply only to the thread that runs the library's call.
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
def library_forward():
    """For a forward pass the library runs (see the module's text)."""
    if _ORIGINAL_APPLY is None:
        _install_checkpoint_switch()
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        with _NoTensorHooks():
            yield
    finally:
        _STATE.depth -= 1
