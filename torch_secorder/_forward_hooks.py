"""Forward hooks (a module's own, or global ones): they may change what a forward computes, so a module or
loss that has one is not what its rule describes. Backward hooks change gradients, not the loss, and every
call of the library runs without them (_gradient_hooks.py)."""

from typing import Callable, List, Optional

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
