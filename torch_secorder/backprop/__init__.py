"""The exact Hessian-backpropagation engine for chains of known layers (see engine.py)."""

from .engine import Unsupported, backprop_hessian_diagonal, check_supported

__all__ = ["Unsupported", "backprop_hessian_diagonal", "check_supported"]
