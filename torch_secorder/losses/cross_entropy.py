"""Cross-entropy over a class axis (dim 1), and NLL read as cross-entropy on the input of the model's final
LogSoftmax. Per sample (and position) H = s (diag(p) - p p^T) with p = softmax(f) and s the sample's scale
(reduction, class weight of its target, ignore_index, label smoothing)."""

from typing import Callable, ClassVar, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .._errors import Unsupported
from .base import Loss, OutputFactor, class_rows

NLL_TOLERANCE = 1e-3  # |logsumexp| of log-probabilities, in the output's own precision


class CrossEntropy(Loss):
    name = "cross_entropy"
    module: ClassVar[Type[nn.Module]] = nn.CrossEntropyLoss
    function: ClassVar[Callable[..., Tensor]] = F.cross_entropy
    option_defaults = {"weight": None, "ignore_index": -100, "label_smoothing": 0.0, "reduction": "mean"}
    class_axis = True

    def output_reason(self, output: Tensor, targets: Tensor) -> Optional[str]:
        if output.dim() < 2:
            return f"{self.name} on outputs of shape {tuple(output.shape)} (no batch axis)"
        return None

    def sample_scale(self, rows: Tensor, row_targets: Tensor) -> Tensor:
        """s per row of (N P, C) logits."""
        options = self.options
        return ops.cross_entropy_sample_scale(
            rows,
            row_targets,
            options["weight"],
            options["ignore_index"],
            options.get("label_smoothing", 0.0),
            options["reduction"],
        )

    def output_factor(
        self,
        output: Tensor,
        targets: Tensor,
        *,
        diagonal_only: bool = False,
        max_columns: Optional[int] = None,
        memory_budget: Optional[int] = None,
    ) -> OutputFactor:
        if output.dim() > 2:
            return self._positions_factor(output, targets, diagonal_only, memory_budget)
        return self._rows_factor(output, targets, diagonal_only, max_columns)

    def _positions_factor(
        self, output: Tensor, targets: Tensor, diagonal_only: bool, memory_budget: Optional[int]
    ) -> OutputFactor:
        """On (N, C, d1, ...): one C x C block per position, so per sample C columns per position, each zero
        outside its position (features ordered (C, positions) like the output)."""
        samples, classes = output.shape[:2]
        rows, row_targets, positions = class_rows(output, targets)
        scale = self.sample_scale(rows, row_targets)
        if diagonal_only:
            diag = ops.softmax_hessian_diag(rows, scale).reshape(samples, positions, classes).transpose(1, 2)
            return OutputFactor(diag=diag.reshape(samples, -1))
        size = samples * positions * classes * classes * positions * output.element_size()
        if memory_budget is not None and size > memory_budget:
            raise Unsupported(
                f"{self.name} over {positions} positions per sample: its per-sample factor "
                f"({size / 2**20:.0f} MiB) exceeds memory_budget"
            )
        negative = bool((scale < 0).any())
        root = ops.softmax_hessian_columns(rows, scale.abs() if negative else scale)  # (N P, C - 1, C)
        width = root.shape[1]
        columns = root.reshape(samples, positions, width, classes)  # [n, p, column, class]
        # column (p, v) of sample n holds column v of position p at features (c, p), zeros elsewhere
        factors = torch.diag_embed(columns.permute(0, 2, 3, 1)).permute(0, 3, 1, 2, 4)  # (N, P, V, C, P)
        signs = None
        if negative:
            signs = torch.sign(scale).reshape(samples, positions, 1).expand(-1, -1, width).reshape(samples, -1)
        return OutputFactor(factors=factors.reshape(samples, positions * width, -1), signs=signs)

    def _rows_factor(
        self, output: Tensor, targets: Tensor, diagonal_only: bool, max_columns: Optional[int]
    ) -> OutputFactor:
        """The scale s is negative where class weights or target probabilities are (PyTorch accepts both): such
        samples get signed columns, never a square root of a negative number. Three forms, by what is read below
        and what fits:
          diagonal only:  diag(H) itself, (N, C);
          C columns:      S S^T from the compiled square-root factor, signs = sign(s), while (N, C, C) fits;
          rank one:       diag(s p) minus the column sqrt|s| p: C + 1 columns in O(N C) memory, streamed."""
        scale = self.sample_scale(output, targets)
        if diagonal_only:
            return OutputFactor(diag=ops.softmax_hessian_diag(output, scale))
        may_be_negative = self.options["weight"] is not None or targets.is_floating_point()
        signs = torch.sign(scale) if may_be_negative and bool((scale < 0).any()) else None
        classes = output.shape[1]
        if max_columns is None or classes - 1 <= max_columns:
            columns = ops.softmax_hessian_columns(output, scale if signs is None else scale.abs())
            expanded = None if signs is None else signs.unsqueeze(1).expand(-1, columns.shape[1])
            return OutputFactor(factors=columns, signs=expanded)
        probabilities = torch.softmax(output, dim=1)
        column = (scale.abs().sqrt().unsqueeze(1) * probabilities).unsqueeze(1)  # (N, 1, C)
        column_sign = -torch.sign(scale).unsqueeze(1)  # a zero scale leaves a zero column: its sign is moot
        return OutputFactor(factors=column, signs=column_sign, diag=scale.unsqueeze(1) * probabilities)

    def quadratic_form(self, output: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        rows, row_targets, _ = class_rows(output, targets)
        scale = self.sample_scale(rows, row_targets)
        p, v = torch.softmax(rows, dim=1), class_rows(u, targets)[0]
        # u^T s (diag(p) - p p^T) u per row
        return (scale * ((p * v * v).sum(1) - (p * v).sum(1) ** 2)).sum()

    def sampled_columns(
        self, output: Tensor, targets: Tensor, draws: int, generator: Optional[torch.Generator]
    ) -> Tensor:
        """y ~ softmax(f) per sample (per position on (N, C, d1, ...) outputs): columns sqrt(s / M) (p - e_y)."""
        samples, classes = output.shape[:2]
        rows, row_targets, positions = class_rows(output, targets)
        scale = self.sample_scale(rows, row_targets)
        # without class weights, class-index targets give scales >= 0 by construction: no check (and no sync)
        if (self.options["weight"] is not None or row_targets.is_floating_point()) and bool((scale < 0).any()):
            raise ValueError(
                "model_fisher_diagonal(kind='mc'): the loss has negative class weights or target "
                "probabilities (no likelihood to sample)"
            )
        if rows.shape[0] == 0:
            return output.new_zeros(samples, draws, classes * positions)
        # one uniform number per draw, the classes drawn from it by inverse CDF inside the op (ops.py)
        uniforms = torch.rand(rows.shape[0], draws, dtype=rows.dtype, device=rows.device, generator=generator)
        columns = ops.softmax_sampled_columns(rows, scale, uniforms)  # (N P, M, C)
        # (N, P, M, C) -> (N, M, C, P): one column per draw over every position (positions are drawn
        # independently, so the cross terms between positions average to zero)
        return (
            columns.reshape(samples, positions, draws, classes)
            .permute(0, 2, 3, 1)
            .reshape(samples, draws, classes * positions)
        )

    def mean_normaliser(self, output: Tensor, targets: Tensor) -> float:
        """Counted samples (times positions); the targets' summed class weights when weighted; probability
        targets count every row."""
        options = self.options
        if options["reduction"] == "sum":
            return 1.0
        if targets.is_floating_point():
            return float(output.numel() // output.shape[1])
        valid = targets != options["ignore_index"]
        if options["weight"] is None:
            return float(valid.sum())
        return float(options["weight"][targets[valid]].sum())


class NLL(CrossEntropy):
    """NLLLoss after the model's final LogSoftmax: the engine stops below that LogSoftmax and reads the pair as
    cross-entropy on its input. The generic GGN / Fisher read the model's log-probabilities directly (their
    softmax is the same distribution)."""

    name = "nll"
    module: ClassVar[Type[nn.Module]] = nn.NLLLoss
    function: ClassVar[Callable[..., Tensor]] = F.nll_loss
    option_defaults = {"weight": None, "ignore_index": -100, "reduction": "mean"}
    reads_log_probabilities = True

    def __init__(self, options: dict, log_softmax_dim: int = 1):
        super().__init__(options)
        self.log_softmax_dim = log_softmax_dim  # of the model's final LogSoftmax (must be the class axis)

    def loss_input(self, output: Tensor) -> Tensor:
        return torch.log_softmax(output, dim=1)

    def output_reason(self, output: Tensor, targets: Tensor) -> Optional[str]:
        reason = super().output_reason(output, targets)
        if reason is None and self.log_softmax_dim % output.dim() != 1:
            return (
                f"LogSoftmax(dim={self.log_softmax_dim}) on outputs of shape {tuple(output.shape)} (not the class axis)"
            )
        return reason

    def check_model_output(self, output: Tensor) -> None:
        if output.dim() < 2:
            raise ValueError(f"NLLLoss on outputs of shape {tuple(output.shape)} (no class axis)")
        gap = torch.logsumexp(output.detach(), dim=1).abs().max() if output.numel() else torch.tensor(0.0)
        if float(gap) > NLL_TOLERANCE:
            raise ValueError(
                f"NLLLoss: the model output is not log-probabilities (logsumexp over dim 1 is off 0 by "
                f"up to {float(gap):.3g}); the GGN and Fisher read NLL as the likelihood softmax(output)"
            )
