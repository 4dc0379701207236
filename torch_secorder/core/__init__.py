from .dispatch import MethodChoice, explain_method
from .hessian_diagonal import hessian_diagonal, model_hessian_diagonal

__all__ = ["hessian_diagonal", "model_hessian_diagonal", "explain_method", "MethodChoice"]
