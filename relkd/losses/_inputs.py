"""Input checks shared by the losses: shapes, teacher detachment, tiny batches, debug checks."""

from __future__ import annotations

import warnings

import torch

from relkd._debug import check_finite
from relkd.distributed import global_graph, global_relations_enabled, is_global_graph
from relkd.graphs import RelationGraph, as_graph, check_pair

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def graph_pair(
    name: str,
    student: torch.Tensor | RelationGraph,
    teacher: torch.Tensor | RelationGraph,
    min_nodes: int = 2,
) -> tuple[RelationGraph, RelationGraph]:
    """Student and teacher graphs; the teacher is detached (it is a constant of the loss).

    Under global relations (:mod:`relkd.distributed`) tensors are gathered from every rank first, so
    the graphs relate the global batch; a ``RelationGraph`` is taken as it is, with a warning (once) if
    it was not built over the global batch (:func:`relkd.distributed.global_graph`).

    Raises ``ValueError`` on a batch of graphs or different batch sizes; warns once when the batch is
    smaller than ``min_nodes`` (the relation is then trivial and the loss is 0, still differentiable).
    """
    s, t = as_graph(student), as_graph(teacher, detach=True)
    check_pair(name, s, t)
    if global_relations_enabled():
        s, t = _global(name, "student", student, s), _global(name, "teacher", teacher, t)
        if s.num_nodes != t.num_nodes:
            raise ValueError(
                f"{name}: under global relations the student graph has {s.num_nodes} nodes and the "
                f"teacher graph {t.num_nodes}: tensors are gathered from every rank, a RelationGraph is "
                "not; pass both sides as tensors or build both graphs with relkd.distributed.global_graph"
            )
    if s.num_nodes < min_nodes:
        warn_once(
            name,
            f"{name}: a batch of {s.num_nodes} instance(s) has no relation to distil "
            f"(needs {min_nodes}); the loss is 0",
        )
    check_finite(name, "student input", s.x)
    check_finite(name, "teacher input", t.x)
    return s, t


def _global(name: str, side: str, given: torch.Tensor | RelationGraph, graph: RelationGraph) -> RelationGraph:
    """``graph`` over the global batch: gathered if it came as a tensor, as it is if it came as a graph."""
    if not isinstance(given, RelationGraph):
        return global_graph(graph.x)
    # the record of global graphs is kept in eager mode only (a weak set would break a compiled graph)
    if not torch.compiler.is_compiling() and not is_global_graph(given):
        warn_once(
            f"{name}/{side}/local graph",
            f"{name}: the {side} RelationGraph holds one rank's shard, so its relations miss the other "
            "ranks' examples; build it with relkd.distributed.global_graph or pass tensors",
        )
    return graph


def reduce(mean: torch.Tensor, count: int, reduction: str, name: str) -> torch.Tensor:
    """Turn a mean over ``count`` terms into the requested reduction (``"mean"`` or ``"sum"``)."""
    if reduction == "mean":
        out = mean
    elif reduction == "sum":
        out = mean * count
    else:
        raise ValueError(f"{name}: reduction must be 'mean' or 'sum', got {reduction!r}")
    check_finite(name, "loss", out)
    return out
