"""Forward hooks (a module's own, or global ones): they may change what a forward computes. A module with a rule
runs its own hooks around the rule's forward (run_with_hooks): hooks that watch are part of what runs, hooks
that change the input or output are named and the engine steps aside; elsewhere (containers, global hooks) a
hook rules the engine out. Backward hooks change gradients, not the loss, and every
call of the library runs without them (_gradient_hooks.py)."""

from typing import Any, Callable, List, Optional

import torch
import torch.nn.modules.module as module_globals
from torch.nn.utils.prune import BasePruningMethod

_HOOKS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"))
_GLOBAL_HOOKS = (("_global_forward_pre_hooks", "forward pre-hook"), ("_global_forward_hooks", "forward hook"))


def _hook_name(hook: object) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__name__


def global_hooks() -> List[Callable]:
    """Every global module hook (torch.nn.modules.module.register_module_*_hook) now registered."""
    return [
        hook for attribute, _ in _GLOBAL_HOOKS for hook in (getattr(module_globals, attribute, None) or {}).values()
    ]


def global_hook_reason() -> Optional[str]:
    """Why global module hooks (torch.nn.modules.module.register_module_*_hook) rule the engine out, or None."""
    for attribute, kind in _GLOBAL_HOOKS:
        for hook in (getattr(module_globals, attribute, None) or {}).values():
            return f"a global module {kind} ({_hook_name(hook)})"
    return None


def hook_reason(module: torch.nn.Module) -> Optional[str]:
    """Why the module's own hooks rule it out, or None; pruning pre-hooks are allowed (see pruned_tensors)."""
    for attribute, kind in _HOOKS:
        for hook in (getattr(module, attribute, None) or {}).values():
            if attribute == "_forward_pre_hooks" and isinstance(hook, BasePruningMethod):
                continue
            return f"a {kind} ({_hook_name(hook)})"
    return None


def run_with_hooks(module: torch.nn.Module, x: torch.Tensor, forward: Callable) -> Any:
    """forward(x) (what the rule computes for module(x)) with the module's own forward hooks run around it in the
    order nn.Module.__call__ runs them, so that hooks which watch (record activations, count calls) see the
    engine's forward as they see the model's. Raises HookChanged naming a hook that replaces or overwrites the
    input or the output: the rule would no longer describe what runs."""
    for key, hook in list(module._forward_pre_hooks.items()):  # pruning's too: it sets the weight the rule reads
        version = x._version
        if key in module._forward_pre_hooks_with_kwargs:
            result = hook(module, (x,), {})
            changed = result is not None and not (_same(result[0], (x,)) and not result[1])
        else:
            result = hook(module, (x,))
            changed = result is not None and not _same(result, (x,))
        if changed or x._version != version:
            raise HookChanged(f"a forward pre-hook ({_hook_name(hook)}) that changes the input")
    result = forward(x)
    output = result[0] if isinstance(result, tuple) else result
    for key, hook in list(module._forward_hooks.items()):
        version = output._version
        if key in module._forward_hooks_with_kwargs:
            returned = hook(module, (x,), {}, output)
        else:
            returned = hook(module, (x,), output)
        if (returned is not None and returned is not output) or output._version != version:
            raise HookChanged(f"a forward hook ({_hook_name(hook)}) that changes the output")
    return result


def _same(value: Any, inputs: tuple) -> bool:
    """A pre-hook's result that passes the inputs on as they are."""
    if not isinstance(value, tuple):
        value = (value,)
    return len(value) == len(inputs) and all(a is b for a, b in zip(value, inputs))


class HookChanged(Exception):
    """A module's forward hook changed what the module computes; the message names it."""
