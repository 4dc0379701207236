"""Loads torchvision's model definitions where torchvision's C ops cannot load against this torch (the CPU wheel
beside another torch). Imported by tests/conftest.py, and at start-up by the examples' subprocesses in
tests/test_examples.py (this folder on their PYTHONPATH), so that laplace-torch and timm, which import
torchvision, import there too. Nothing happens where torchvision is absent or imports as it is."""

import importlib.util
import sys
import types


def _load_torchvision_models_only():
    """torchvision's CPU wheel does not import against another torch: its module _meta_registrations registers
    fake kernels for C ops that did not load ("operator torchvision::nms does not exist"). Its model definitions
    are plain Python, so where that import fails the module is replaced by an empty one and torchvision imported
    again (its C ops stay unusable). laplace-torch and timm import torchvision; the model zoo tests use it."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision
    except RuntimeError:
        for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401


_load_torchvision_models_only()
