"""One rule per module type, found by type. A new layer type is one rule class plus one @register line."""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..curvature import diagonal_columns

_RULES: dict = {}  # module type -> its Rule


@dataclass
class LayerRecord:
    """What a rule needs from the forward pass: the module, its input and output, and
    dloss/doutput where the rule asked for it (needs_output_grad)."""

    module: torch.nn.Module
    input: torch.Tensor
    output: torch.Tensor
    output_grad: Optional[torch.Tensor] = None
    extras: Optional[object] = None  # whatever the rule's forward kept (max pooling: the argmax indices)
    wanted: frozenset = frozenset()  # ids of the tensors whose diagonals are asked for (see wants)

    def sample(self, index):
        """The record of one sample (every batched tensor sliced to index:index + 1), for per-sample diagonals."""
        return LayerRecord(
            self.module,
            _one(self.input, index),
            _one(self.output, index),
            _one(self.output_grad, index),
            _one(self.extras, index),
            self.wanted,
        )

    def wants(self, tensor):
        """True when the diagonal of this module tensor (weight, bias) is asked for: a parameter in the
        caller's list that requires grad, or the effective weight of a pruned one."""
        return tensor is not None and id(tensor) in self.wanted


@dataclass
class PropagationContext:
    """What a rule may want to know about the rest of the chain when it picks a representation."""

    max_columns: int  # columns per piece that fit the memory budget
    mixing_below: bool  # the result will pass through another Linear/Conv/pooling before the last parameters
    diagonal_only: bool  # every module below reads only diag(H): the rest of H need not be formed


class Rule:
    """How one module type moves curvature and what it contributes to its parameters' diagonals."""

    def needs_output_grad(self, module):
        """True when the residual term needs dloss/doutput (curved elementwise functions)."""
        return False

    mixing = False  # its Jacobian is not diagonal (Linear, Conv, average pooling)
    # Methods of the registered class that decide what the module computes: an instance whose class
    # (or the instance itself) overrides one of them computes something else, and the rule steps aside.
    forward_methods: Tuple[str, ...] = ("forward",)

    def reads_only_diagonal(self, record):
        """True when this module's parameter diagonals need only diag(H) at its output, and so does its
        propagation unless it is mixing (chain.py combines the two)."""
        return False

    def forward(self, module, x):
        """(output, extras) for the recorded forward pass; extras land in LayerRecord.extras. The module's forward
        itself: the engine runs its hooks around the rule (eligibility.forward_with_hooks)."""
        return module.forward(x.clone() if getattr(module, "inplace", False) else x), None

    def unsupported_reason(self, module):
        """None when the exact rule applies to this module instance, else why not."""
        return None

    def unsupported_input_reason(self, module, x):
        """None when the rule applies to this input (checked in the forward pass), else why not:
        the rules treat axis 0 as the batch, so unbatched inputs must not reach them."""
        return None

    def residual_diagonal(self, record):
        """The residual term sum_k g_k d2f_k/dx2 at the input when it is diagonal, (N, D); None when zero."""
        return None

    def residual_terms(self, record, max_columns, pair_columns):
        """The residual term at the input as chunks (left, right, signs): right None for signed squares (columns
        (N, V, D_in), signs (N, V)), else signed pairs s (l r^T + r l^T) (left and right (N, V, D_in)), at most
        max_columns squares or pair_columns pairs each; none when zero. The graph engine sweeps each as an origin
        of its own and keeps a pair's diagonal as a product. By default the residual diagonal as squares."""
        diagonal = self.residual_diagonal(record)
        if diagonal is not None:
            for columns, signs in diagonal_columns(diagonal, max_columns):
                yield columns, None, signs

    def param_diagonals(self, record, curvature, per_sample=False):
        """[(parameter, diagonal contribution)] from the curvature at the module output, summed over the samples,
        or per_sample: (N, *parameter.shape) each. Rules without parameters keep this default."""
        return []

    def propagate(self, record, curvature, context):
        """The curvature at the module input: one Curvature, or several whose sum it is
        (column chunks of at most context.max_columns, streamed to keep memory bounded)."""
        raise NotImplementedError


def unbatched_input_reason(x, dims=None, at_least=None):
    """The rules treat axis 0 as the batch: None when x has it in front of what the module reads per sample
    (x.dim() in dims, or at least at_least dimensions), else the refusal naming the shape."""
    if dims is not None and x.dim() not in dims:
        expected = " or ".join(f"{d}-D" for d in dims)
    elif at_least is not None and x.dim() < at_least:
        expected = f"at least {at_least}-D"
    else:
        return None
    return f"an unbatched input of shape {tuple(x.shape)} (expected {expected})"


def _one(value, index):
    """value[index:index + 1] for batched tensors (and tuples of them); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value[index : index + 1]
    if isinstance(value, tuple):
        return tuple(_one(item, index) for item in value)
    return value


def one_sample_at_a_time(rule, record, curvature):
    """[(parameter, (N, *parameter.shape))] from the rule's summed diagonals, one sample at a time: the
    per-sample form of rules that have no batched one (same numbers, slower)."""
    samples = curvature.samples
    found: dict = {}  # id(parameter) -> (parameter, [its diagonal per sample])
    for index in range(samples):
        contributions = rule.param_diagonals(record.sample(index), curvature.sample(index))
        if index == 0 and not contributions:
            return []  # nothing asked for in this module
        for param, value in contributions:
            found.setdefault(id(param), (param, [None] * samples))[1][index] = value
    return [
        (param, torch.stack([torch.zeros_like(param) if v is None else v for v in values]))
        for param, values in found.values()
    ]


def register(*module_types):
    def decorate(rule_class):
        for module_type in module_types:
            _RULES[module_type] = rule_class()
        return rule_class

    return decorate


def registered_types():
    """Every module type that has a rule (the trap tests run each of them)."""
    return list(_RULES)


def registered_base(module):
    """The registered class module is an instance of (its own type or its nearest registered base), else None."""
    for cls in type(module).__mro__:
        if cls in _RULES:
            return cls
    return None


def rule_for(module):
    """The rule for module's exact type or its nearest registered base class, else None."""
    base = registered_base(module)
    return None if base is None else _RULES[base]
