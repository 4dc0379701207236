"""Hugging Face's Conv1D (GPT-2's projections: a linear layer whose weight is stored (in, out)) read as the op it
computes, x @ weight + bias.

Its forward folds the batch into rows (x.view(-1, nx), then torch.addmm and a view back), which the engine, one
batch row per sample, cannot follow; the product on the last axis is the same map per sample, and the Linear rule
with W^T (functional.py's x @ W) takes it. The engine checks once per plan that the traced graph gives the model's
own output (trace.check_call)."""

import torch


def decomposable(module):
    """True for transformers.pytorch_utils.Conv1D (matched by name: transformers need not be installed)."""
    kind = type(module)
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")  # not the trace's proxies
    return (
        kind.__name__ == "Conv1D"
        and kind.__module__ == "transformers.pytorch_utils"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and isinstance(bias, torch.Tensor)
    )


def forward(module, x):
    return torch.matmul(x, module.weight) + module.bias
