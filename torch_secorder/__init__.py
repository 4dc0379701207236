"""torch_secorder: exact Hessian diagonals for PyTorch models."""

from . import ops
from .core.curvatures import model_fisher_diagonal, model_ggn_diagonal
from .core.estimate import DiagonalEstimate, hessian_diagonal_estimate, model_hessian_diagonal_estimate
from .core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from .core.method_choice import MethodChoice, explain_method

__version__ = "0.1.0"
__all__ = [
    "hessian_diagonal",
    "model_hessian_diagonal",
    "model_ggn_diagonal",
    "model_fisher_diagonal",
    "hessian_diagonal_estimate",
    "model_hessian_diagonal_estimate",
    "DiagonalEstimate",
    "explain_method",
    "MethodChoice",
    "ops",
    "__version__",
]
