"""Which supported loss a loss_fn is (module or functional form, functools.partial with options)."""

import functools
from typing import Dict, Type, Union

import torch.nn as nn

from .._forward_hooks import hook_reason
from .base import Loss
from .bce_with_logits import BCEWithLogits
from .cross_entropy import NLL, CrossEntropy
from .mse import MSE

LOSSES = (MSE, CrossEntropy, BCEWithLogits, NLL)
_BY_MODULE: Dict[type, Type[Loss]] = {loss.module: loss for loss in LOSSES}
_BY_FUNCTION: Dict[object, Type[Loss]] = {loss.function: loss for loss in LOSSES}


def recognise(loss_fn: object) -> Union[Loss, str]:
    """A Loss for a supported loss, or a string saying why it is not supported."""
    kind, given = None, {}
    if isinstance(loss_fn, nn.Module):
        kind = _BY_MODULE.get(type(loss_fn))  # the exact class: a subclass may compute something else
        if kind is not None:
            given = {name: getattr(loss_fn, name) for name in kind.option_defaults if hasattr(loss_fn, name)}
            hooked = hook_reason(loss_fn)
            if hooked is not None:
                return f"loss {type(loss_fn).__name__} with {hooked}"
    else:
        function, keywords = loss_fn, {}
        if isinstance(loss_fn, functools.partial) and not loss_fn.args:
            function, keywords = loss_fn.func, dict(loss_fn.keywords)
        kind = _BY_FUNCTION.get(function)
        if kind is not None:
            unknown = set(keywords) - set(kind.option_defaults)
            if unknown:
                return f"loss option(s) {sorted(unknown)} of {kind.function.__name__}"
            given = keywords
    if kind is None:
        name = type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else getattr(loss_fn, "__name__", repr(loss_fn))
        return f"loss {name} (supported: MSE, cross-entropy, BCE-with-logits, NLL after LogSoftmax)"
    options = {name: given.get(name, default) for name, default in kind.option_defaults.items()}
    if options["reduction"] not in ("mean", "sum"):
        return f"reduction={options['reduction']!r} (the loss must be a scalar: 'mean' or 'sum')"
    return kind(options)
