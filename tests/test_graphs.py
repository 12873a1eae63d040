"""RelationGraph: relations against independent formulas, caching, kNN and conversions."""

from __future__ import annotations

import math

import networkx as nx
import pytest
import reference as ref
import torch

from relkd.graphs import RelationGraph, as_graph, knn_from_relation


@pytest.fixture
def x():
    return torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_pairwise_relations(x):
    g = RelationGraph(x)
    diff = x[:, None] - x[None]
    torch.testing.assert_close(g.gram, x @ x.T)
    torch.testing.assert_close(g.sq_distance, (diff**2).sum(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g.distance, ref.pairwise_distance(x), rtol=1e-10, atol=1e-12)
    unit = x / x.norm(dim=1, keepdim=True)
    torch.testing.assert_close(g.cosine, unit @ unit.T)
    d = ref.pairwise_distance(x)
    torch.testing.assert_close(g.normalized_distance, d / d[d > 0].mean())
    torch.testing.assert_close(g.angles, ref.triplet_cosines(x), rtol=1e-10, atol=1e-12)


def test_kernels(x):
    g = RelationGraph(x)
    sq = ref.pairwise_distance(x) ** 2
    torch.testing.assert_close(g.kernel("rbf", gamma=0.3), torch.exp(-0.3 * sq))
    torch.testing.assert_close(g.kernel("linear"), x @ x.T)
    torch.testing.assert_close(g.kernel("polynomial", degree=3, c=0.5), (x @ x.T + 0.5) ** 3)
    # The Taylor RBF converges to the Gaussian kernel as the order grows.
    torch.testing.assert_close(
        g.kernel("rbf_taylor", gamma=0.05, order=30), torch.exp(-0.05 * sq), rtol=1e-9, atol=0
    )
    # Order 0: exp(-gamma (|x_i|^2 + |x_j|^2)).
    n2 = (x**2).sum(1)
    expected = torch.exp(-0.2 * (n2[:, None] + n2[None]))
    torch.testing.assert_close(g.kernel("rbf_taylor", gamma=0.2, order=0), expected)
    with pytest.raises(KeyError, match="Did you mean 'rbf'"):
        g.kernel("rfb")


def test_one_gram_product_per_graph(x, monkeypatch):
    import relkd.graphs.ops as ops

    calls = []
    real = ops.gram
    monkeypatch.setattr(ops, "gram", lambda t: calls.append(1) or real(t))
    g = RelationGraph(x)
    for _ in range(2):
        _ = g.distance, g.cosine, g.kernel("rbf"), g.normalized().kernel("rbf_taylor"), g.angles
    assert len(calls) == 1


def test_normalized_graph(x):
    g = RelationGraph(x).normalized()
    torch.testing.assert_close(g.x.norm(dim=1), torch.ones(7, dtype=torch.float64))
    unit = x / x.norm(dim=1, keepdim=True)
    torch.testing.assert_close(g.gram, unit @ unit.T)


def test_from_features_and_batched():
    f = torch.randn(4, 3, 2, 2)
    assert RelationGraph.from_features(f).x.shape == (4, 12)
    xb = torch.randn(3, 5, 4, dtype=torch.float64)
    gb = RelationGraph(xb)
    assert gb.batch_shape == (3,) and gb.gram.shape == (3, 5, 5)
    for b in range(3):
        torch.testing.assert_close(gb.distance[b], RelationGraph(xb[b]).distance)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        RelationGraph(torch.randn(5))
    with pytest.raises(ValueError, match="one graph"):
        _ = gb.angles


def test_dtype_policy():
    assert RelationGraph(torch.randn(4, 3, dtype=torch.float16)).gram.dtype == torch.float32
    assert RelationGraph(torch.randn(4, 3, dtype=torch.bfloat16)).cosine.dtype == torch.float32
    assert RelationGraph(torch.randn(4, 3, dtype=torch.float64)).distance.dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert RelationGraph(torch.randn(4, 3)).gram.dtype == torch.float32


def test_detach_and_as_graph(x):
    xs = x.clone().requires_grad_()
    g = RelationGraph(xs)
    _ = g.distance
    d = g.detach()
    assert not d.x.requires_grad and not d.distance.requires_grad
    assert as_graph(xs, detach=True).x.requires_grad is False
    with pytest.raises(TypeError):
        as_graph([1, 2, 3])


def test_knn_by_hand():
    # Points on a line: 0, 1, 3, 7. Nearest neighbour of each: 1, 0, 1, 3 (ties impossible).
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    edge_index, w = RelationGraph(x).knn(1, "distance")
    assert sorted(map(tuple, edge_index.t().tolist())) == sorted([(1, 0), (0, 1), (1, 2), (2, 3)])
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 2.0, 4.0]))
    # With the node itself allowed, it is its own nearest neighbour (distance 0).
    edge_index, _ = RelationGraph(x).knn(2, "distance", loop=True)
    assert {(i, i) for i in range(4)} <= set(map(tuple, edge_index.t().tolist()))


def test_knn_similarity_and_batch(x):
    g = RelationGraph(x)
    edge_index, w = g.knn(3, "cosine")
    assert edge_index.shape == (2, 21)
    for i in range(7):
        nbrs = edge_index[0, edge_index[1] == i]
        others = [j for j in range(7) if j != i]
        best = sorted(others, key=lambda j: -float(g.cosine[i, j]))[:3]
        assert set(nbrs.tolist()) == set(best)
    xb = torch.randn(2, 6, 3)
    eb, _ = RelationGraph(xb).knn(2, "distance")
    assert eb.shape == (2, 24) and eb[:, 12:].min() >= 6 and eb[:, :12].max() < 6
    with pytest.raises(ValueError, match="1 <= k <= 6"):
        g.knn(7)
    with pytest.raises(KeyError, match="unknown relation"):
        g.knn(2, "cosin")


def test_knn_from_relation_is_device_local():
    rel = torch.rand(5, 5)
    edge_index, w = knn_from_relation(rel, 2, largest=True)
    assert edge_index.device == rel.device and edge_index.dtype == torch.long


def test_conversions(x):
    y = torch.tensor([0, 1, 0, 1, 2, 2, 0])
    idx = torch.arange(100, 107)
    g = RelationGraph(x, y=y, index=idx)
    data = g.to_pyg(k=3)
    assert data.num_nodes == 7 and data.edge_index.shape == (2, 21)
    assert torch.equal(data.y, y) and torch.equal(data.index, idx)
    full = g.to_pyg()
    assert full.edge_index.shape == (2, 42)

    nxg = g.to_networkx(relation="distance")
    assert isinstance(nxg, nx.Graph) and nxg.number_of_edges() == 21
    assert nxg.nodes[4] == {"label": 2, "index": 104}
    assert math.isclose(nxg.edges[0, 3]["weight"], float((x[0] - x[3]).norm()), rel_tol=1e-12)
    assert isinstance(g.to_networkx(k=2), nx.DiGraph)

    sp = g.to_scipy(k=2, relation="cosine")
    assert sp.shape == (7, 7) and sp.nnz == 14
    dense = sp.toarray()
    for j, i in g.knn(2).__getitem__(0).t().tolist():
        assert math.isclose(dense[i, j], float(g.cosine[i, j]), rel_tol=1e-12)
