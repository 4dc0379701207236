"""Exact Hessian backpropagation through a traced graph (residual sums, concatenations, products).

The Hessian of the loss in the parameters is a sum over origins of signed outer products of
columns: the loss's per-sample factor at the model output, and the second-order term of each
curved node at its inputs. An origin's columns are pulled down through the graph in reverse
topological order; where a tensor feeds several nodes, the columns arriving from each are added as
vectors (never squared first), and each node with parameters adds sum_v sign_v (B^T c_v)^2 to
their diagonals; a pair s (l r^T + r l^T) goes down as two columns side by side and adds
2 s (B^T l)(B^T r) (a product: as two squares it would cancel in float32). A chunk of columns goes through
the whole sweep before the next one starts, so memory stays within the budget; origins are independent, so
their contributions simply add.
"""

import functools
from typing import List

import torch

from ..._errors import Unsupported
from ..curvature import balanced_squares, columns_within, diagonal_columns
from ..diagonals import Diagonals
from ..gradients import backward_with
from ..loss_step import add_parameter_terms, evaluate_loss, output_origin
from . import counts, elementwise_regions, folded_residuals, merges, node_ops, residuals, trace

RESIDUAL_FLOOR = 64 << 20  # bytes of dense per-sample Hessians a generic curved node may always form


def _check_residual_sizes(nodes, curved, samples, memory_budget, max_columns):
    """A generic curved node forms its per-sample Hessians whole, block by block (attention's heads, a softmax's
    rows: residuals.py), N x s x s for a block of s features: refuse before the sweeps when they exceed the memory
    budget (or 64 MiB, whichever is more: small ones always go), as attention over long sequences would. Finding
    the blocks takes a D x D pattern of D input features per sample, refused first where that does not fit."""
    limit = max(memory_budget, RESIDUAL_FLOOR)
    for index in curved:
        node = nodes[index]
        if not isinstance(node.op, node_ops.GenericOp) or node.op.linear or not node.op.forms_dense_term(node):
            continue
        features = sum(node.values[name][0].numel() for name in node.op.residual_inputs(node))
        pattern = features * features * 2  # the pattern and its transpose, as bytes
        if pattern > limit and node.op.has_second_derivative(node):
            raise Unsupported(
                f"{node.op.describe(node)}: its second-order term is a {features} x {features} matrix per sample "
                f"(its pattern alone {pattern / 2**20:.0f} MiB > memory_budget)"
            )
        labels = node.op.residual_labels(node, max_columns)
        # a node linear after all (stochastic depth or dropout in eval mode) forms no term
        size = 0 if labels is None else residuals.block_bytes(labels, samples)
        if size > limit:
            largest = int(torch.unique(labels, return_counts=True)[1].max())
            raise Unsupported(
                f"{node.op.describe(node)}: its second-order term has blocks of up to {largest} x {largest} per "
                f"sample ({size / 2**20:.0f} MiB with their eigendecompositions > memory_budget)"
            )


def graph_diagonals(plan, loss, root, loss_fn, inputs, targets, params, *, memory_budget, request, gradients=None):
    """(loss value, diagonals) as engine.run_plan; plan: this call's own copy of the cached plan
    (GraphPlan.for_call): its nodes hold the call's values. gradients: filled from the same forward."""
    nodes = plan.nodes[: plan.output + 1]  # what lies beyond the output does not reach it
    wanted_params = {id(p) for p in params if p.requires_grad}
    by_name = dict(root.named_parameters(remove_duplicate=False))
    needed = needed_nodes(nodes, by_name, wanted_params)
    shared = trace.shared_params(nodes, by_name, wanted_params)
    curved = [
        i
        for i, node in enumerate(nodes)
        if request.residuals and node.activation and node.op.curved_possible and any(needed[j] for j in node.inputs)
    ]
    # a Hessian term only: the GGN and the Fisher have none between a parameter's uses beyond their projections
    tied = trace.tied_uses(nodes, by_name, wanted_params) if request.residuals else []

    with torch.set_grad_enabled(bool(curved or tied) or gradients is not None):
        values = trace.forward(plan, root, inputs)
        output = values[nodes[plan.output].name]
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            raise Unsupported("a model output that is not a floating-point tensor")
        loss_value, targets = evaluate_loss(loss, loss_fn, output, targets)
        samples = trace.as_tuple(inputs)[0].shape[0]
        if samples == 0:  # every entry an empty sum, but for the loss's own parameter terms
            backward_with(loss_value, [], gradients)
            empty = Diagonals(params, [], 0 if request.per_sample else None)
            add_parameter_terms(loss, output, targets, empty)
            return loss_value, empty.result()
        curved = [i for i in curved if _differentiable(values[nodes[i].name])]
        tied = [(name, param, i) for name, param, i in tied if _differentiable(values[nodes[i].name])]
        # activations written as expressions: one elementwise function, one diagonal term at its input
        regions = elementwise_regions.find_regions(nodes, curved, values)
        inside = {member for region in regions for member in region.members}
        curved_all, curved = curved, [i for i in curved if i not in inside]
        graded = sorted(set(curved) | {index for _, _, index in tied} | {region.top for region in regions})
        grads = backward_with(loss_value, [values[nodes[i].name] for i in graded], gradients)
        if graded:
            for index, grad in zip(graded, grads):
                value = values[nodes[index].name]
                nodes[index].output_grad = torch.zeros_like(value) if grad is None else grad.detach()
    needed = needed_nodes(nodes, by_name, wanted_params, values)  # now that the values show which are integer
    for index in curved:
        nodes[index].carrying = [p for p, source in enumerate(nodes[index].inputs) if needed[source]]
    # after the forward: pruning hooks computed this call's effective weights
    diagonals = Diagonals(
        params,
        [node.op.module for node in nodes if isinstance(node.op, node_ops.ModuleOp)],
        samples if request.per_sample else None,
    )
    add_parameter_terms(loss, output, targets, diagonals)
    wanted = diagonals.wanted
    for name, value in list(values.items()):
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):  # parameters are found by id
            values[name] = value.detach()
    for node in nodes:
        if node.record is not None:
            node.record.input, node.record.output = node.record.input.detach(), node.record.output.detach()
            node.record.output_grad = node.output_grad

    if any(needed):
        with torch.no_grad():
            # an eighth of the budget: the pulls of a graph keep many chunks in flight (pending merges, the birth
            # columns, a vmapped vjp's cotangents, results and temporaries): with half, GPT-2 (2 layers, width 32,
            # batch 8) peaked at 2.6 GiB over a 1 GiB budget, with an eighth at 765 MiB and 37% faster (chunks
            # nearer the cache); ConvNeXt and BERT within 4% of their times, ResNet-18 the same (one chunk)
            budget_columns = columns_within(samples, _widest(values), output.element_size(), memory_budget // 8)
            budget_columns = _within_for_shared(shared, samples, budget_columns, output.element_size(), memory_budget)
            _check_residual_sizes(nodes, curved, samples, memory_budget, budget_columns)
            curvature = output_origin(
                request, loss, output.detach(), targets, loss_fn, max_columns=None, memory_budget=memory_budget
            )
            shared_ids = frozenset(id(p) for p in shared)
            sweep = functools.partial(
                _sweep,
                needed=needed,
                wanted=wanted,
                shared=shared_ids,
                accumulate=diagonals.add,
                per_sample=request.per_sample,
            )
            pair_columns = _pair_columns(nodes, by_name, wanted, shared, samples, budget_columns, output, memory_budget)
            flops = counts.node_flops(nodes, values)  # folds are taken where they cost less (folded_residuals)
            origins = []  # (the lowest node its columns are born at, what sweeps them)
            if needed[plan.output]:
                origins.append(
                    (plan.output, functools.partial(_sweep_loss, nodes, plan.output, curvature, budget_columns))
                )
            for region in regions:
                if needed[region.source]:
                    below = folded_residuals.widening_linear(nodes[region.source], needed, shared_ids, flops)
                    run = functools.partial(
                        _sweep_region, nodes, region, below, values, wanted, request, diagonals,
                        max_columns=budget_columns,
                    )  # fmt: skip
                    origins.append((region.source if below is None else below.inputs[0], run))
            for index in curved:
                below = folded_residuals.linear_below(nodes, nodes[index], needed, shared_ids, flops)
                run = functools.partial(
                    _sweep_curved, nodes, index, below, needed, wanted, request, diagonals, budget_columns,
                    pair_columns,
                )  # fmt: skip
                origins.append((_lowest_birth(nodes, index, below, needed), run))
            cuts = []
            if not shared:
                cuts = _merge_cuts(
                    nodes, needed, values, flops, curved_all, regions, loss, output, samples, memory_budget,
                )  # fmt: skip
            merged = merges.MergedSweeps(sweep, nodes, cuts, values, budget_columns)
            for _, run in sorted(origins, key=lambda origin: -origin[0]):  # highest first: each cut's sum whole
                run(sweep=merged)
            merged.finish()
            for name, param, index in tied:
                _mixed_terms(nodes, index, name, param, sweep, by_name, values, budget_columns, memory_budget)
    return loss_value, diagonals.result()


def _sweep_loss(nodes, output, curvature, max_columns, sweep):
    for columns, signs in curvature.signed_factor_chunks(max_columns):
        sweep(nodes, {output: columns.clone()}, signs)


def _sweep_curved(nodes, index, below, needed, wanted, request, diagonals, max_columns, pair_columns, sweep):
    """A curved node's term: folded through the widening Linear `below` it (an activation), else its signed
    columns and pairs from its inputs."""
    node = nodes[index]
    if below is not None:  # an activation on a widening Linear: its term in closed form there
        folded = folded_residuals.folded_terms(node, below, wanted, request.per_sample, max_columns)
        _add_folded(nodes, below, folded, diagonals, sweep)
        return
    for left, right, signs in node.op.residual_terms(node, max_columns, pair_columns):
        if right is not None:
            _sweep_pair(nodes, node, left, right, signs, needed, sweep)
            continue
        births = _births(node, left, needed)
        if births:
            sweep(nodes, births, signs)


def _lowest_birth(nodes, index, below, needed):
    """The lowest node a curved node's columns are born at: the input of the Linear it folds through, else its
    lowest input that carries columns."""
    if below is not None:
        return below.inputs[0]
    return min((source for source in nodes[index].inputs if needed[source]), default=index)


def _merge_cuts(nodes, needed, values, flops, curved, regions, loss, output, samples, memory_budget):
    """The cuts worth merging the origins' columns at (merges.py), from the cost model's counts (flops: the call's
    counts.node_flops). Not called where a parameter is used at several places: its uses' projections add up within
    one origin's columns."""
    starts, flops = counts.graph_counts(nodes, values, set(curved), set(), regions, flops)
    starts[len(nodes)] = starts.get(len(nodes), 0) + counts.loss_columns_of(loss, output)
    return merges.chosen_cuts(nodes, needed, values, starts, flops, samples, memory_budget)


def _add_folded(nodes, below, folded, diagonals, sweep):
    """A term folded through the Linear `below` (folded_residuals.py): its parameter terms added, its columns swept
    from the Linear's input."""
    params, chunks = folded
    for param, value in params:
        diagonals.add(param, value)
    for columns, signs in chunks:
        sweep(nodes, {below.inputs[0]: columns}, signs)


def _sweep_region(nodes, region, below, values, wanted, request, diagonals, *, max_columns, sweep):
    """An elementwise region's term diag(g * f''(x)) at its input x (elementwise_regions.py): folded through the
    widening Linear `below` x, else as unit columns."""
    r = nodes[region.top].output_grad * elementwise_regions.second_derivative(nodes, region, values)
    if below is not None:
        folded = folded_residuals.diagonal_folded(r, below, wanted, request.per_sample, max_columns)
        _add_folded(nodes, below, folded, diagonals, sweep)
        return
    for columns, signs in diagonal_columns(r.reshape(r.shape[0], -1), max_columns):
        sweep(nodes, {region.source: columns}, signs)


def _mixed_terms(nodes, index, name, param, sweep, by_name, values, max_columns, memory_budget):
    """A node using `param` whose input another use of it moves: the Hessian's term between the two uses through
    this node's mixed second derivative, 2 sum_n sum_c P_c . Q_c on the diagonal. One unit column c per input
    feature is pulled down to the other uses (P_c: their summed per-sample projections, d x_c / d param) and
    Q_c = d/dparam (g . df/dx c) is formed at the node (g the loss's gradient at its output)."""
    node = nodes[index]
    needed = needed_nodes(nodes, by_name, {id(param)}, values)
    for position, source in enumerate(node.inputs):
        if not needed[source]:
            continue
        x = values[nodes[source].name]
        samples, width = x.shape[0], x[0].numel()
        # the projections and the mixed terms: two (N, columns, *param.shape) tensors per chunk
        chunk = _within_for_shared([param, param], samples, max_columns, x.element_size(), memory_budget)
        for start in range(0, width, chunk):
            count = min(chunk, width - start)
            columns = torch.zeros(samples, count, width, dtype=x.dtype, device=x.device)
            columns[:, torch.arange(count), torch.arange(start, start + count)] = 1
            mixed = node.op.mixed_projections(node, position, columns, param)
            if mixed is None:
                raise Unsupported(
                    f"parameter {name!r} used by {node.op.describe(node)}, fed by another of its uses: no mixed "
                    "second-order term there"
                )
            sweep(nodes, {source: columns}, None, needed=needed, wanted={id(param)}, partners={id(param): mixed})


def _differentiable(value):
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad


def _widest(values):
    widths = [v[0].numel() for v in values.values() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > 0]
    return max(widths, default=1)


def _births(node, piece, needed):
    """{node index: the columns born there} from a curved node's {input position: columns}."""
    births: dict = {}
    for position, columns in piece.items():
        source = node.inputs[position]
        if needed[source]:
            births[source] = columns.clone() if source not in births else births[source] + columns
    return births


def _sweep_pair(nodes, node, left, right, signs, needed, sweep):
    """One chunk of signed pairs s (l r^T + r l^T) born at a curved node: l and r go down side by side as 2V
    columns and each parameter gets 2 s (J l)(J r) from its per-sample projections. Where a node cannot give
    those (a module called functionally, pruned weights) the pair goes down as two balanced squares instead:
    exact too, less accurate in float32 (curvature.balanced_squares). Nothing is added before the sweep ends."""
    width = signs.shape[1]
    sides = {}
    for position in set(left) | set(right):
        some = left.get(position, right.get(position))
        zeros = torch.zeros_like(some)
        sides[position] = torch.cat([left.get(position, zeros), right.get(position, zeros)], dim=1)
    births = _births(node, sides, needed)
    if not births:
        return
    try:
        sweep(nodes, births, signs, paired=width)
    except Unsupported:
        squares, square_signs = balanced_squares(left, right, signs)
        sweep(nodes, _births(node, squares, needed), square_signs)


def _pair_products(projection, signs, per_sample):
    """2 sum_v s_v P[:, v] P[:, V + v] over the pairs (and the samples unless per_sample)."""
    width = signs.shape[1]
    product = 2 * projection[:, :width] * projection[:, width:]
    product = product * signs.reshape(*signs.shape, *[1] * (projection.dim() - 2))
    return product.sum(dim=1) if per_sample else product.sum(dim=(0, 1))


def _sweep(
    nodes,
    births,
    signs,
    *,
    needed,
    wanted,
    shared,
    accumulate,
    per_sample,
    partners=None,
    paired=0,
    stop=None,
    gather=None,
):
    """Pulls one chunk of an origin's columns from its birth nodes down to the lowest parameters. A parameter
    used at several places (shared) has its per-sample projections added over its uses, then squared: the cross
    terms between the uses are in the square. With partners (id(parameter) -> (N, V, *shape)), a mixed term's
    columns: each projection is multiplied by its partner instead, 2 P Q, and nothing else is added. With
    paired = V, the columns are V pairs side by side (_sweep_pair): projections multiplied pairwise, added at
    the end (a node that cannot project raises Unsupported before anything was added). With stop (a cut every
    column passes, merges.py), the columns reaching it are handed to gather(stop, columns, signs, paired) there,
    its own work left to the merged columns."""
    pending = dict(births)
    single = wanted - shared  # the parameters used at one place: their squares add at once
    projections: dict = {}  # id(shared parameter) -> (parameter, the sum of its projections so far)
    products: dict = {}  # paired: id(parameter) -> (parameter, its products so far)

    def add_product(param, value):
        known = products.get(id(param))
        products[id(param)] = (param, value if known is None else known[1] + value)

    def add_products(param, projection):
        add_product(param, _pair_products(projection, signs, per_sample))

    pull_signs = signs if not paired else torch.cat([signs, signs], dim=1)
    for index in range(max(births), -1, -1):
        columns = pending.pop(index, None)
        if columns is None:
            continue
        if index == stop:
            if pending:  # cut_points makes this impossible: columns below a cut that did not pass it
                raise RuntimeError(f"columns bypass the merge at node {index}: {sorted(pending)}")
            gather(stop, columns, signs, paired)
            break
        node = nodes[index]
        if signs is not None and signs.dtype != columns.dtype:  # born in a part computed in another precision
            signs, pull_signs = signs.to(columns.dtype), pull_signs.to(columns.dtype)
        if single and paired:
            direct = node.op.pair_diagonals(node, columns, signs, single, per_sample)
            if direct is not None:  # formed by the rule (an embedding's rows, a Linear over positions)
                for param, value in direct:
                    add_product(param, value)
            else:
                for param, projection in node.op.column_projections(node, columns, single):
                    add_products(param, projection)
        elif single:
            for param, value in node.op.column_diagonals(node, columns, signs, single, per_sample):
                accumulate(param, value)
        if shared:
            for param, projection in node.op.column_projections(node, columns, shared & wanted):
                known = projections.get(id(param))
                projections[id(param)] = (param, projection if known is None else known[1] + projection)
        positions = [p for p, source in enumerate(node.inputs) if needed[source]]
        if not positions:
            continue
        for position, pulled in zip(positions, node.op.pull(node, columns, pull_signs, positions)):
            source = node.inputs[position]
            if source in pending:
                pending[source] = pending[source] + pulled  # another path of the same origin: add as vectors
            else:
                # rules may scale their columns in place: a tensor that reaches two nodes must not be shared
                common = pulled is columns or any(pulled is other for other in pending.values())
                pending[source] = pulled.clone() if common and len(positions) > 1 else pulled
        del columns
    for param, projection in projections.values():
        if paired:
            add_products(param, projection)
        elif partners is None:
            accumulate(param, node_ops.signed_square_sum(projection, signs, per_sample))
        else:
            product = 2 * projection * partners[id(param)]
            accumulate(param, product.sum(dim=1) if per_sample else product.sum(dim=(0, 1)))
    for param, value in products.values():
        accumulate(param, value)


def needed_nodes(nodes, by_name, wanted, values=None):
    """needed[i]: node i or a node below it uses a parameter whose diagonal is asked for. With the values of a
    forward pass, integer tensors (indices, masks) are not: they carry no columns, whatever made them."""
    needed: List[bool] = []
    for node in nodes:
        own = node.activation and any(id(by_name.get(name)) in wanted for name in node.params)
        floating = values is None or (
            isinstance(values[node.name], torch.Tensor) and values[node.name].is_floating_point()
        )
        needed.append(bool(floating and (own or any(needed[j] for j in node.inputs))))
    return needed


def _pair_columns(nodes, by_name, wanted, shared, samples, columns, output, memory_budget):
    """Pairs per chunk: 2 columns each within the sweep's columns, and the per-sample projections of the node with
    the most wanted entries that has no products of its own (2 x N x pairs x its size) and of the shared
    parameters, held to the end, in budget."""
    heaviest: list = []
    for node in nodes:
        if isinstance(node.op, node_ops.ModuleOp) and node.record is not None and node.op.forms_pair_diagonals(node):
            continue  # forms the products itself, from the columns (an embedding's rows, a Linear's positions)
        tensors = [by_name[name] for name in node.params if name in by_name and id(by_name[name]) in wanted]
        if sum(t.numel() for t in tensors) > sum(t.numel() for t in heaviest):
            heaviest = tensors
    held = 2 * (heaviest + list(shared))
    return _within_for_shared(held, samples, max(1, columns // 2), output.element_size(), memory_budget)


def _within_for_shared(shared, samples, columns, itemsize, memory_budget):
    """Fewer columns per chunk where a shared parameter's per-sample projections (N x columns x its size) would
    not fit a quarter of the memory budget (the vjps that form them, and the products of pairs, take as much
    again: with the whole budget MobileNetV3-small's squeeze-excitation convolutions peaked at 2.6x it); refused
    when not even one column fits the budget."""
    if not shared:
        return columns
    size = samples * sum(p.numel() for p in shared) * itemsize
    if max(memory_budget, RESIDUAL_FLOOR) < size:
        fitting = 0
    else:
        fitting = max(1, max(memory_budget // 4, RESIDUAL_FLOOR) // max(1, size))
    if fitting < 1:
        raise Unsupported(
            f"parameter(s) used at several places ({sum(p.numel() for p in shared)} entries): their per-sample "
            f"projections take {size / 2**20:.0f} MiB per column (> memory_budget)"
        )
    return max(1, min(columns, fitting))
