"""Argument checks of the public API: clear errors that name the argument, raised before any autograd work."""

import collections.abc
import inspect
import weakref
from typing import Any, List, Mapping, Tuple, Union

import torch
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from .._forward_pass import library_call

METHODS = ("auto", "autograd", "backprop")

# What a model is called with: a tensor, a tuple of positional arguments (nested tuples / lists / dicts of
# tensors), or a dict of keyword arguments (model(**inputs): Hugging Face-style batches).
ModelInputs = Union[torch.Tensor, Tuple[Any, ...], List[Any], Mapping[str, Any]]


def check_method(method, for_model=True):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "backprop" and not for_model:
        raise ValueError("method='backprop' needs a model and a loss: use model_hessian_diagonal")


def check_params(params):
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be a list of tensors, got a single tensor: pass [tensor]")
    try:
        params = list(params)
    except TypeError:
        raise TypeError(f"params must be a list of tensors, got {type(params).__name__}") from None
    for index, param in enumerate(params):
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"params[{index}] must be a tensor, got {type(param).__name__}")
        if not param.is_floating_point():
            raise TypeError(f"params[{index}] must be a floating-point tensor, got dtype {param.dtype}")
        if param.is_inference():
            raise RuntimeError(
                f"params[{index}] was created under torch.inference_mode(), which disables autograd "
                "for it for good: create it outside inference_mode"
            )
    return params


def check_chunking(chunk_size, memory_budget):
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not isinstance(memory_budget, int) or isinstance(memory_budget, bool) or memory_budget < 1:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")


def check_v(v, params):
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        raise TypeError("v must be a list of tensors (one per parameter), got a single tensor")
    v = list(v)
    if len(v) != len(params):
        raise ValueError(f"v must have one tensor per parameter: got {len(v)} tensors for {len(params)} params")
    for index, (vec, param) in enumerate(zip(v, params)):
        if not isinstance(vec, torch.Tensor):
            raise TypeError(f"v[{index}] must be a tensor, got {type(vec).__name__}")
        if vec.shape != param.shape:
            raise ValueError(
                f"v[{index}] has shape {tuple(vec.shape)} but params[{index}] has shape {tuple(param.shape)}"
            )
        if vec.device != param.device:
            raise ValueError(f"v[{index}] is on {vec.device} but params[{index}] is on {param.device}")
        if vec.dtype != param.dtype:
            raise ValueError(f"v[{index}] has dtype {vec.dtype} but params[{index}] has dtype {param.dtype}")
    return v


def _floating_dtype(tensors):
    for tensor in tensors:
        if tensor.is_floating_point():
            return tensor.dtype
    return None


class KeywordCall(torch.nn.Module):
    """model(**inputs) for dict inputs (Hugging Face-style batches), called with the values positionally: the
    same parameters in the same order, the same buffers and modes."""

    def __init__(self, model, keys):
        super().__init__()
        self.model, self.keys = model, tuple(keys)

    def forward(self, *values):
        return self.model(**dict(zip(self.keys, values)))


class OneKeywordCall(KeywordCall):
    def forward(self, value):  # one named input: a traceable signature, so the engine can still take the model
        return self.model(**{self.keys[0]: value})


# model -> {keys: wrapper}: one per model and keys (the engine's plan cache)
_WRAPPERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_call(model, inputs):
    """(the module to call with positional arguments, those arguments as a tuple): dicts become keyword calls."""
    if isinstance(inputs, dict):
        if not all(isinstance(key, str) for key in inputs):
            raise TypeError("inputs as a dict must have string keys (model(**inputs) is called)")
        keys = tuple(inputs)
        wrappers = _WRAPPERS.setdefault(model, {})
        if keys not in wrappers:
            wrappers[keys] = (OneKeywordCall if len(keys) == 1 else KeywordCall)(model, keys)
        return wrappers[keys], tuple(inputs.values())
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def tensor_leaves(value):
    """The tensors in a nested input structure: pytree's containers and any Mapping (UserDict, Hugging Face's
    BatchEncoding), whose values pytree would not look into."""
    if isinstance(value, torch.Tensor):  # the common call, without pytree's walk
        return [value]
    found = []
    for leaf in torch.utils._pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif isinstance(leaf, collections.abc.Mapping):
            found += tensor_leaves(list(leaf.values()))
    return found


def check_model_arguments(model, loss_fn, inputs, targets):
    """Checks the model call's arguments: inputs a tensor, a tuple / list of positional model arguments or a dict
    (see model_call), each a tensor or any nested tuple / list / dict / mapping of tensors and other values.
    Returns list(model.parameters()), which the checks walk the model for anyway."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (an nn.Module loss or a function), got {type(loss_fn).__name__}")
    keyed = isinstance(inputs, dict)
    several = isinstance(inputs, (tuple, list)) or keyed
    input_tuple = tuple(inputs.values()) if keyed else tuple(inputs) if several else (inputs,)
    names = list(inputs) if keyed else []

    def input_name(index):
        return f"inputs[{names[index]!r}]" if keyed else f"inputs[{index}]" if several else "inputs"

    tensors_of = [tensor_leaves(value) for value in input_tuple]  # one walk per argument
    for index, (value, tensors) in enumerate(zip(input_tuple, tensors_of)):
        if not tensors:
            raise TypeError(
                f"{input_name(index)} must be a tensor (or a structure of tensors), got {type(value).__name__}"
            )
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")

    leaves = [leaf for tensors in tensors_of for leaf in tensors]
    first = leaves[0] if leaves else None
    if first is not None and first.dim() > 0 and targets.dim() > 0 and first.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets disagree on the batch size: inputs has {first.shape[0]} samples "
            f"(shape {tuple(first.shape)}), targets has {targets.shape[0]} (shape {tuple(targets.shape)})"
        )

    params = list(model.parameters())
    model_devices = {p.device for p in params}
    if len(model_devices) == 1:
        (model_device,) = model_devices
        for index, tensors in enumerate(tensors_of):
            for tensor in tensors:
                if tensor.device != model_device:
                    raise ValueError(
                        f"{input_name(index)} is on {tensor.device} but the model's parameters are on {model_device}"
                    )
    if first is not None and targets.device != first.device:
        raise ValueError(f"targets is on {targets.device} but inputs is on {first.device}")

    model_dtype = _floating_dtype(params)
    input_dtype = _floating_dtype(leaves)
    if model_dtype is not None and input_dtype is not None and input_dtype != model_dtype:
        raise ValueError(f"inputs has dtype {input_dtype} but the model's parameters have dtype {model_dtype}")
    # targets of another floating dtype are the loss function's business: F.mse_loss and friends promote them
    return params


def check_progress(progress):
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable progress(done, total) or None, got {type(progress).__name__}")


def check_not_inference_tensors(model, params):
    """Parameters or buffers created under torch.inference_mode can never take part in autograd.
    params: list(model.parameters()), as check_model_arguments returns it (names are looked up only on failure)."""
    if not any(tensor.is_inference() for tensors in (params, model.buffers()) for tensor in tensors):
        return
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.is_inference():
                raise RuntimeError(
                    f"model {kind} {name!r} was created under torch.inference_mode(), which disables autograd for "
                    "it for good: build the model outside inference_mode"
                )


def check_flag(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def model_to_run(model, inputs, sync_buffers=True):
    """The module the library computes with: the module inside a wrapper that only forwards to it (unwrapped),
    Lazy modules initialised by one forward without gradients (what the model's first call would do), and a
    first check that `inputs` fits its forward. sync_buffers: do what DistributedDataParallel's forward does
    before the inner module runs (rank 0's buffers to every rank); explain_method computes nothing and does not."""
    model = unwrapped(model, sync_buffers, inputs)
    _check_call_fits(model, inputs)
    if any(torch.nn.parameter.is_lazy(p) for p in model.parameters()):
        _materialise(model, inputs)
    return model


def unwrapped(model, sync_buffers=False, inputs=None):
    """The module that wrappers run on the whole batch, with the same parameters in the same order:
    torch.compile's OptimizedModule (the compiled one runs the same forward, but aot_autograd has no double
    backward), DistributedDataParallel and DataParallel (their reducers, buckets and scatters serve backward()
    and devices, not the loss; running them here would leave DDP's reducer waiting for a backward that never
    comes), swa_utils.AveragedModel (EMA / SWA: its forward is the averaged module's), a class whose forward is
    `return self.<its one child>(*args, **kwargs)` (which torch.fx cannot trace). A wrapper stays where its
    forward adds something: its own hooks, a subclass's forward, DDP's mixed precision, DataParallel over
    several devices in train mode (each replica's batch statistics and dropout draws are its own) or with inputs
    (the call's, where given) not on its first device (its scatter moves them there)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    while True:
        inner = _forwarded_to(model, inputs)
        if inner is None:
            return model
        sync = _buffer_sync(model) if sync_buffers else None
        if sync is not None:
            sync()  # as DDP's forward would: every rank computes with rank 0's buffers
        model = inner


def _has_own_hooks(model):
    """Hooks on the wrapper itself run in its forward or its backward: it stays."""
    return bool(model._forward_hooks or model._forward_pre_hooks or model._backward_hooks or model._backward_pre_hooks)


def _forwarded_to(model, inputs=None):
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        return model._orig_mod  # found without importing torch._dynamo
    if _has_own_hooks(model):
        return None
    for wrapper in (DistributedDataParallel, DataParallel, AveragedModel):
        if isinstance(model, wrapper) and type(model).forward is wrapper.forward:
            devices = list(getattr(model, "device_ids", None) or [])
            if wrapper is DataParallel and len(devices) > 1 and model.training:
                return None
            if wrapper is DataParallel and devices and inputs is not None and not _all_on(inputs, model.src_device_obj):
                return None  # its scatter moves the inputs to its first device: the wrapper runs
            if wrapper is DistributedDataParallel and getattr(model, "mixed_precision", None) is not None:
                return None
            return model.module
    return _forwarding_child(model)


def _passes_everything_on(self, *args, **kwargs):  # what a forward that only forwards compiles to (_FORWARDING)
    return self.child(*args, **kwargs)


_FORWARDING = _passes_everything_on.__code__


def _forwarding_child(model):
    """The one child of a wrapper whose forward is written `def forward(self, *args, **kwargs): return
    self.<child>(*args, **kwargs)` (any names for args and kwargs), found by its bytecode: no forward is run, so
    nothing is drawn from the random state and no hook is put where another thread's trace would see it."""
    code = getattr(getattr(type(model), "forward", None), "__code__", None)  # (TorchScript's raises on access)
    if (
        code is None
        or "forward" in vars(model)
        or model._parameters
        or code.co_code != _FORWARDING.co_code
        or code.co_flags != _FORWARDING.co_flags
        or code.co_argcount != 1
        or code.co_consts != _FORWARDING.co_consts
        or len(code.co_names) != 1
        or len(model._modules) != 1
    ):
        return None
    child = model._modules.get(code.co_names[0])
    return child if isinstance(child, torch.nn.Module) else None


def _all_on(inputs, device):
    return all(t.device == device for t in tensor_leaves(inputs))


def _buffer_sync(model):
    """DistributedDataParallel's buffer broadcast where its forward would run one first, else None."""
    check, sync = getattr(model, "_check_sync_bufs_pre_fwd", None), getattr(model, "_sync_buffers", None)
    if isinstance(model, DistributedDataParallel) and callable(check) and callable(sync) and check():
        return sync
    return None


def _check_call_fits(model, inputs):
    """A tuple or list of inputs is the model's positional arguments: one that its forward cannot take (the whole
    (x, y) batch passed as inputs) is named here, before any fallback or trace."""
    if not isinstance(inputs, (tuple, list, dict)) or len(inputs) < 2:
        return
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(**inputs) if isinstance(inputs, dict) else signature.bind(*inputs)
    except TypeError as error:
        given = (
            f"a dict with keys {list(inputs)}"
            if isinstance(inputs, dict)
            else f"a {type(inputs).__name__} of {len(inputs)}"
        )
        raise ValueError(
            f"inputs is {given}, which {type(model).__name__}.forward{signature} cannot take ({error}): "
            "a tuple or list is the model's positional arguments (model(*inputs)), a dict its keyword "
            "arguments; for a batch (x, y) pass inputs=x, targets=y"
        ) from None


def _materialise(model, inputs):
    modes = [(module, module.training) for module in model.modules()]
    model.eval()  # no running statistics updated by this extra forward
    try:
        called, input_tuple = model_call(model, inputs)
        with torch.no_grad(), library_call():
            called(*input_tuple)
    finally:
        for module, training in modes:
            module.train(training)
