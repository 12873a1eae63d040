"""k-nearest-neighbour sparsification of a dense relation matrix, in plain torch."""

from __future__ import annotations

import torch

__all__ = ["knn_from_relation"]


def knn_from_relation(
    rel: torch.Tensor, k: int, *, largest: bool, loop: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, for every node, the ``k`` neighbours with the largest (or smallest) relation.

    Edges follow torch-geometric's ``source_to_target`` convention for kNN graphs: row 0 holds the
    neighbour ``j`` (source), row 1 the centre ``i`` (target), so message passing aggregates a node's
    neighbours into it. Batched relations ``[..., N, N]`` are flattened into one disjoint graph whose
    node ``b * N + i`` is node ``i`` of graph ``b`` (PyG's batching).

    Args:
        rel: relation matrix ``[..., N, N]``.
        k: neighbours per node (the node itself counts as one when ``loop=True``).
        largest: True for similarities, False for distances.
        loop: whether a node may be its own neighbour.

    Returns:
        ``edge_index`` ``[2, prod(...) * N * k]`` (int64) and ``edge_weight`` (the relation values).
    """
    n = rel.shape[-1]
    available = n if loop else n - 1
    if not 1 <= k <= available:
        raise ValueError(f"knn needs 1 <= k <= {available} for a graph of {n} nodes (loop={loop}), got k={k}")
    rel = rel.reshape(-1, n, n)
    if not loop:
        fill = float("-inf") if largest else float("inf")
        eye = torch.eye(n, dtype=torch.bool, device=rel.device)
        rel = rel.masked_fill(eye, fill)
    values, nbr = rel.topk(k, dim=-1, largest=largest)
    offset = (torch.arange(rel.shape[0], device=rel.device) * n).view(-1, 1, 1)
    centre = torch.arange(n, device=rel.device).view(1, n, 1).expand_as(nbr)
    edge_index = torch.stack([(nbr + offset).reshape(-1), (centre + offset).reshape(-1)])
    return edge_index, values.reshape(-1)
