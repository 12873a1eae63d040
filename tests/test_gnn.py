"""GNN encoders: the registry, hand-written convolutions, depth/width/activation/normalisation, inputs."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Data

import relkd.gnn as gnn
from relkd.graphs import RelationGraph

N, D = 9, 5


@pytest.fixture
def graph():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    return RelationGraph(x)


def in_neighbours(edge_index: torch.Tensor, n: int) -> list[list[int]]:
    nbrs: list[list[int]] = [[] for _ in range(n)]
    for j, i in edge_index.t().tolist():
        nbrs[i].append(j)
    return nbrs


def test_registry_lists_the_required_convolutions():
    assert {"tag", "gcn", "gat", "sage"} <= set(gnn.available())


def test_unknown_names_suggest_the_close_match():
    with pytest.raises(KeyError, match="Did you mean 'gcn'"):
        gnn.create("gcm", 4, 4, 4)
    with pytest.raises(KeyError, match="Did you mean 'relu'"):
        gnn.create("gcn", 4, 4, 4, num_layers=2, act="rleu")
    with pytest.raises(KeyError, match="Did you mean 'batch'"):
        gnn.create("gcn", 4, 4, 4, num_layers=2, norm="btch")


def test_tag_one_hop_by_hand(graph):
    """HKD's layer: unweighted kNN edges, TAG K=1 -> x W0 + mean_{j in N(i)} x_j W1 + b, L2 norm."""
    torch.manual_seed(1)
    enc = gnn.create("tag", D, 7, 3, num_layers=1, K=1, normalize=True).double()
    torch.nn.init.normal_(enc.convs[0].bias)
    edge_index, _ = graph.knn(4, loop=True)
    out = enc(graph.x, edge_index)
    w0, w1 = enc.convs[0].lins[0].weight, enc.convs[0].lins[1].weight
    bias = enc.convs[0].bias
    expected = []
    for i, nbrs in enumerate(in_neighbours(edge_index, N)):
        mean = sum(graph.x[j] for j in nbrs) / len(nbrs)
        h = w0 @ graph.x[i] + w1 @ mean + bias
        expected.append(h / h.norm())
    torch.testing.assert_close(out, torch.stack(expected), rtol=1e-12, atol=1e-12)


def test_tag_weighted_uses_symmetric_in_degree_normalisation(graph):
    enc = gnn.create("tag", D, D, 2, K=1).double()
    edge_index, _ = graph.knn(3)
    weight = torch.rand(edge_index.shape[1], dtype=torch.float64) + 0.1
    out = enc(graph.x, edge_index, weight)
    a = torch.zeros(N, N, dtype=torch.float64)
    for (j, i), w in zip(edge_index.t().tolist(), weight.tolist(), strict=True):
        a[i, j] += w
    d = a.sum(1).rsqrt()
    prop = d[:, None] * a * d[None, :]
    conv = enc.convs[0]
    expected = graph.x @ conv.lins[0].weight.t() + prop @ graph.x @ conv.lins[1].weight.t()
    torch.testing.assert_close(out, expected + conv.bias, rtol=1e-12, atol=1e-12)


def test_gcn_by_hand_adds_self_loops(graph):
    enc = gnn.create("gcn", D, D, 3).double()
    edge_index, _ = graph.knn(2)
    out = enc(graph.x, edge_index)
    a = torch.eye(N, dtype=torch.float64)
    for j, i in edge_index.t().tolist():
        a[i, j] = 1.0
    d = a.sum(1).rsqrt()
    conv = enc.convs[0]
    expected = (d[:, None] * a * d[None, :]) @ graph.x @ conv.lin.weight.t() + conv.bias
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["tag", "gcn", "gat", "sage"])
def test_depth_width_and_gradients(graph, name):
    kwargs = {"heads": 2} if name == "gat" else {}
    enc = gnn.create(name, D, 8, 6, num_layers=3, act="elu", norm="layer", dropout=0.1, **kwargs)
    assert len(enc.convs) == 3 and len(enc.acts) == 2 and len(enc.norms) == 2
    x = graph.x.float().requires_grad_()
    out = enc(x, graph.knn(3)[0])
    assert out.shape == (N, 6) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad is not None
    assert all(p.grad is not None for p in enc.parameters())


def test_normalize_gives_unit_rows(graph):
    enc = gnn.create("sage", D, 4, 4, num_layers=2, normalize=True)
    out = enc.from_graph(graph, k=3)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(N))


def test_from_graph_matches_forward_for_graphs_and_data(graph):
    enc = gnn.create("gcn", D, 4, 4, num_layers=2).double()
    edge_index, weight = graph.knn(3, relation="kernel:rbf")
    expected = enc(graph.x, edge_index, weight)
    torch.testing.assert_close(enc.from_graph(graph, 3, "kernel:rbf", weighted=True), expected)
    data = Data(x=graph.x, edge_index=edge_index, edge_attr=weight.unsqueeze(-1))
    torch.testing.assert_close(enc.from_graph(data, weighted=True), expected)
    unweighted = enc(graph.x, graph.knn(3)[0])
    torch.testing.assert_close(enc.from_graph(graph, k=3), unweighted)


def test_from_graph_embeds_a_batch_of_graphs_disjointly():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    enc = gnn.create("tag", 3, 3, 3).double()
    both = enc.from_graph(RelationGraph(x), k=2)
    for b in range(2):
        torch.testing.assert_close(both[6 * b : 6 * (b + 1)], enc.from_graph(RelationGraph(x[b]), k=2))


def test_layers_without_edge_weights_warn_and_ignore_them(graph):
    enc = gnn.create("gat", D, 4, 4)
    edge_index, weight = graph.knn(3)
    x = graph.x.float()
    with pytest.warns(UserWarning, match="ignores edge weights"):
        out = enc(x, edge_index, weight.float())
    torch.testing.assert_close(out, enc(x, edge_index))


def test_encoder_parameters_are_visible_through_an_owning_module():
    owner = torch.nn.Module()
    owner.encoder = gnn.create("tag", 4, 4, 4)
    assert {id(p) for p in owner.parameters()} == {id(p) for p in owner.encoder.parameters()}
    assert sum(p.numel() for p in owner.parameters()) > 0


def test_half_input_runs_in_the_encoder_dtype(graph):
    enc = gnn.create("tag", D, 4, 4)
    out = enc(graph.x.half(), graph.knn(3)[0])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
