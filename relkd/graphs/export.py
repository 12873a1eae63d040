"""Write a relation graph to the files graph tools read: GraphML, GEXF, PyG and SciPy sparse.

Every format holds the same graph: the kNN graph of :meth:`RelationGraph.knn` (``k`` given;
directed, edge ``j -> i`` when ``j`` is one of ``i``'s neighbours) or the complete graph
(``k=None``; undirected), with the relation values on the edges.

=======  ========  =================================================================================
format   suffix    contents
=======  ========  =================================================================================
graphml  .graphml  networkx GraphML (Gephi, Cytoscape): node attributes ``label`` and ``index``
                   (integers, when the graph carries them), edge attributes ``weight`` and the
                   relation's name (``cosine``, ``kernel_rbf``, ...)
gexf     .gexf     networkx GEXF (Gephi): as GraphML, except that ``label`` is the format's own node
                   label, a string (``nx.read_gexf`` returns ``"3"`` for class 3)
pyg      .pt       ``torch_geometric.data.Data`` (``x``, ``edge_index``, ``edge_attr``, ``y``,
                   ``index``) on the CPU, written with ``torch.save``; read it back with
                   ``torch.load(path, weights_only=False)``: a pickled object, not plain tensors
npz      .npz      ``scipy.sparse.save_npz`` of the ``[N, N]`` relation matrix, entry ``(i, j)`` =
                   edge ``j -> i``; the matrix only (labels and indices are in the other formats)
=======  ========  =================================================================================
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from relkd.graphs import RelationGraph, as_graph
from relkd.registry import Registry

__all__ = ["EXPORTERS", "export_graph"]

EXPORTERS = Registry("graph export format")


class _Source:
    """The graph to write, with the networkx form built once for the formats that share it."""

    def __init__(self, graph: RelationGraph, k: int | None, relation: str) -> None:
        self.graph, self.k, self.relation = graph, k, relation

    @functools.cached_property
    def networkx(self):
        return self.graph.to_networkx(self.k, self.relation)


def _writer(name: str, suffix: str) -> Callable[[Callable[[_Source, Path], None]], Callable[..., Path]]:
    """Register ``write(source, path)`` as format ``name``, writing the file ``<stem><suffix>``."""

    def deco(write: Callable[[_Source, Path], None]) -> Callable[..., Path]:
        def run(source: _Source, stem: Path) -> Path:
            path = stem.with_name(stem.name + suffix)
            write(source, path)
            return path

        EXPORTERS.register(name)(run)
        return run

    return deco


@_writer("graphml", ".graphml")
def _graphml(source: _Source, path: Path) -> None:
    import networkx as nx

    nx.write_graphml(source.networkx, path)


@_writer("gexf", ".gexf")
def _gexf(source: _Source, path: Path) -> None:
    import networkx as nx

    nx.write_gexf(source.networkx, path)


@_writer("pyg", ".pt")
def _pyg(source: _Source, path: Path) -> None:
    torch.save(source.graph.to_pyg(source.k, source.relation).to("cpu"), path)


@_writer("npz", ".npz")
def _npz(source: _Source, path: Path) -> None:
    import scipy.sparse as sp

    sp.save_npz(path, source.graph.to_scipy(source.k, source.relation))


def export_graph(
    graph: RelationGraph | torch.Tensor,
    path_stem: str | Path,
    formats: Sequence[str] = ("graphml", "gexf", "pyg", "npz"),
    k: int | None = None,
    relation: str = "cosine",
) -> list[Path]:
    """Write ``graph`` as ``<path_stem>.<suffix>`` in each of ``formats`` (see the module's table).

    Args:
        graph: one graph ``[N, D]``; build it as ``RelationGraph(x, y=labels, index=indices)`` so
            the files carry the class labels and the dataset indices. A tensor ``[N, ...]`` is
            flattened.
        path_stem: path without suffix; missing parent folders are created.
        formats: any of ``"graphml"``, ``"gexf"``, ``"pyg"``, ``"npz"`` (:data:`EXPORTERS`).
        k: neighbours per node for a kNN graph; ``None`` writes the complete graph (``N^2 - N``
            entries: keep ``N`` small).
        relation: the relation on the edges and, with ``k``, the one that ranks neighbours.

    Returns:
        The paths written, in the order of ``formats``.
    """
    if isinstance(formats, str):
        formats = (formats,)
    writers = [EXPORTERS.get(name) for name in formats]
    graph = as_graph(graph, detach=True)
    if graph.batch_shape:
        raise ValueError(
            f"export_graph writes one graph [N, D], got node features {tuple(graph.x.shape)}; "
            "index one graph of the batch first"
        )
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    source = _Source(graph, k, relation)
    return [write(source, stem) for write in writers]
