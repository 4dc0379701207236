"""Merging origins at a cut of the graph: one tensor every column from above passes (a transformer's residual
stream between blocks, a CNN's activation between stages).

Below a cut c only the sum of what arrives there matters: M_n = sum_v s_nv c_nv c_nv^T per sample, a D x D matrix
for D features at c. Without merging, every origin above c pulls its own columns down to the first layer; a
12-block transformer pays each block's columns (its LayerNorms', its attention's, its MLP's) through every block
below it. Merging gathers the columns arriving at c into M (float64), and sends M's eigen-columns (at most D, at
most as many as arrived) down from there instead. Exact: the diagonal below c is diag(J^T M J) either way.

A merge costs a Gram product per column arriving (D^2 multiply-adds each) and one eigendecomposition per sample
(about D^3), so it is chosen where the columns saved, times the work below c, outweigh those: at every block of
timm's 12-block ViT-tiny, nowhere on BERT-tiny (its sums would not fit the default budget). A parameter used at
several places has its projections summed over its uses before squaring; a cut between its uses would lose the
cross terms, so graphs with shared parameters are not merged.
"""

import itertools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..curvature import eigen_columns

# Relative prices per multiply-add, in units of a large matrix product's: the engine's sweeps (cost.py's
# MULTIPLY_ADD_SLOWDOWN), a float64 Gram product, and a float64 eigendecomposition per D^3 (2-core CPU:
# 8 x 960^2 eigh in 4.9 s, about 8x a float32 product's time per D^3) at D >= EIGEN_FULL_SPEED; smaller ones run
# at lower speed, their time per matrix about proportional to D^2 (measured 54, 102 and 186 products' time per
# D^3 at D = 128, 64, 32): eigen_price.
SWEEP_PRICE, GRAM_PRICE, EIGEN_PRICE = 7.0, 2.0, 8.0
EIGEN_FULL_SPEED = 960
# the merged work must be below this share of the unmerged one: the counts are estimates
MARGIN = 0.5


def cut_points(nodes: Sequence, needed: Sequence[bool], values: Dict, samples: int) -> List[int]:
    """Indices of nodes that every column from a needed node above them to one below them passes: no edge
    between needed nodes crosses them in the graph's order (a skip connection around a node rules it out), and
    their value is a floating tensor with the batch axis first."""
    last_use: Dict[int, int] = {}
    for index, node in enumerate(nodes):
        for source in node.inputs:
            if needed[source]:
                last_use[source] = max(last_use.get(source, -1), index)
    cuts, reach = [], -1
    for index, node in enumerate(nodes):
        value = values.get(node.name)
        if (
            needed[index]
            and reach <= index
            and index in last_use
            and isinstance(value, torch.Tensor)
            and value.dim() > 0
            and value.shape[0] == samples
        ):
            cuts.append(index)
        reach = max(reach, last_use.get(index, -1))
    return cuts


def choose_merges(
    cuts: Sequence[int],
    starts: Dict[int, int],
    below: Sequence[float],
    features: Dict[int, int],
    samples: int,
    memory_budget: int,
) -> List[int]:
    """The cuts to merge at, highest first. starts: {node index s: columns per sample of the origins whose
    columns start crossing the nodes before s} (the loss at len(nodes)); below[c]: one sample's multiply-adds of
    the nodes up to c (those a column at c crosses); features[c]: D at c. Greedy from the top: merge where the
    merged work is under MARGIN of the unmerged and three N x D x D float64 matrices (the sum, its eigenvectors,
    the next cut's sum) fit half the budget."""
    chosen: List[int] = []
    arriving, boundary = 0, max(starts, default=0) + 1
    for cut in sorted(cuts, reverse=True):
        arriving += sum(width for start, width in starts.items() if cut < start < boundary)
        boundary = cut + 1
        size = features[cut]
        if not arriving or 3 * samples * size * size * 8 > memory_budget // 2:
            continue
        unmerged = SWEEP_PRICE * arriving * below[cut]
        merged = GRAM_PRICE * arriving * size * size + EIGEN_PRICE * size**3 + SWEEP_PRICE * size * below[cut]
        if merged < MARGIN * unmerged:
            chosen.append(cut)
            arriving = min(arriving, size)
    return chosen


def chosen_cuts(nodes, needed, values, starts, flops, samples, memory_budget) -> List[int]:
    """The cuts to merge at for these counts (cost.graph_counts): flops per node, summed into below[c]."""
    cuts = cut_points(nodes, needed, values, samples)
    if not cuts:
        return []
    features = {cut: values[nodes[cut].name][0].numel() for cut in cuts}
    below = list(itertools.accumulate(flops))
    return choose_merges(cuts, starts, below, features, samples, memory_budget)


def segments(starts: Dict[int, int], chosen: Sequence[int], features: Dict[int, int]) -> List[Tuple[int, int, int]]:
    """[(columns per sample, start, stop)]: an origin's columns cross the nodes stop < i < start (stop the first
    chosen cut under its start, -1 where none is), a chosen cut's the nodes from it down to the next one."""
    cuts = sorted(chosen)

    def stop_under(start: int) -> int:
        return max((cut for cut in cuts if cut < start), default=-1)

    found = [(width, start, stop_under(start)) for start, width in starts.items()]
    return found + [(features[cut], cut + 1, stop_under(cut)) for cut in cuts]


def eigen_price(size: int) -> float:
    """One size x size eigendecomposition, in a large matrix product's multiply-adds (see EIGEN_PRICE). The folds
    (folded_residuals.py) use it; the merges' choice and cost.py still price every size at full speed (to do:
    their tests and benchmarks re-measured with this)."""
    return EIGEN_PRICE * size**3 * max(1.0, EIGEN_FULL_SPEED / max(size, 1))


def dense_work(starts: Dict[int, int], chosen: Sequence[int], features: Dict[int, int]) -> Tuple[float, float]:
    """(Gram multiply-adds, eigendecomposition D^3s) per sample of merging at `chosen`."""
    gram = sum(width * features[stop] ** 2 for width, _, stop in segments(starts, chosen, features) if stop >= 0)
    return float(gram), float(sum(features[cut] ** 3 for cut in chosen))


class MergedSweeps:
    """The sweep origins call, merging at `cuts`: columns from births above a chosen cut stop there and are
    gathered into its sum; before an origin below a cut runs, that cut's sum is decomposed and its eigen-columns
    swept on (to the next cut). Origins must come in order of their births, highest first (engine.py sorts
    them); finish() sends the last sums down."""

    def __init__(self, sweep: Callable, nodes: Sequence, cuts: Sequence[int], values: Dict, max_columns: int):
        self.sweep, self.nodes, self.max_columns = sweep, nodes, max_columns
        self.dtypes = {cut: values[nodes[cut].name].dtype for cut in cuts}
        self.open = sorted(cuts, reverse=True)  # not yet sent down
        self.sums: Dict[int, torch.Tensor] = {}

    def stop_for(self, lowest: int) -> Optional[int]:
        return next((cut for cut in self.open if cut <= lowest), None)

    def __call__(self, nodes, births, signs, paired=0, **options):
        if options:  # a mixed term's own sweep (its own needed, partners): never merged
            return self.sweep(nodes, births, signs, paired=paired, **options)
        lowest = min(births)
        self._send_down_above(lowest)
        stop = self.stop_for(lowest)
        return self.sweep(nodes, births, signs, paired=paired, stop=stop, gather=self._gather)

    def finish(self):
        self._send_down_above(-1)

    def _gather(self, cut, columns, signs, paired):
        """Adds the columns (N, V, *shape) (pairs side by side where paired) into the cut's sum, in float64."""
        samples, width = columns.shape[:2]
        flat = columns.reshape(samples, width, -1).double()
        if signs is None:
            signs = flat.new_ones(samples, paired or width)
        signs = signs.double().expand(samples, -1).unsqueeze(2)
        total = self.sums.get(cut)
        if total is None:
            total = self.sums[cut] = flat.new_zeros(samples, flat.shape[2], flat.shape[2])
        if paired:
            left, right = flat[:, :paired] * signs, flat[:, paired:]
            product = left.transpose(1, 2) @ right
            total += product + product.transpose(1, 2)
        else:
            total.baddbmm_((flat * signs).transpose(1, 2), flat)

    def _send_down_above(self, lowest):
        while self.open and self.open[0] > lowest:
            cut = self.open.pop(0)
            if cut in self.sums:
                self._send_down(cut, self.sums.pop(cut))

    def _send_down(self, cut, total):
        """total's eigen-columns, those of a nonzero eigenvalue in some sample, swept from the cut in chunks."""
        stop, dtype = self.stop_for(cut - 1), self.dtypes[cut]  # columns are (N, V, features), flat

        def floor(magnitude):  # rounding noise of each sample's own sum
            return magnitude.amax(dim=(1, 2), keepdim=True) * magnitude.shape[-1] * torch.finfo(torch.float64).eps

        chunks = eigen_columns(total.unsqueeze(1), floor, self.max_columns, dtype)
        del total  # the eigendecomposition's own copy is all that is held
        for _, columns, signs in chunks:
            self.sweep(self.nodes, {cut: columns}, signs, stop=stop, gather=self._gather)
