"""The engine's front door: runs an EnginePlan (plan.py) with the chain engine or the graph engine."""

from typing import Callable, List, Optional, Tuple

from torch import Tensor

from .._errors import Unsupported
from ..losses import HESSIAN, CurvatureRequest
from .chain import chain_diagonals
from .gradients import Gradients
from .graph import trace
from .graph.engine import graph_diagonals
from .plan import EnginePlan


def run_plan(
    plan: EnginePlan,
    loss_fn: Callable,
    inputs: Tuple[Tensor, ...],
    targets: Tensor,
    params: List[Tensor],
    *,
    create_graph: bool,
    memory_budget: int,
    request: CurvatureRequest = HESSIAN,
    gradients: Optional[Gradients] = None,
) -> Tuple[Tensor, List[Tensor]]:
    """(loss, diagonals): the loss this call computed, and for params (a list of model parameters), in their
    order, the exact diagonals of the curvature `request` names (the Hessian by default; per sample:
    (N, *shape) each). inputs: the model's positional inputs (a chain takes one). gradients: filled with the
    loss's gradient in gradients.params, from the same forward pass (one backward shared with the engine's own)."""
    if plan.graph is not None:
        trace.check_call(plan.graph, plan.model, inputs)
    if plan.is_chain:
        return chain_diagonals(
            plan,
            loss_fn,
            inputs[0],
            targets,
            params,
            create_graph=create_graph,
            memory_budget=memory_budget,
            request=request,
            gradients=gradients,
        )
    if create_graph:
        raise Unsupported("create_graph=True on a traced graph (only chains of modules)")
    assert plan.graph is not None  # not a chain: a traced graph
    return graph_diagonals(
        plan.graph.for_call(),
        plan.loss,
        plan.model,
        loss_fn,
        inputs,
        targets,
        params,
        memory_budget=memory_budget,
        request=request,
        gradients=gradients,
    )
