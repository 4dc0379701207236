"""Mean squared error: H = 2 / F per element (F the mean normaliser)."""

from typing import Callable, ClassVar, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .elementwise import ElementwiseLoss, sampled_noise


class MSE(ElementwiseLoss):
    name = "mse"
    module: ClassVar[Type[nn.Module]] = nn.MSELoss
    function: ClassVar[Callable[..., Tensor]] = F.mse_loss
    option_defaults = {"reduction": "mean"}

    def hessian_diagonal(self, output: Tensor, targets: Tensor) -> Tensor:
        return ops.mse_loss_hessian_diag(output, self.options["reduction"])

    def sampled_columns(
        self, output: Tensor, targets: Tensor, draws: int, generator: Optional[torch.Generator]
    ) -> Tensor:
        # y ~ N(f, F / 2) per element: the Gaussian whose negative log-likelihood is the loss (up to a constant)
        return sampled_noise(output, draws, generator) * (2.0 / (self.mean_normaliser(output, targets) * draws)) ** 0.5
