"""The generic exact method: diag(H)_i = e_i^T H e_i, many unit vectors per double-backward.

Works for anything autograd can differentiate twice. Its cost grows with the
number of parameter entries, so a chunk of unit vectors goes through one
batched backward: torch.func.vmap over torch.autograd.grad first; where vmap
cannot batch an op of the graph, torch.autograd.grad(..., is_grads_batched=True);
where that fails too, one backward per entry (each step down warns once).
The chunk size is chosen so that a chunk's temporaries fit a memory budget, and
halved when the device runs out of memory anyway.
"""

import time
import warnings

import torch

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes for one chunk's temporaries
CPU_WORKING_SET = 16 << 20  # bytes; see choose_chunk_size


def saved_tensor_bytes(loss):
    """Bytes of the tensors the autograd graph of `loss` saved: a proxy for one backward's working set.

    Walks the graph instead of hooking the forward: a pack hook that keeps the
    tensor itself would make reference cycles through saved outputs.
    """
    seen_nodes, seen_storages, total = set(), set(), 0
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # freed or not a tensor we may read
                continue
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(tensor, torch.Tensor) and tensor.numel() > 0:
                    key = (tensor.untyped_storage().data_ptr(), tensor.device)
                    if key not in seen_storages:
                        seen_storages.add(key)
                        total += tensor.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return total


def choose_chunk_size(entries, itemsize, graph_bytes, param_bytes, memory_budget, device_type="cpu"):
    """Unit vectors per batched backward so that its temporaries stay under memory_budget.

    A batched double-backward holds, per vector, roughly a copy of what the
    graph saved, of the first-order gradients and of its one-hot row; the
    factor 3 covers the extra tensors of the double-backward graph. On CPU the
    chunk is also kept cache-sized: measured on 2 cores, chunks whose
    temporaries fit in ~16 MiB ran 2-2.5x faster than chunks of 100+ MiB.
    """
    per_vector = max(3 * (graph_bytes + param_bytes) + entries * itemsize, 1)
    limit = memory_budget
    if device_type == "cpu":
        limit = min(limit, CPU_WORKING_SET)
    return int(max(1, min(entries, limit // per_vector)))


def _unit_rows(start, stop, entries, like):
    """Rows e_start .. e_{stop-1} of the identity, shaped (stop - start, entries)."""
    rows = torch.zeros(stop - start, entries, dtype=like.dtype, device=like.device)
    index = torch.arange(stop - start, device=like.device)
    rows[index, start + index] = 1
    return rows, index


def _rows_by_func_vmap(grad_flat, param, rows, create_graph):
    # torch.func.vmap has batching rules for far more backward ops than the
    # legacy vmap behind is_grads_batched: measured 1.5-2x faster on MLPs and CNNs.
    def one_row(row):
        return torch.autograd.grad(grad_flat, param, row, retain_graph=True, create_graph=create_graph)[0]

    return torch.func.vmap(one_row)(rows)


def _rows_by_grads_batched(grad_flat, param, rows, create_graph):
    return torch.autograd.grad(
        grad_flat, param, grad_outputs=rows, retain_graph=True, create_graph=create_graph, is_grads_batched=True
    )[0]


def _rows_one_by_one(grad_flat, param, rows, create_graph):
    return torch.stack(
        [torch.autograd.grad(grad_flat, param, row, retain_graph=True, create_graph=create_graph)[0] for row in rows]
    )


_STRATEGIES = (_rows_by_func_vmap, _rows_by_grads_batched, _rows_one_by_one)


class _HvpRows:
    """rows @ d(grad_flat)/d(param): the fastest strategy that works for this graph.

    A strategy that raises (an op without a batching rule, an in-place op under
    vmap) is dropped for the rest of the call, with one warning.
    """

    def __init__(self):
        self.strategies = list(_STRATEGIES)

    def __call__(self, grad_flat, param, rows, create_graph):
        while True:
            strategy = self.strategies[0]
            try:
                return strategy(grad_flat, param, rows, create_graph)
            except RuntimeError as error:
                # out of memory says nothing about batching: the caller shrinks the chunk instead
                if len(self.strategies) == 1 or _is_unused_input_error(error) or is_out_of_memory(error):
                    raise
                self.strategies.pop(0)
                warnings.warn(
                    f"torch_secorder: {strategy.__name__.strip('_')} failed ({str(error).splitlines()[0][:200]}); "
                    f"using {self.strategies[0].__name__.strip('_')} instead (same numbers, slower)",
                    RuntimeWarning,
                    stacklevel=5,  # the caller of hessian_diagonal or model_hessian_diagonal
                )


def projected_seconds(loss, params, grads, memory_budget):
    """What batched_hessian_diagonal will take here, measured on the largest parameter: a chunk of its unit rows
    as large as the method takes them and one a sixteenth of that (each a second, warm run), a straight line
    through the two for a chunk of any size (a vmapped backward through the whole graph has a fixed part that a
    model's many small tensors, one chunk each, pay again and again), summed over every chunk of every parameter.
    Timed with the strategy the method will use (_HvpRows: the first that runs on this graph). None when it
    cannot be measured (no parameter with a second derivative, no strategy runs)."""
    candidates = [(p, g) for p, g in zip(params, grads) if g is not None and g.grad_fn is not None and p.numel()]
    if not candidates:
        return None
    graph_bytes = saved_tensor_bytes(loss)
    param_bytes = sum(p.numel() * p.element_size() for p in params)

    def step_for(param):
        return choose_chunk_size(
            param.numel(), param.element_size(), graph_bytes, param_bytes, memory_budget, param.device.type
        )

    param, grad = max(candidates, key=lambda pair: pair[0].numel())
    entries, grad_flat = param.numel(), grad.reshape(-1)
    large = step_for(param)
    small = max(1, large // 16)
    for strategy in _STRATEGIES:  # the one the method will use: the first that runs on this graph
        sizes = {small} if strategy is _rows_one_by_one else {large, small}  # one by one: rows cost alike
        timed = {}
        try:
            for size in sizes:
                rows, _ = _unit_rows(0, size, entries, grad_flat)
                for _ in range(2):
                    start = time.perf_counter()
                    strategy(grad_flat, param, rows, False)
                    if rows.is_cuda:
                        torch.cuda.synchronize(rows.device)
                    timed[size] = time.perf_counter() - start
            break
        except RuntimeError:
            continue
    else:
        return None
    if len(timed) == 2:
        slope = (timed[large] - timed[small]) / (large - small)
        fixed = max(timed[small] - slope * small, 0.0)
    else:
        slope, fixed = timed[small] / small, 0.0
    depth = _depth_factor(strategy, candidates, param, small, timed[small])
    total = 0.0
    for index, (candidate, _) in enumerate(candidates):
        step, count = step_for(candidate), candidate.numel()
        full, rest = divmod(count, step)
        total += depth(index) * (full * (fixed + slope * step) + (fixed + slope * rest if rest else 0.0))
    return total


def _depth_factor(strategy, candidates, largest, size, largest_seconds):
    """How much more a chunk costs on each parameter than on the largest one: a product's double backward runs
    from the parameter's gradient down to the parameter, so parameters the forward meets first cost the most (37x
    the last layer's per entry on a small EfficientNet). Measured on the first parameter with a chunk of `size`
    rows, a straight line in the parameter's index from there to the largest one (1 from it on)."""
    biggest = next(i for i, (p, _) in enumerate(candidates) if p is largest)
    first, first_grad = candidates[0]
    if biggest == 0 or largest_seconds <= 0:
        return lambda index: 1.0
    rows, _ = _unit_rows(0, min(size, first.numel()), first.numel(), first_grad.reshape(-1))
    for _ in range(2):  # the second one warm
        start = time.perf_counter()
        strategy(first_grad.reshape(-1), first, rows, False)
        if rows.is_cuda:
            torch.cuda.synchronize(rows.device)
        seconds = time.perf_counter() - start
    ratio = max(seconds * size / rows.shape[0] / largest_seconds, 1.0)
    return lambda index: ratio + (1.0 - ratio) * min(index, biggest) / biggest


def _is_unused_input_error(error):
    return "appears to not have been used in the graph" in str(error)


def is_out_of_memory(error):
    """CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError that says so."""
    message = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "not enough memory" in message or "out of memory" in message


def _halved(step, error):
    warnings.warn(
        f"torch_secorder: out of memory with {step} unit vectors per double backward "
        f"({str(error).splitlines()[0][:120]}); retrying with {step // 2} (a smaller memory_budget avoids "
        "this)",
        RuntimeWarning,
        stacklevel=5,
    )
    return step // 2


def batched_hessian_diagonal(loss, params, grads, *, create_graph, chunk_size, graph_bytes, memory_budget, progress):
    """Exact Hessian diagonals of `loss` for `params`, given their first-order `grads` (made with create_graph=True).

    A grad of None, or one without a graph (the loss is at most linear in that
    parameter), gives zeros. Each parameter's result is written into one
    preallocated buffer, never collected from a list of chunks.
    """
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    total = sum(p.numel() for p in params)
    done = 0
    hvp_rows = _HvpRows()
    diagonals = []
    for param, grad in zip(params, grads):
        entries = param.numel()
        diag = torch.zeros(entries, dtype=param.dtype, device=param.device)
        if grad is None or grad.grad_fn is None or entries == 0:
            diagonals.append(diag.view_as(param))
            done += entries
            if progress is not None:
                progress(done, total)
            continue
        grad_flat = grad.reshape(-1)
        step = chunk_size or choose_chunk_size(
            entries, param.element_size(), graph_bytes, param_bytes, memory_budget, param.device.type
        )
        start = 0
        while start < entries:
            stop = min(entries, start + step)
            rows, index = _unit_rows(start, stop, entries, grad_flat)
            try:
                hvp = hvp_rows(grad_flat, param, rows, create_graph)
            except RuntimeError as error:
                if is_out_of_memory(error) and step > 1:
                    del rows, index
                    step = _halved(step, error)
                    continue
                if not _is_unused_input_error(error):
                    raise
                hvp = None  # the gradient has a graph that does not reach the parameter: zero curvature
            if hvp is not None:
                diag[start:stop] = hvp.reshape(stop - start, entries)[index, start + index]
            done += stop - start
            start = stop
            if progress is not None:
                progress(done, total)
        diagonals.append(diag.view_as(param))
    return diagonals
