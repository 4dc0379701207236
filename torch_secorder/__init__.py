"""torch_secorder: exact Hessian diagonals for PyTorch models."""

from . import ops
from .core.dispatch import MethodChoice, explain_method
from .core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal

__version__ = "0.1.0"
__all__ = ["hessian_diagonal", "model_hessian_diagonal", "explain_method", "MethodChoice", "ops", "__version__"]
