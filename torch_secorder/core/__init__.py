from .curvatures import model_fisher_diagonal, model_ggn_diagonal
from .estimate import DiagonalEstimate, hessian_diagonal_estimate, model_hessian_diagonal_estimate
from .hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from .method_choice import MethodChoice, explain_method

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
]
