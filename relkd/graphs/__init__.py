"""Instance-relation graphs: one abstraction that every relational loss reads its relations from."""

from __future__ import annotations

import torch

from relkd.graphs.angles import angle_smooth_l1, angles_from_gram
from relkd.graphs.cross import BipartiteGraph, cross_cosine
from relkd.graphs.knn import knn_from_relation
from relkd.graphs.relation_graph import KERNELS, RelationGraph, register_kernel

__all__ = [
    "RelationGraph",
    "as_graph",
    "check_pair",
    "register_kernel",
    "KERNELS",
    "knn_from_relation",
    "angle_smooth_l1",
    "angles_from_gram",
    "BipartiteGraph",
    "cross_cosine",
]


def as_graph(x: torch.Tensor | RelationGraph, *, detach: bool = False) -> RelationGraph:
    """A ``RelationGraph`` from a graph or a batch tensor ``[B, ...]`` (flattened per sample)."""
    if isinstance(x, RelationGraph):
        return x.detach() if detach else x
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor or RelationGraph, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"expected a batch of embeddings [B, D] or features [B, ...], got shape {tuple(x.shape)}"
        )
    return RelationGraph.from_features(x.detach() if detach else x)


def check_pair(name: str, student: RelationGraph, teacher: RelationGraph) -> None:
    """Raise ``ValueError`` unless ``student`` and ``teacher`` are single graphs of equally many nodes."""
    for side, g in (("student", student), ("teacher", teacher)):
        if g.batch_shape:
            raise ValueError(
                f"{name}: expected {side} embeddings [N, D] (one graph), got a batch of graphs with "
                f"node features {tuple(g.x.shape)}; index one graph first"
            )
    if student.num_nodes != teacher.num_nodes:
        raise ValueError(
            f"{name}: expected student and teacher with the same batch size, got "
            f"{student.num_nodes} and {teacher.num_nodes}"
        )
