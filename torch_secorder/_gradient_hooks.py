"""Gradient hooks are not part of the loss: the library's own forward and backward passes run without them.

A diagonal is that of the loss the forward defines. Hooks that change gradients (a tensor hook on a
parameter that clips or scales it, a module backward hook that scales grad_input, a gradient-reversal
hook registered on an activation) would otherwise enter the generic method's Hessian-vector products
(a hook g -> 2g gives 4x the Hessian) and the engine's first-order gradients, and they would see the
library's internal gradients as if they were the user's. So, for the length of a call:

- the model's module backward hooks and backward pre-hooks (and the global ones) are set aside;
- the hooks on the model's parameters are emptied in place (the dict autograd reads) and put back;
- Tensor.register_hook called during the library's forward passes (a forward hook or a forward that
  registers one on an activation) registers nothing (forward_pass.py).

Calls on a model with such hooks hold that model's lock meanwhile: while one runs, other threads' forwards and
backwards through the same model also run without those hooks (documented in the README). Calls on a model
without them change nothing and run side by side.
"""

import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager

import torch.nn.modules.module as module_globals

_GLOBAL_BACKWARD = ("_global_backward_hooks", "_global_backward_pre_hooks")
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its RLock
_LOCKS_GUARD = threading.Lock()
_GLOBALS_LOCK = threading.RLock()
# model -> how many calls have its hooks set aside now
_SETTING_ASIDE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _has_gradient_hooks(modules):
    return any(
        module._backward_hooks
        or module._backward_pre_hooks
        or any(p is not None and p._backward_hooks for p in module._parameters.values())
        for module in modules
    )


def changes_gradients(model):
    """True when hooks would change what backward() leaves in the model's .grad: module backward hooks and
    pre-hooks, hooks on its parameters, global backward hooks."""
    return _has_gradient_hooks(list(model.modules())) or any(
        getattr(module_globals, name, None) for name in _GLOBAL_BACKWARD
    )


@contextmanager
def gradient_hooks_off(model):
    """The model's module backward hooks, its parameters' tensor hooks and the global backward hooks set aside
    for the block (restored after it, whatever happens). Calls on a model without such hooks take no lock and
    may run at the same time; the others hold the model's lock."""
    modules = list(model.modules())
    with _LOCKS_GUARD:  # one look at both: a call setting hooks aside counts itself before it touches them
        untouched = _SETTING_ASIDE.get(model, 0) == 0 and not _has_gradient_hooks(modules)
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
    if untouched:
        with _global_backward_hooks_off():
            yield
        return
    with lock, _global_backward_hooks_off():
        with _LOCKS_GUARD:
            _SETTING_ASIDE[model] = _SETTING_ASIDE.get(model, 0) + 1
        saved_modules = [(module, module._backward_hooks, module._backward_pre_hooks) for module in modules]
        try:
            for module in modules:
                module._backward_hooks, module._backward_pre_hooks = OrderedDict(), OrderedDict()
            with tensor_hooks_off(p for module in modules for p in module._parameters.values() if p is not None):
                yield
        finally:
            for module, backward, backward_pre in saved_modules:
                module._backward_hooks, module._backward_pre_hooks = backward, backward_pre
            with _LOCKS_GUARD:
                _SETTING_ASIDE[model] -= 1


@contextmanager
def tensor_hooks_off(tensors):
    """The tensor hooks of `tensors` (leaf parameters) emptied for the block: the very dicts autograd calls are
    cleared, not replaced, and refilled after it."""
    unique = {id(t): t for t in tensors if t._backward_hooks}
    saved = [(t._backward_hooks, list(t._backward_hooks.items())) for t in unique.values()]
    try:
        for hooks, _ in saved:
            hooks.clear()
        yield
    finally:
        for hooks, items in saved:
            hooks.update(items)


@contextmanager
def _global_backward_hooks_off():
    if not any(getattr(module_globals, name, None) for name in _GLOBAL_BACKWARD):
        yield
        return
    with _GLOBALS_LOCK:
        saved = {name: getattr(module_globals, name) for name in _GLOBAL_BACKWARD if hasattr(module_globals, name)}
        try:
            for name in saved:
                setattr(module_globals, name, OrderedDict())
            yield
        finally:
            for name, hooks in saved.items():
                setattr(module_globals, name, hooks)
