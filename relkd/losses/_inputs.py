"""Input checks shared by the losses: shapes, teacher detachment, tiny batches, debug checks."""

from __future__ import annotations

import warnings

import torch

from relkd._debug import check_finite
from relkd.graphs import RelationGraph, as_graph

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

    Raises ``ValueError`` on a batch of graphs or different batch sizes; warns once when the batch is
    smaller than ``min_nodes`` (the relation is then trivial and the loss is 0, still differentiable).
    """
    s, t = as_graph(student), as_graph(teacher, detach=True)
    for side, g in (("student", s), ("teacher", t)):
        if g.batch_shape:
            raise ValueError(
                f"{name}: expected {side} embeddings [B, D] (one graph), got a batch of graphs with "
                f"node features {tuple(g.x.shape)}"
            )
    if s.num_nodes != t.num_nodes:
        raise ValueError(
            f"{name}: expected student and teacher with the same batch size, got "
            f"{s.num_nodes} and {t.num_nodes}"
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
