"""A loss function that is a weighted sum of supported losses on one place of the model output, plus terms that do
not read the output (a penalty on the parameters):

    lambda out, y: F.cross_entropy(out.logits, y) + 0.5 * F.cross_entropy(out.logits, y, label_smoothing=0.1)
        + 1e-4 * sum(p.pow(2).sum() for p in model.parameters())

Its Hessian in the output is the same sum of the losses' own factors (each scaled by its weight, a negative weight
flipping its signs), so the output keeps the known losses' structure (cross-entropy's C - 1 columns per position)
where reading the whole function by what it computes (output_function.py) would form a dense per-sample Hessian
of every output feature (sequence x vocabulary for a language model). The other terms add their own Hessian
diagonal in the tensors they read, as OutputFunction finds it. Read for the Hessian only (recognise(...,
functions=True)), as OutputFunction is.
"""

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .base import Loss, OutputFactor
from .output_function import OutputFunction


class LossSum(Loss):
    name = "sum of losses"

    def __init__(self, terms: Sequence[Tuple[float, Loss]], rest: Optional[Callable], description: str):
        """terms: (weight, loss) with the same reading (the place and ops each reads the output with); rest: the
        function's other terms as a function of (output, targets) that reads no output, or None."""
        super().__init__({})
        self.terms = list(terms)
        self.reading = self.terms[0][1].reading
        self.class_axis = self.terms[0][1].class_axis  # the same for every term: recognise checks
        self.rest = None if rest is None else OutputFunction(rest, (), description)
        self.description = description

    def targets_for(self, output: Tensor, targets: Any) -> Any:
        """Each term's targets (its own ops on them), then the targets as given (for the other terms)."""
        return tuple(loss.targets_for(output, targets) for _, loss in self.terms) + (targets,)

    def output_reason(self, output: Tensor, targets: Any) -> Optional[str]:
        for (_, loss), own in zip(self.terms, targets):
            reason = loss.output_reason(output, own)
            if reason is not None:
                return reason
        return None

    def evaluate(self, loss_fn: Callable, output: Tensor, targets: Any) -> Tensor:
        # each loss's own function with its options (Loss.evaluate without a reading would call loss_fn: the sum)
        value = self.rest.call(output, targets[-1]) if self.rest is not None else output.new_zeros(())
        for (weight, loss), own in zip(self.terms, targets):
            value = value + weight * type(loss).function(loss.loss_input(output), own, **loss.options)
        return value

    def output_factor(
        self,
        output: Tensor,
        targets: Any,
        *,
        diagonal_only: bool = False,
        max_columns: Optional[int] = None,
        memory_budget: Optional[int] = None,
    ) -> OutputFactor:
        factors: List[Tensor] = []
        signs: List[Tensor] = []
        diag: Optional[Tensor] = None
        for (weight, loss), own in zip(self.terms, targets):
            part = loss.output_factor(
                output, own, diagonal_only=diagonal_only, max_columns=max_columns, memory_budget=memory_budget
            )
            if part.factors is not None:
                factors.append(part.factors * math.sqrt(abs(weight)))
                sign = torch.ones(part.factors.shape[:2], dtype=output.dtype, device=output.device)
                signs.append((sign if part.signs is None else part.signs) * (1.0 if weight >= 0 else -1.0))
            if part.diag is not None:
                diag = weight * part.diag if diag is None else diag + weight * part.diag
        if not factors:
            return OutputFactor(diag=diag)
        return OutputFactor(factors=torch.cat(factors, 1), signs=torch.cat(signs, 1), diag=diag)

    def parameter_diagonals(self, output: Tensor, targets: Any) -> List[Tuple[Tensor, Tensor]]:
        return [] if self.rest is None else self.rest.parameter_diagonals(output, targets[-1])


__all__ = ["LossSum"]
