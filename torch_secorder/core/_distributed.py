"""Data-parallel reduction: each rank holds a shard of the batch; the diagonal of the global batch's loss.

With reduction="sum" the global loss is the sum of the ranks' losses, so are its diagonals. With "mean"
each rank's loss is its own sum divided by its own normaliser F_r (samples; elements for MSE/BCE; counted
targets or their class weights for cross-entropy/NLL), and the global loss divides by sum_r F_r: the global
diagonal is sum_r F_r D_r / sum_r F_r. One all_reduce carries the weighted diagonals and the normalisers.
"""

import torch

from ..losses import recognise


def check_all_reduce(all_reduce, per_sample):
    if not isinstance(all_reduce, bool):
        raise TypeError(f"all_reduce must be True or False, got {all_reduce!r}")
    if not all_reduce:
        return
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("all_reduce=True needs torch.distributed initialised (init_process_group) in every rank")
    if per_sample:
        raise ValueError("all_reduce=True with per_sample=True: each rank's samples are its own; gather them instead")


def local_normaliser(loss_fn, targets):
    """What this rank's loss divides its sum by, or None for reduction='sum'; for a loss we do not know, its
    batch size unless its reduction is 'sum'. (The targets have the output's shape wherever the output's
    shape matters: MSE, BCE, probability targets.)"""
    loss = recognise(loss_fn)
    if isinstance(loss, str):
        return None if getattr(loss_fn, "reduction", "mean") == "sum" else float(targets.shape[0])
    if loss.options["reduction"] == "sum":
        return None
    return loss.mean_normaliser(targets, targets)


def reduce_diagonals(diagonals, normaliser):
    """The global batch's diagonals from every rank's (a list of tensors, or one flat tensor)."""
    tensors = [diagonals] if isinstance(diagonals, torch.Tensor) else list(diagonals)
    if not tensors:
        return diagonals
    like = tensors[0]
    weight = 1.0 if normaliser is None else normaliser
    flat = torch.cat([t.detach().reshape(-1) * weight for t in tensors] + [like.new_full((1,), weight)])
    torch.distributed.all_reduce(flat)
    total = 1.0 if normaliser is None else flat[-1]  # 'sum': the ranks' diagonals simply add
    parts, offset = [], 0
    for t in tensors:
        parts.append((flat[offset : offset + t.numel()] / total).reshape(t.shape))
        offset += t.numel()
    return parts[0] if isinstance(diagonals, torch.Tensor) else parts
