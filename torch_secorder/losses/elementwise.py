"""Losses that sum a function of each output element and its target: their Hessian in the output is diagonal."""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .base import Loss, OutputFactor


class ElementwiseLoss(Loss):
    """The targets have the output's shape (a broadcast target couples elements: no exact rule)."""

    def hessian_diagonal(self, output: Tensor, targets: Tensor) -> Tensor:
        """The loss's Hessian diagonal in the output, shaped like it."""
        raise NotImplementedError

    def output_reason(self, output: Tensor, targets: Tensor) -> Optional[str]:
        if targets.shape != output.shape:
            return (
                f"{self.name} with targets of shape {tuple(targets.shape)} broadcast to outputs {tuple(output.shape)}"
            )
        return None

    def output_factor(
        self,
        output: Tensor,
        targets: Tensor,
        *,
        diagonal_only: bool = False,
        max_columns: Optional[int] = None,
        memory_budget: Optional[int] = None,
    ) -> OutputFactor:
        return OutputFactor(diag=self.hessian_diagonal(output, targets).reshape(output.shape[0], -1))

    def quadratic_form(self, output: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        return (self.hessian_diagonal(output, targets) * u * u).sum()

    def mean_normaliser(self, output: Tensor, targets: Tensor) -> float:
        return 1.0 if self.options["reduction"] == "sum" else float(output.numel())

    @staticmethod
    def _flat(output: Tensor) -> Tuple[int, int]:
        return output.shape[0], math.prod(output.shape[1:])


def sampled_noise(output: Tensor, draws: int, generator: Optional[torch.Generator]) -> Tensor:
    """(N, draws, D) standard normal draws in the output's dtype and device."""
    samples, features = output.shape[0], math.prod(output.shape[1:])
    return torch.randn(samples, draws, features, dtype=output.dtype, device=output.device, generator=generator)
