"""Which exact method model_hessian_diagonal uses, and why."""

from dataclasses import dataclass

import torch

from .._forward_pass import library_call, library_forward
from ..backprop import Unsupported, curved_nodes, plan_model
from ._validation import check_method, model_call, model_to_run, unwrapped


@dataclass(frozen=True)
class MethodChoice:
    method: str  # "backprop" or "autograd"
    reason: str
    cost: str = ""  # what it will compute: columns and passes for backprop, Hessian-vector products for autograd

    def __str__(self):
        return f"{self.method}: {self.reason}" + (f" ({self.cost})" if self.cost else "")


def explain_method(model, loss_fn, inputs=None, method="auto", targets=None):
    """The method model_hessian_diagonal(model, loss_fn, inputs, targets, ..., method=method) will use, why, and
    what it will cost. With `inputs` (a tensor, a tuple, or a dict as model_hessian_diagonal takes them), the
    engine's column counts come from a forward pass without gradients; with `targets` too, what only the loss
    on that output shows (targets the loss would broadcast, say) is checked as the call will check it.

    >>> explain_method(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), nn.CrossEntropyLoss())
    MethodChoice(method='backprop', reason='every module and the loss have exact Hessian-backprop rules', cost='...')
    """
    check_method(method)
    with library_call():  # its forwards never overlap a trace in another thread
        return _explain(model, loss_fn, inputs, method, targets)


def _explain(model, loss_fn, inputs, method, targets):
    model = unwrapped(model) if inputs is None else model_to_run(model, inputs, sync_buffers=False)
    if method == "autograd":
        return MethodChoice("autograd", "method='autograd' was asked for", generic_cost(model))
    # the module the call runs: a dict batch goes to a keyword wrapper around the model, as in the call itself
    called, call_inputs = (model, None) if inputs is None else model_call(model, inputs)
    plan, reason = backprop_plan(called, loss_fn, call_inputs)
    if plan is not None and targets is not None and call_inputs is not None:
        reason = _output_reason(plan, called, call_inputs[0], targets)
    if plan is not None and reason is None:
        return MethodChoice(
            "backprop",
            "every module and the loss have exact Hessian-backprop rules",
            engine_cost(plan, call_inputs),
        )
    return MethodChoice("autograd", f"Hessian backpropagation does not support {reason}", generic_cost(model))


def _output_reason(plan, model, inputs, targets):
    """Why the loss on this output has no exact rule (as the call would find after its forward pass), or None."""
    if not isinstance(targets, torch.Tensor):
        return None  # the call itself names bad targets
    with torch.no_grad(), library_forward():
        output = model(inputs)
    return plan.loss.output_reason(output, targets) if isinstance(output, torch.Tensor) else None


def generic_cost(model):
    entries = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{entries} Hessian-vector products, one per parameter entry, batched; each costs about a gradient or more"


def engine_cost(plan, inputs=None):
    """Origins and their columns: the loss's per-sample curvature, and one origin per curved node (counted
    with a forward pass without gradients when inputs are given)."""
    classes = plan.loss.class_axis
    loss_columns = "C - 1 (classes - 1) columns" if classes else "one column per output feature"
    if inputs is not None:
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    curved, counted = None, None
    if inputs is not None and all(isinstance(x, torch.Tensor) for x in inputs):
        try:
            with torch.no_grad():
                output = plan.model(*inputs)  # what the loss reads (plan.model reads out.logits, say)
            positions = output[0, 0].numel() if output.dim() > 2 else 1
            counted = (output.shape[1] - 1) * positions if classes else output[0].numel()
            loss_columns = f"{counted} columns"
            curved = curved_nodes(plan, inputs)
        except Exception:
            counted = None
    if curved is None:  # no inputs, or a forward that failed: the nodes without their widths
        curved = curved_nodes(plan)
    text = f"one forward pass; the loss's {loss_columns} per sample pulled down once through every layer"
    if not curved:
        return text + "; no curved node (ReLU / BatchNorm-eval / pooling / linear maps): the loss is the only origin"
    if counted is not None and all(width is not None for _, width in curved):
        shown = ", ".join(f"{name} {width}" for name, width in curved[:6]) + (", ..." if len(curved) > 6 else "")
        total = counted + sum(width or 0 for _, width in curved)
        return text + (
            f"; {len(curved)} curved node(s) add about as many columns as their input has features "
            f"per sample ({shown}), pulled down from there: about {total} columns per sample in all"
        )
    shown = ", ".join(name for name, _ in curved[:5]) + (", ..." if len(curved) > 5 else "")
    return text + (
        f"; {len(curved)} curved node(s) ({shown}) each add as many columns as their input has features "
        "per sample, pulled down from there (smooth activations, LayerNorm, products of two inputs)"
    )


def backprop_plan(model, loss_fn, inputs=None):
    """(the engine's EnginePlan, None) when it can run, else (None, why not). inputs: the model's positional
    inputs (a tensor or a tuple of them), or None."""
    if inputs is not None:
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        for value in inputs:
            if not isinstance(value, torch.Tensor):
                # the trace stands a tensor in for each input: a forward that branches on its type would differ
                return None, f"a model input that is a {type(value).__name__}, not a tensor (the engine takes tensors)"
            if value.dim() == 0:
                return None, "0-D inputs"
        if len({value.shape[0] for value in inputs}) > 1:
            return None, "model inputs of different batch sizes"
    try:
        return plan_model(model, loss_fn, inputs), None
    except Unsupported as error:
        return None, str(error)
