"""The exact engine (internal: no stable API). plan.py reads a model and loss into an EnginePlan: a chain of
modules with rules (chain.py) or a traced graph (graph/); engine.py runs it. rules/ holds one rule per layer
family, curvature.py the per-sample curvature they carry, loss_step.py where the loss meets both engines."""

from .._errors import Unsupported
from .cost import EngineCost, predicted_cost
from .engine import run_plan
from .plan import EnginePlan, curved_nodes, plan_model

__all__ = ["EnginePlan", "Unsupported", "curved_nodes", "plan_model", "predicted_cost", "run_plan", "EngineCost"]
