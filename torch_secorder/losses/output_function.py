"""A loss the engine reads by what it computes, not by its name: any scalar function of one tensor of the model
output and the targets (Huber, KL, Gaussian NLL, sums and scalings of losses, a loss plus a parameter penalty).

Its per-sample Hessian in that tensor comes from Hessian-vector products of the function alone (never of the
model): one per output feature, every sample at once, plus one with a random tangent that checks that the
function couples no two samples (a batch statistic would; the engine's columns are per sample). Tensors that
require grad which the function reads itself (parameters in a penalty) add their own Hessian diagonal, checked
to be diagonal and not mixed with the output, with three more products. Whatever the checks find goes to the
generic method, named.
"""

import math
import types
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .._errors import Unsupported
from .base import Loss, OutputFactor

DENSE_FLOOR = 64 << 20  # bytes of per-sample Hessians the function may always form


class OutputFunction(Loss):
    """Read for the Hessian only (recognise(..., functions=True)): the GGN and Fisher take the known losses, so
    it has no quadratic form, Fisher columns or mean normaliser of its own."""

    name = "loss function"

    def __init__(self, loss_fn: Callable, path: tuple = (), description: str = "loss_fn"):
        super().__init__({})
        self.loss_fn, self.path, self.description = loss_fn, path, description

    def call(self, output: Tensor, targets: Any) -> Tensor:
        """loss_fn on the model output with `output` at the place it reads (out.logits, out[0], or out itself)."""
        return self.loss_fn(_stand_in(self.path, output), targets)

    def targets_for(self, output: Tensor, targets: Any) -> Any:
        return targets  # as the function itself takes them

    def evaluate(self, loss_fn: Callable, output: Tensor, targets: Any) -> Tensor:
        return self.call(output, targets)

    def output_factor(
        self,
        output: Tensor,
        targets: Any,
        *,
        diagonal_only: bool = False,
        max_columns: Optional[int] = None,
        memory_budget: Optional[int] = None,
    ) -> OutputFactor:
        if output.requires_grad:
            raise Unsupported(
                f"create_graph=True with {self.description} (the engine forms its Hessian in the model output from "
                "Hessian-vector products, which are not differentiated again)"
            )
        hessian = self.per_sample_hessian(output, targets, memory_budget)
        samples, features = hessian.shape[:2]
        off_diagonal = hessian - torch.diag_embed(torch.diagonal(hessian, dim1=1, dim2=2))
        if not off_diagonal.any():  # elementwise losses (Huber, SmoothL1, ...): a diagonal is cheaper below
            return OutputFactor(diag=torch.diagonal(hessian, dim1=1, dim2=2).contiguous())
        values, vectors = torch.linalg.eigh(hessian.double())  # H_n = Q diag(l) Q^T = S^T diag(sign l) S
        factors = (values.abs().sqrt().unsqueeze(-1) * vectors.transpose(1, 2)).to(output.dtype)
        return OutputFactor(factors=factors, signs=torch.sign(values).to(output.dtype))

    def per_sample_hessian(self, output: Tensor, targets: Any, memory_budget: Optional[int] = None) -> Tensor:
        """(N, D, D): the function's Hessian in each sample's D output features. Raises Unsupported where it does
        not fit the budget or where the function couples samples."""
        samples, features = output.shape[0], math.prod(output.shape[1:])
        size = samples * features * (features + 1) * output.element_size() * 3  # products, Hessian, its copy
        if size > max(memory_budget or 0, DENSE_FLOOR):
            raise Unsupported(
                f"{self.description}: its Hessian in the model output is a dense {features} x {features} matrix per "
                f"sample ({size / 2**20:.0f} MiB > memory_budget); the engine forms it for small outputs only"
            )
        with torch.enable_grad():
            leaf = output.detach().requires_grad_(True)
            value = self.call(leaf, targets)
            (grad,) = torch.autograd.grad(value, leaf, create_graph=True, allow_unused=True)
            if grad is None or not grad.requires_grad:  # linear in the output (L1 away from its kinks)
                return output.new_zeros(samples, features, features)
            units = torch.eye(features, dtype=output.dtype, device=output.device)
            tangents = torch.cat(
                [
                    units.unsqueeze(1).expand(features, samples, features),  # e_j for every sample at once
                    _random_like(output.new_empty(1, samples, features)),
                ]
            ).reshape(features + 1, *output.shape)
            products = _batched_products(grad, leaf, tangents).reshape(features + 1, samples, features)
        # with no coupling, product j holds column j of every sample's own Hessian
        hessian = products[:features].permute(1, 2, 0)
        hessian = (hessian + hessian.transpose(1, 2)) / 2
        random, coupled = tangents[features].reshape(samples, features), products[features]
        expected = torch.einsum("nij,nj->ni", hessian, random)
        scale = torch.einsum("nij,nj->ni", hessian.abs(), random.abs()).max() + coupled.abs().max()
        if (coupled - expected).abs().max() > _tolerance(output.dtype, features) * scale:
            raise Unsupported(
                f"{self.description} couples the samples of the batch (its Hessian in the model output has terms "
                "between two samples; the engine's columns are per sample)"
            )
        return hessian

    def parameter_diagonals(self, output: Tensor, targets: Any) -> List[Tuple[Tensor, Tensor]]:
        """[(tensor, its Hessian diagonal)] for the tensors requiring grad that the function reads itself (a
        penalty on the parameters). Raises Unsupported where such a term is mixed with the output or couples
        entries (its Hessian is not diagonal)."""
        with torch.enable_grad():
            leaf = output.detach().requires_grad_(True)
            value = self.call(leaf, targets)
            read = _leaves_read(value, leaf)
            if not read:
                return []
            grads = torch.autograd.grad(value, [leaf, *read], create_graph=True, allow_unused=True)
            if grads[0] is not None and grads[0].requires_grad:
                mixed = torch.autograd.grad(grads[0], read, _random_like(leaf), retain_graph=True, allow_unused=True)
                if any(m is not None and bool(m.any()) for m in mixed):
                    raise Unsupported(
                        f"{self.description} mixes the model output with tensors it reads itself (a parameter "
                        "term that is not added to the loss of the output)"
                    )
            curved = [(t, g) for t, g in zip(read, grads[1:]) if g is not None and g.requires_grad]
            if not curved:
                return []
            tensors, first = [t for t, _ in curved], [g for _, g in curved]
            ones = [torch.ones_like(t) for t in tensors]
            randoms = [_random_like(t) for t in tensors]
            on_ones = torch.autograd.grad(first, tensors, ones, retain_graph=True, allow_unused=True)
            on_randoms = torch.autograd.grad(first, tensors, randoms, allow_unused=True)
        diagonals = [torch.zeros_like(t) if d is None else d.detach() for t, d in zip(tensors, on_ones)]
        products = [torch.zeros_like(t) if p is None else p.detach() for t, p in zip(tensors, on_randoms)]
        # a diagonal Hessian maps r to diag * r; anything else (entries coupled) shows in a random r
        error = max(float((p - d * r).abs().max()) for p, d, r in zip(products, diagonals, randoms))
        scale = max(float((d * r).abs().max()) + float(p.abs().max()) for p, d, r in zip(products, diagonals, randoms))
        if error > _tolerance(output.dtype, 1) * scale:
            raise Unsupported(
                f"{self.description} reads parameters itself with a Hessian that is not diagonal (a penalty that "
                "couples entries)"
            )
        return list(zip(tensors, diagonals))


def _stand_in(path: tuple, tensor: Tensor) -> Any:
    """An object holding tensor at path, as the model output holds the tensor the function reads there."""
    value: Any = tensor
    for kind, key in reversed(path):
        if kind == "attribute":
            value = types.SimpleNamespace(**{key: value})
        elif isinstance(key, int):
            value = (None,) * key + (value,)
        else:
            value = {key: value}
    return value


def _batched_products(grad: Tensor, leaf: Tensor, tangents: Tensor) -> Tensor:
    """d(grad . t)/d(leaf) for each tangent t (one vmapped backward; a loop where an op has no batching rule)."""
    try:
        return torch.autograd.grad(grad, leaf, tangents, retain_graph=True, is_grads_batched=True)[0]
    except RuntimeError:
        rows = [torch.autograd.grad(grad, leaf, t, retain_graph=True, allow_unused=True)[0] for t in tangents]
        return torch.stack([torch.zeros_like(leaf) if r is None else r for r in rows])


def _leaves_read(value: Tensor, leaf: Tensor) -> List[Tensor]:
    """The leaf tensors requiring grad that value's autograd graph reaches, other than leaf."""
    found: List[Tensor] = []
    seen: set = set()
    stack = [value.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and variable is not leaf:
            found.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _random_like(tensor: Tensor) -> Tensor:
    """Standard normal draws shaped like tensor, from a generator of their own: the checks leave the caller's
    random state as it was (a training loop's next dropout mask must not depend on the method)."""
    generator = torch.Generator(device=tensor.device).manual_seed(0x5EC0)
    return torch.randn(tensor.shape, dtype=tensor.dtype, device=tensor.device, generator=generator)


def _tolerance(dtype: torch.dtype, features: int) -> float:
    """How far rounding may take two orders of the same sums apart, relative to their size."""
    return 64 * torch.finfo(dtype).eps * math.sqrt(max(features, 1))
