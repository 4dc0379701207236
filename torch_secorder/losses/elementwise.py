"""Losses that sum a function of each output element and its target: their Hessian in the output is diagonal."""

import math

import torch

from .base import Loss, OutputFactor


class ElementwiseLoss(Loss):
    """The targets have the output's shape (a broadcast target couples elements: no exact rule)."""

    def hessian_diagonal(self, output, targets):
        """The loss's Hessian diagonal in the output, shaped like it."""
        raise NotImplementedError

    def output_reason(self, output, targets):
        if targets.shape != output.shape:
            return (
                f"{self.name} with targets of shape {tuple(targets.shape)} broadcast to outputs {tuple(output.shape)}"
            )
        return None

    def output_factor(self, output, targets, *, diagonal_only=False, max_columns=None, memory_budget=None):
        return OutputFactor(diag=self.hessian_diagonal(output, targets).reshape(output.shape[0], -1))

    def quadratic_form(self, output, targets, u):
        return (self.hessian_diagonal(output, targets) * u * u).sum()

    def mean_normaliser(self, output, targets):
        return 1.0 if self.options["reduction"] == "sum" else float(output.numel())

    @staticmethod
    def _flat(output):
        return output.shape[0], math.prod(output.shape[1:])


def sampled_noise(output, draws, generator):
    """(N, draws, D) standard normal draws in the output's dtype and device."""
    samples, features = output.shape[0], math.prod(output.shape[1:])
    return torch.randn(samples, draws, features, dtype=output.dtype, device=output.device, generator=generator)
