"""Whether what a module runs is exactly what its rule assumes.

A rule describes the registered class's own computation. A subclass or an instance that overrides
it, a forward hook that changes inputs or outputs (a module's own hooks run around its rule and are
checked there, forward_with_hooks; a container's or a global hook rules the engine out), a
parametrization, or a weight that is not the module's own parameter make the module compute
something else, so the engine steps aside for it. torch.nn.utils.prune is the one exception:
weight = weight_orig * mask is exact to differentiate (see pruned_tensors).
"""

import functools

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod

from .._errors import Unsupported
from .._forward_hooks import HookChanged, hook_reason, run_with_hooks
from .rules import registered_base, rule_for

_CALL_METHODS = ("__call__", "_call_impl")  # overriding these changes how forward is called
_OWN_TENSORS = ("weight", "bias")


class ModuleNames:
    """id(module) -> qualified name in `model`, built on first use: only refusals read names, so the common,
    supported call does not walk the model for them."""

    def __init__(self, model):
        self._model, self._names = model, None

    def get(self, key, default=None):
        if self._names is None:
            self._names = {id(module): name for name, module in self._model.named_modules()}
        return self._names.get(key, default)


def describe_module(module, names=None):
    """How refusals name a module: its qualified name in the model (names: id -> name) and its class."""
    name = (names or {}).get(id(module)) or type(module).__name__
    return f"module {name!r} ({type(module).__name__})"


def module_parameters(module):
    """module.parameters(), each once, in order: for a module without children straight from its own table
    (nn.Module's generator walk costs more than the rest of a small model's dispatch checks)."""
    if module._modules:
        return list(module.parameters())
    return list({id(p): p for p in module._parameters.values() if p is not None}.values())


def pruned_tensors(module):
    """{name: (original parameter, mask)} for the tensors pruned with torch.nn.utils.prune: the module
    uses name = name_orig * name_mask, so the diagonal of name_orig is mask^2 times that of name."""
    pruned = {}
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, BasePruningMethod):
            name = hook._tensor_name
            pruned[name] = (getattr(module, name + "_orig"), getattr(module, name + "_mask"))
    return pruned


def has_own_forward(module):
    """True when module's class (not the instance) overrides what its rule's registered class computes with a
    forward of its own (timm's LayerNorm on F.layer_norm, BatchNormAct2d on F.batch_norm): the trace reads that
    forward, op by op, instead of keeping the module whole under the rule."""
    base = registered_base(module)
    if base is None:
        return False
    methods = rule_for(module).forward_methods
    if any(name in vars(module) for name in methods + _CALL_METHODS):
        return False  # replaced on the instance: refused by name (module_reason)
    if _overridden(module, base, _CALL_METHODS) is not None:
        return False  # a changed __call__ (hooks aside) is not a forward fx can read
    return _overridden(module, base, methods) is not None


def _overridden(module, base, names):
    """The first of names that module's class defines otherwise than base, or None."""
    return next((name for name in names if getattr(type(module), name, None) is not getattr(base, name, None)), None)


def _override_reason(module, base, methods):
    for name in methods:
        if name in vars(module):
            return f"{name} replaced on the instance"
    name = _overridden(module, base, methods + _CALL_METHODS)
    return None if name is None else f"{type(module).__name__} overrides {base.__name__}.{name}"


def _foreign_tensor_reason(module):
    for name in _OWN_TENSORS:
        # a tensor that is neither a parameter nor a buffer lives in the instance's __dict__
        if isinstance(vars(module).get(name), torch.Tensor) and name not in pruned_tensors(module):
            return f"its {name} is a plain tensor attribute, not a registered parameter or buffer"
    return None


def _is_parametrized(module):
    # what parametrize.is_parametrized checks, without nn.Module.__getattr__'s exception for the common "no"
    return "parametrizations" in module._modules and parametrize.is_parametrized(module)


def module_reason(module, base, methods, hooks_run=False):
    """None when module computes exactly what the rule for its registered class `base` assumes, else why not.
    methods: the names of base's methods that decide what it computes (Rule.forward_methods). hooks_run: the
    engine runs the module's own forward hooks around the rule (forward_with_hooks), else they rule it out."""
    if _is_parametrized(module):
        return "a parametrization (torch.nn.utils.parametrize); remove it or use method='autograd'"
    hooked = None if hooks_run else hook_reason(module)
    return _override_reason(module, base, methods) or hooked or _foreign_tensor_reason(module)


def forward_with_hooks(rule, module, x, describe):
    """rule.forward(module, x) with the module's own forward hooks run around it; describe() names the module
    where a hook changes what it computes (Unsupported)."""
    if not module._forward_hooks and not module._forward_pre_hooks:
        return rule.forward(module, x)
    try:
        return run_with_hooks(module, x, functools.partial(rule.forward, module))
    except HookChanged as error:
        raise Unsupported(f"{describe()}: {error}") from None


def container_reason(container):
    """None when an nn.Sequential (or a subclass) runs its children one after another, unchanged."""
    return module_reason(container, nn.Sequential, ("forward", "__iter__"))
