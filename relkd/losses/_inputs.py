"""Input checks shared by the losses: shapes, teacher detachment, tiny batches, debug checks."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from relkd._debug import check_finite
from relkd.distributed import all_gather, global_graph, global_relations_enabled, is_global_graph
from relkd.graphs import RelationGraph, as_graph, check_pair
from relkd.graphs.ops import GramChain, chain_on_features, chain_on_grams, compute_dtype

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
    _check_batch(name, s.x, t.x, min_nodes)
    return s, t


def gram_pair(
    name: str,
    student: torch.Tensor | RelationGraph,
    teacher: torch.Tensor | RelationGraph,
    min_nodes: int = 2,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[RelationGraph, RelationGraph]:
    """The two sides of a loss on Gram matrices, for :func:`gram_loss`.

    Two tensors become flat features ``[B, D]`` in the compute dtype (float32, or float64), the
    teacher's detached and both gathered under global relations: no other loss can share relations of
    tensors it is handed, so none is cached. Otherwise (a ``RelationGraph`` on either side) the graphs
    of :func:`graph_pair`, whose Gram matrices other losses of the step may share. Checks as
    :func:`graph_pair`.
    """
    if not (isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor)):
        return graph_pair(name, student, teacher, min_nodes)
    xs, xt = _features(student), _features(teacher).detach()
    if xs.shape[0] != xt.shape[0]:
        raise ValueError(
            f"{name}: expected student and teacher with the same batch size, got "
            f"{xs.shape[0]} and {xt.shape[0]}"
        )
    if global_relations_enabled():
        xs, xt = all_gather(xs), all_gather(xt)
    _check_batch(name, xs, xt, min_nodes)
    return xs, xt


def gram_loss(chain: type[GramChain], s: torch.Tensor | RelationGraph, t: Any, *options: Any) -> torch.Tensor:
    """``chain`` on the Gram matrices of the sides :func:`gram_pair` returned, one autograd node."""
    if isinstance(s, RelationGraph):
        return chain_on_grams(chain, s.gram, t.gram, *options)
    return chain_on_features(chain, s, t, *options)


def nodes(side: torch.Tensor | RelationGraph) -> int:
    """The number of instances of a side of :func:`gram_pair`."""
    return side.num_nodes if isinstance(side, RelationGraph) else side.shape[-2]


def features(side: torch.Tensor | RelationGraph) -> torch.Tensor:
    """The node features of a side of :func:`gram_pair`."""
    return side.x if isinstance(side, RelationGraph) else side


def _features(x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 2:
        raise ValueError(
            f"expected a batch of embeddings [B, D] or features [B, ...], got shape {tuple(x.shape)}"
        )
    return x.reshape(x.shape[0], -1).to(compute_dtype(x.dtype))


def _check_batch(name: str, xs: torch.Tensor, xt: torch.Tensor, min_nodes: int) -> None:
    nodes = xs.shape[-2]
    if nodes < min_nodes:
        warn_once(
            name,
            f"{name}: a batch of {nodes} instance(s) has no relation to distil "
            f"(needs {min_nodes}); the loss is 0",
        )
    check_finite(name, "student input", xs)
    check_finite(name, "teacher input", xt)


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
