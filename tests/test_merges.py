"""Origins merged at cuts (backprop/graph/merges.py): the columns reaching a tensor every path passes are summed
into one D x D matrix per sample and its eigen-columns go on from there. Exact against the float64 brute force
wherever merges are forced (MARGIN raised so that every cut that fits the budget merges), chosen only where they
pay, and the gathers are counted so that a test cannot pass with no merge at all."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_backprop_exact, brute_force, relative_error, vectors
from test_graph import Y5, RandomGraph

from torch_secorder import model_ggn_diagonal, model_hessian_diagonal
from torch_secorder.backprop.graph import merges

D = torch.float64


class Block(nn.Module):
    """A pre-norm transformer block on (N, T, d): LayerNorm, attention through scaled_dot_product_attention, an
    MLP with GELU, both residual."""

    def __init__(self, width, heads=2):
        super().__init__()
        self.heads = heads
        self.attention = nn.ModuleDict(
            {"norm": nn.LayerNorm(width), "qkv": nn.Linear(width, 3 * width), "out": nn.Linear(width, width)}
        )
        self.mlp = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, x):
        n, t, c = x.shape
        q, k, v = (
            part.reshape(n, t, self.heads, c // self.heads).transpose(1, 2)
            for part in self.attention["qkv"](self.attention["norm"](x)).split(c, dim=2)
        )
        mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, c)
        x = x + self.attention["out"](mixed)
        return x + self.mlp(x)


class Transformer(nn.Module):
    def __init__(self, width=4, depth=3, tokens=3, classes=3):
        super().__init__()
        self.embed = nn.Linear(2, width)
        self.position = nn.Parameter(torch.randn(tokens, width) * 0.3)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, x):
        x = self.embed(x) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


class DeepResidualMLP(nn.Module):
    def __init__(self, width=6, depth=4):
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, width))
            for _ in range(depth)
        )
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        x = torch.sigmoid(self.inp(x))
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


@pytest.fixture
def forced(monkeypatch):
    """Every cut that fits the budget merges; returns the list of cuts gathered at (one entry per gather)."""
    gathered = []
    original = merges.MergedSweeps._gather

    def counting(self, cut, *args):
        gathered.append(cut)
        return original(self, cut, *args)

    monkeypatch.setattr(merges, "MARGIN", math.inf)
    monkeypatch.setattr(merges.MergedSweeps, "_gather", counting)
    return gathered


def test_a_deep_residual_mlp_merged_at_every_block_is_exact(forced):
    torch.manual_seed(0)
    model = DeepResidualMLP().double()
    assert_backprop_exact(model, F.cross_entropy, torch.randn(4, 5, dtype=D), torch.tensor([0, 2, 1, 1]))
    assert len(set(forced)) >= 5  # the stream before and after each of the 4 blocks


def test_a_transformer_merged_between_blocks_is_exact(forced):
    """LayerNorm's pairs, attention's columns and pairs, a folded GELU: all gathered into the sums."""
    torch.manual_seed(1)
    model = Transformer().double()
    x = torch.randn(3, 3, 2, dtype=D)
    assert_backprop_exact(model, F.cross_entropy, x, torch.tensor([0, 2, 1]))
    assert len(set(forced)) >= 3


def test_per_sample_diagonals_with_merges(forced):
    torch.manual_seed(2)
    model = DeepResidualMLP(depth=2).double()
    x, y = torch.randn(3, 5, dtype=D), torch.tensor([0, 2, 1])
    per_sample = model_hessian_diagonal(model, F.cross_entropy, x, y, method="backprop", per_sample=True)
    assert forced
    for n in range(3):  # sample n's own term: its loss is 1/N of the mean over the batch
        expected = brute_force(
            model, lambda out, t: F.cross_entropy(out, t, reduction="sum") / 3, x[n : n + 1], y[n : n + 1]
        )
        assert relative_error([d[n] for d in per_sample], expected) < 1e-10


class WideHead(nn.Module):
    def __init__(self, classes=40):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, classes)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.head(h + torch.tanh(self.b(h)))


def test_the_ggn_of_a_wide_output_merges_below_the_head(forced):
    """Only the loss is an origin, but its columns (C - 1 per sample) outnumber the features below the head."""
    torch.manual_seed(3)
    model = WideHead().double()
    x, y = torch.randn(5, 4, dtype=D), torch.randint(0, 40, (5,))
    merged = model_ggn_diagonal(model, F.cross_entropy, x, y, method="backprop")
    assert forced
    expected = model_ggn_diagonal(model, F.cross_entropy, x, y, method="autograd")
    assert relative_error(merged, expected) < 1e-10


@pytest.mark.parametrize("seed", range(12))
def test_random_graphs_with_every_cut_merged(forced, seed):
    torch.manual_seed(seed)
    model = RandomGraph(seed, steps=8).double().eval()
    assert_backprop_exact(model, F.cross_entropy, vectors(4), Y5)


def test_float32_with_merges_stays_near_float64(forced):
    torch.manual_seed(4)
    model = Transformer(width=8, depth=3, tokens=4).double()
    x, y = torch.randn(4, 4, 2, dtype=D), torch.tensor([0, 2, 1, 0])
    expected = brute_force(model, F.cross_entropy, x, y)
    actual = model_hessian_diagonal(model.float(), F.cross_entropy, x.float(), y, method="backprop")
    assert forced
    assert relative_error(actual, expected) < 1e-5


# ---------------------------------------------------------------- where cuts are, and when they pay
class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.c(torch.tanh(self.b(h)) + h)


def test_a_skip_connection_rules_out_the_cuts_it_spans():
    from torch_secorder.backprop.graph import trace

    model = Skip()
    x = torch.randn(2, 3)
    graph = trace.plan_for(model, (x,)).for_call()
    values = trace.forward(graph, model, (x,))
    nodes = graph.nodes[: graph.output + 1]
    needed = [bool(node.inputs) for node in nodes]  # everything but the input
    cuts = [nodes[i].name for i in merges.cut_points(nodes, needed, values, 2)]
    assert "tanh" in cuts  # h: every column from above reaches a or below through it
    assert not any(name.startswith(("b", "tanh_1")) for name in cuts)  # inside the skip: h goes around them


def test_merges_are_chosen_where_they_pay():
    """A deep stream with many columns arriving merges; two columns arriving never do."""
    cuts = [10, 20, 30]
    below = [1000.0 * (i + 1) for i in range(41)]  # 1,000 multiply-adds per node
    features = {10: 8, 20: 8, 30: 8}
    busy = {40: 200, 35: 300, 25: 300, 15: 300}
    assert merges.choose_merges(cuts, busy, below, features, 4, 1 << 30) == [30, 20, 10]
    assert merges.choose_merges(cuts, {40: 2}, below, features, 4, 1 << 30) == []
    # the sums must fit: three N x D x D float64 matrices within half the budget
    assert merges.choose_merges(cuts, busy, below, features, 4, 3 * 4 * 64 * 8 * 2 - 1) == []


def test_each_origin_crosses_the_nodes_down_to_its_cut():
    # the loss (5 columns, from the top, 10) stops at the cut 4, an origin of 2 columns starting at 6 too; the
    # cut's 3 columns go on to the first node; an origin at 3 is under the cut
    found = merges.segments({10: 5, 6: 2, 3: 1}, [4], {4: 3})
    assert sorted(found) == sorted([(5, 10, 4), (2, 6, 4), (1, 3, -1), (3, 5, -1)])
    assert merges.dense_work({10: 5, 6: 2, 3: 1}, [4], {4: 3}) == ((5 + 2) * 9, 27)


def test_the_cost_prediction_counts_the_merges(monkeypatch):
    """Merged, the columns cross fewer nodes (less sweep work) and the Gram products and eigendecompositions are
    priced; with no merge (MARGIN 0) the prediction is the sweeps alone."""
    from torch_secorder.backprop import plan_model, predicted_cost

    torch.manual_seed(5)
    model = DeepResidualMLP(width=16, depth=8)
    x = (torch.randn(4, 5),)
    plan = plan_model(model, F.cross_entropy, x)
    merged = predicted_cost(plan, x, 1 << 30)
    monkeypatch.setattr(merges, "MARGIN", 0.0)
    unmerged = predicted_cost(plan, x, 1 << 30)
    assert merged.merge_multiply_adds > 0 and unmerged.merge_multiply_adds == 0
    assert merged.multiply_adds < 0.5 * unmerged.multiply_adds
    assert merged.multiply_adds + merged.merge_multiply_adds < unmerged.multiply_adds
