"""The supported losses, below both methods: what each loss is (its options), its per-sample Hessian in the
model output as factors, its Fisher columns, and what reduction='mean' divides by. One class per loss kind
(mse.py, cross_entropy.py, bce_with_logits.py); recognise.py maps a loss_fn to an instance of one."""

from .base import Loss, OutputFactor, check_scalar_loss
from .recognise import recognise
from .request import HESSIAN, CurvatureRequest, fisher_columns

__all__ = ["HESSIAN", "CurvatureRequest", "Loss", "OutputFactor", "check_scalar_loss", "fisher_columns", "recognise"]
