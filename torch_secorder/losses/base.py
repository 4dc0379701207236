"""What every supported loss kind provides; the subclasses say how for their loss."""

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, List, Optional, Tuple, Type

import torch
import torch.nn as nn
from torch import Tensor


@dataclass
class OutputFactor:
    """The loss's per-sample Hessian at the model output, H_n = S_n^T diag(signs_n) S_n + diag(d_n): factors S
    (N, V, D) with signs (N, V) (None: all +1) and/or a diagonal d (N, D); D = output[0].numel()."""

    factors: Optional[Tensor] = None
    signs: Optional[Tensor] = None
    diag: Optional[Tensor] = None


class Loss:
    """A supported loss with its options (reduction, class weights, ...), as PyTorch's own loss reads them."""

    name: ClassVar[str]
    module: ClassVar[Type[nn.Module]]  # the nn loss module (exact type)
    function: ClassVar[Callable[..., Tensor]]  # its torch.nn.functional form
    option_defaults: ClassVar[dict]  # the options it takes, with PyTorch's defaults
    class_axis: bool = False  # its per-sample Hessian is C x C over a class axis (C - 1 columns)
    # it reads log-probabilities: the engine stops below the model's final LogSoftmax (log_softmax_dim)
    reads_log_probabilities: ClassVar[bool] = False
    log_softmax_dim: int = 1  # where it does: the dim of that LogSoftmax (must be the class axis)

    def __init__(self, options: dict):
        self.options = options

    # where the loss function reads the model output (out.logits) and what it does to it and to the targets
    # before its loss call (reading.py): the engine runs those ops itself, and calls the loss's own function
    reading: Optional[Any] = None

    def loss_input(self, output: Tensor) -> Tensor:
        """What the loss function is called on, given what the engine treats as the model output."""
        return output

    def targets_for(self, output: Tensor, targets: Tensor) -> Tensor:
        """The targets as the loss call takes them, for what the engine treats as the model output."""
        if self.reading is not None:  # the loss function's own ops on the targets (the engine ran those on the output)
            targets = self.reading.targets_for(targets, output, self.class_axis)
        if targets.is_floating_point() and targets.dtype != output.dtype:
            # as F.mse_loss does: the loss of the promoted targets (F.cross_entropy and BCE would round parts of
            # it to the targets' precision; the engine's numbers are the exact ones)
            targets = targets.to(output.dtype)
        return targets

    def evaluate(self, loss_fn: Callable, output: Tensor, targets: Tensor) -> Tensor:
        """The loss on what the engine treats as the model output, with targets_for's targets."""
        if self.reading is not None:
            return type(self).function(output, targets, **self.options)  # what loss_fn computes, read from its ops
        return loss_fn(self.loss_input(output), targets)

    def parameter_diagonals(self, output: Tensor, targets: Tensor) -> List[Tuple[Tensor, Tensor]]:
        """[(tensor, the Hessian diagonal of the loss's own term in it)] for tensors the loss reads besides the
        output (a penalty on parameters); none for a loss of the output alone."""
        return []

    def output_reason(self, output: Tensor, targets: Tensor) -> Optional[str]:
        """Why the engine has no exact rule for this output/target pair, or None."""
        return None

    def check_model_output(self, output: Tensor) -> None:
        """Raises ValueError when the model output cannot be read as this loss's likelihood (GGN, Fisher)."""

    def output_factor(
        self,
        output: Tensor,
        targets: Tensor,
        *,
        diagonal_only: bool = False,
        max_columns: Optional[int] = None,
        memory_budget: Optional[int] = None,
    ) -> OutputFactor:
        """The per-sample Hessian of the loss in the output. diagonal_only: nothing below reads more than its
        diagonal. max_columns: how many output-sized columns fit the memory budget at once (None: no limit)."""
        raise NotImplementedError

    def quadratic_form(self, output: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        """sum_n u_n^T H_n u_n for the loss's per-sample Hessian H_n in the output."""
        raise NotImplementedError

    def sampled_columns(
        self, output: Tensor, targets: Tensor, draws: int, generator: Optional[torch.Generator]
    ) -> Tensor:
        """(N, draws, D) columns sampled from the model's likelihood: their outer products average to the
        GGN's output curvature (the Monte-Carlo Fisher)."""
        raise NotImplementedError

    def mean_normaliser(self, output: Tensor, targets: Tensor) -> float:
        """What reduction='mean' divides the summed loss by (1 for 'sum')."""
        raise NotImplementedError


def check_scalar_loss(loss: object, source: str) -> None:
    """The loss a call computed must be a floating-point scalar tensor; source names who returned it."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{source} must return a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"{source} must return a scalar loss, got a tensor of shape {tuple(loss.shape)}"
            " (use reduction='mean' or 'sum', or reduce it yourself)"
        )
    if not loss.is_floating_point():
        raise TypeError(f"{source} must return a floating-point loss, got dtype {loss.dtype}")


def class_rows(output: Tensor, targets: Tensor) -> tuple:
    """(N, C, d1, ...) outputs as (N P, C) rows, one per sample and position, with their targets (indices
    (N P,) or probabilities (N P, C)) and P; (N, C) outputs are their own rows (P = 1)."""
    samples, classes = output.shape[:2]
    positions = math.prod(output.shape[2:])

    def rows(tensor: Tensor) -> Tensor:
        return tensor.reshape(samples, classes, positions).transpose(1, 2).reshape(-1, classes)

    return rows(output), (rows(targets) if targets.is_floating_point() else targets.reshape(-1)), positions
