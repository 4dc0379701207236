"""The exact Hessian-backpropagation engine for chains of known layers (see engine.py)."""

from .engine import Unsupported, backprop_hessian_diagonal, check_supported, curved_nodes

__all__ = ["Unsupported", "backprop_hessian_diagonal", "check_supported", "curved_nodes"]
