"""Binary cross-entropy on logits: per element h sigmoid'(f), h the weight (times pos_weight y + 1 - y)."""

from typing import Callable, ClassVar, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .elementwise import ElementwiseLoss


class BCEWithLogits(ElementwiseLoss):
    name = "bce_with_logits"
    module: ClassVar[Type[nn.Module]] = nn.BCEWithLogitsLoss
    function: ClassVar[Callable[..., Tensor]] = F.binary_cross_entropy_with_logits
    option_defaults = {"weight": None, "pos_weight": None, "reduction": "mean"}

    def hessian_diagonal(self, output: Tensor, targets: Tensor) -> Tensor:
        options = self.options
        return ops.bce_with_logits_hessian_diag(
            output, targets, options["weight"], options["pos_weight"], options["reduction"]
        )

    def sampled_columns(
        self, output: Tensor, targets: Tensor, draws: int, generator: Optional[torch.Generator]
    ) -> Tensor:
        """y ~ Bernoulli(sigmoid(f)) per element: columns sqrt(h / M) (sigmoid(f) - y)."""
        options = self.options
        samples, features = self._flat(output)
        weight = torch.ones_like(output)
        if options["weight"] is not None:
            weight = weight * options["weight"]
        if options["pos_weight"] is not None:
            weight = weight * (options["pos_weight"] * targets + 1 - targets)
        weight = weight / self.mean_normaliser(output, targets)
        if bool((weight < 0).any()):
            raise ValueError(
                "model_fisher_diagonal(kind='mc'): the loss has negative weights (no likelihood to sample)"
            )
        probability = torch.sigmoid(output).reshape(samples, 1, features).expand(-1, draws, -1)
        sampled = torch.bernoulli(probability, generator=generator)
        return (probability - sampled) * (weight.reshape(samples, 1, features) / draws).sqrt()
