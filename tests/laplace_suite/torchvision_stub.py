"""pytest plugin: a stand-in for torchvision where it cannot be imported (its CPU wheel needs a matching torch),
so that laplace-torch's test modules that import a torchvision model at the top still collect. Anything taken
from it is a placeholder that raises when used, so the few tests that build a torchvision model fail saying
why (the same in both runs of run.py)."""

import importlib.machinery
import importlib.util
import sys
import types


class _Missing:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(f"{self._name}.{name}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name}: torchvision is not installed here (tests/laplace_suite/torchvision_stub.py)")


def _stub_module(name):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec() reads it

    def placeholder(attribute):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return _Missing(f"{name}.{attribute}")

    module.__getattr__ = placeholder
    return module


if importlib.util.find_spec("torchvision") is None:
    for name in ("torchvision", "torchvision.models", "torchvision.transforms"):
        sys.modules[name] = _stub_module(name)
    sys.modules["torchvision"].models = sys.modules["torchvision.models"]
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
