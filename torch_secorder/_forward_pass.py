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

Tracing (torch.fx) patches nn.Module.__call__ for every thread while it runs, so no forward of a library call
may run meanwhile: library_call() marks a call (shared, any number of threads), exclusive_trace() waits until no
call is running its forwards (a thread's own call steps aside while it traces). A model's gradient-hook lock is
taken before library_call(), never while holding it. Forwards that threads run outside the library's calls are
not covered: tracing anywhere has that hazard.

The first two are switches installed once, on the first forward pass the library runs, in place of
Tensor.register_hook and the reentrant checkpoint's CheckpointFunction.apply; they test a per-thread flag, so
they act only on the thread that runs a library call, only during its forward passes, and cost nothing per
op (a TorchFunctionMode would add Python to every op of the forward).
"""

import threading
from collections import OrderedDict
from contextlib import contextmanager

import torch
import torch.utils.checkpoint as checkpoint_module
from torch.utils.hooks import RemovableHandle

_STATE = threading.local()
_INSTALL_LOCK = threading.Lock()
_ORIGINAL: dict = {}  # what the switches replaced


def _in_library_forward():
    return getattr(_STATE, "depth", 0) > 0


def _checkpoint_apply(function, preserve_rng_state, *args):
    if _in_library_forward():
        return function(*args)
    return _ORIGINAL["checkpoint"](function, preserve_rng_state, *args)


def _register_hook(self, hook):
    if _in_library_forward():
        _STATE.skipped_hooks = getattr(_STATE, "skipped_hooks", 0) + 1  # gradient hooks the forward would add
        return RemovableHandle(OrderedDict())  # nothing registered; removing it is a no-op
    return _ORIGINAL["register_hook"](self, hook)


def _install_switches():
    with _INSTALL_LOCK:
        if _ORIGINAL:
            return
        function_class = getattr(checkpoint_module, "CheckpointFunction", None)
        if function_class is not None:
            _ORIGINAL["checkpoint"] = function_class.apply
            function_class.apply = _checkpoint_apply
        _ORIGINAL["register_hook"] = torch.Tensor.register_hook
        torch.Tensor.register_hook = _register_hook  # type: ignore[method-assign]


def random_state(devices=()):
    """The global random state now (CPU, and the CUDA devices given), for same_random_draws."""
    cuda = [torch.device(device) for device in devices if torch.device(device).type == "cuda"]
    return torch.get_rng_state(), [(device, torch.cuda.get_rng_state(device)) for device in cuda]


@contextmanager
def same_random_draws(devices=(), state=None):
    """For a whole call: each forward pass in it starts from the random state (CPU, and the CUDA devices given)
    that the call began with, or from `state` (random_state) where given."""
    saved = getattr(_STATE, "random", None)
    _STATE.random = state if state is not None else random_state(devices)
    try:
        yield
    finally:
        _STATE.random = saved


def replay_random_state():
    """Back to the random state the call began with (same_random_draws): every library forward pass, and the
    plain backward() pass of backward=True."""
    state = getattr(_STATE, "random", None)
    if state is not None:
        torch.set_rng_state(state[0])
        for device, device_state in state[1]:
            torch.cuda.set_rng_state(device_state, device)


def skipped_hook_count():
    """How many Tensor.register_hook calls this thread's library forward passes have skipped so far."""
    return getattr(_STATE, "skipped_hooks", 0)


@contextmanager
def library_forward():
    """For a forward pass the library runs (see the module's text)."""
    if not _ORIGINAL:
        _install_switches()
    replay_random_state()
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


class _TraceGate:
    def __init__(self):
        self._condition = threading.Condition()
        self._calls = 0  # library calls running (each counted once, however nested)
        self._tracing = False
        self._waiting = 0  # traces waiting: new calls wait behind them

    @contextmanager
    def call(self):
        depth = getattr(_STATE, "calls", 0)
        if depth == 0:
            with self._condition:
                while self._tracing or self._waiting:
                    self._condition.wait()
                self._calls += 1
        _STATE.calls = depth + 1
        try:
            yield
        finally:
            _STATE.calls = depth
            if depth == 0:
                with self._condition:
                    self._calls -= 1
                    self._condition.notify_all()

    @contextmanager
    def trace(self):
        own = getattr(_STATE, "calls", 0) > 0  # this thread's call steps aside: it runs no forward meanwhile
        with self._condition:
            self._calls -= own
            self._waiting += 1
            while self._tracing or self._calls:
                self._condition.wait()
            self._waiting -= 1
            self._tracing = True
        try:
            yield
        finally:
            with self._condition:
                self._tracing = False
                self._calls += own
                self._condition.notify_all()


_GATE = _TraceGate()
library_call = _GATE.call  # around a whole library call: its forwards never overlap a trace
exclusive_trace = _GATE.trace  # around a torch.fx trace


def attention_twice_differentiable():
    """scaled_dot_product_attention's fused kernels (flash, memory-efficient) have no double backward and no
    batching rule for their backward: passes that differentiate twice (the generic method) or under vmap (the
    graph engine) record attention with the math backend (same numbers up to rounding)."""
    # lazy: imports torch.nn.attention's submodules, rarely needed
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
