"""Graph export: every file re-reads into the same nodes, edges and attributes."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from relkd.graphs import RelationGraph
from relkd.graphs.export import export_graph

N, K = 12, 3


@pytest.fixture
def graph() -> RelationGraph:
    x = torch.randn(N, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return RelationGraph(x, y=torch.arange(N) % 3, index=torch.arange(N) + 500)


def cosine(x: torch.Tensor) -> np.ndarray:
    u = x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)
    return u @ u.T


def knn_edges(x: torch.Tensor, k: int) -> dict[tuple[int, int], float]:
    """``{(neighbour j, centre i): cos_ij}`` for the k highest-cosine rows of each row i."""
    cos = cosine(x)
    masked = cos - 10.0 * np.eye(len(cos))
    return {(int(j), i): cos[i, j] for i in range(len(cos)) for j in np.argsort(-masked[i])[:k]}


def test_writes_every_format_in_order(graph, tmp_path):
    paths = export_graph(graph, tmp_path / "sub" / "teacher", k=K)
    assert [p.name for p in paths] == ["teacher.graphml", "teacher.gexf", "teacher.pt", "teacher.npz"]
    assert all(p.stat().st_size > 100 for p in paths)


def test_graphml_round_trip(graph, tmp_path):
    (path,) = export_graph(graph, tmp_path / "g", formats=("graphml",), k=K)
    g = nx.read_graphml(path, node_type=int)
    expected = knn_edges(graph.x, K)
    assert g.is_directed()
    assert sorted(g.nodes) == list(range(N))
    assert set(g.edges) == set(expected)
    for i in range(N):
        assert g.nodes[i] == {"label": i % 3, "index": 500 + i}
    for (j, i), value in expected.items():
        assert g.edges[j, i]["weight"] == pytest.approx(value, abs=1e-12)
        assert g.edges[j, i]["cosine"] == pytest.approx(value, abs=1e-12)


def test_gexf_round_trip_keeps_label_as_the_node_label(graph, tmp_path):
    (path,) = export_graph(graph, tmp_path / "g", formats=("gexf",), k=K)
    g = nx.read_gexf(path, node_type=int)
    expected = knn_edges(graph.x, K)
    assert sorted(g.nodes) == list(range(N))
    assert set(g.edges) == set(expected)
    for i in range(N):
        assert g.nodes[i]["label"] == str(i % 3)
        assert g.nodes[i]["index"] == 500 + i
    for (j, i), value in expected.items():
        assert g.edges[j, i]["weight"] == pytest.approx(value, abs=1e-12)


def test_complete_graph_is_undirected_with_every_pair(graph, tmp_path):
    (path,) = export_graph(graph, tmp_path / "g", formats=("graphml",), relation="distance")
    g = nx.read_graphml(path, node_type=int)
    x = graph.x.numpy()
    assert not g.is_directed()
    assert g.number_of_edges() == N * (N - 1) // 2
    assert g.edges[2, 7]["distance"] == pytest.approx(np.linalg.norm(x[2] - x[7]), rel=1e-9)


def test_pyg_round_trip(graph, tmp_path):
    x = graph.x.clone().requires_grad_()
    labelled = RelationGraph(x, y=graph.y, index=graph.index)
    (path,) = export_graph(labelled, tmp_path / "g", formats=("pyg",), k=K)
    data = torch.load(path, weights_only=False)
    assert torch.equal(data.x, graph.x) and not data.x.requires_grad
    assert torch.equal(data.y, graph.y) and torch.equal(data.index, graph.index)
    edges = {
        (int(j), int(i)): float(w) for (j, i), w in zip(data.edge_index.t(), data.edge_attr, strict=True)
    }
    expected = knn_edges(graph.x, K)
    assert edges.keys() == expected.keys()
    assert all(edges[e] == pytest.approx(v, abs=1e-12) for e, v in expected.items())


def test_npz_round_trip(graph, tmp_path):
    (path,) = export_graph(graph, tmp_path / "g", formats=("npz",), k=K)
    m = sp.load_npz(path).toarray()
    expected = np.zeros((N, N))
    for (j, i), value in knn_edges(graph.x, K).items():
        expected[i, j] = value
    np.testing.assert_allclose(m, expected, atol=1e-12)


def test_tensor_input_and_single_format_string(tmp_path):
    x = torch.randn(6, 2, 2)
    (path,) = export_graph(x, tmp_path / "t", formats="graphml", k=2)
    assert nx.read_graphml(path).number_of_edges() == 12


def test_unknown_format_suggests_and_writes_nothing(graph, tmp_path):
    with pytest.raises(KeyError, match="Did you mean 'graphml'"):
        export_graph(graph, tmp_path / "g", formats=("npz", "graphm"))
    assert not any(tmp_path.iterdir())


def test_batched_graph_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="one graph"):
        export_graph(RelationGraph(torch.randn(2, 5, 3)), tmp_path / "g")
