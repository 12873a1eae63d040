r"""``BipartiteGraph``: relations between two node sets, e.g. augmented views and the original images.

A :class:`~relkd.graphs.RelationGraph` relates a batch to itself. Some methods relate one node set to
another instead: each rotated view of an image to the unrotated images of the batch (SSKD), queries to
keys. A bipartite graph holds the two sides as ``RelationGraph`` objects and reads each side's
per-node quantities (the inverse norms) from that side's graph, so they are computed once and shared
with any other relation read from the same graph; only the cross products ``S T^T`` are new.

.. math::
    G_{ij} = s_i \cdot t_j, \qquad C_{ij} = \frac{s_i \cdot t_j}{\|s_i\| \, \|t_j\|}
    \quad (0 \text{ when either vector is } 0)

Relations are computed lazily, cached, on the inputs' device, in float32 (float64 when either side is
float64; float16, bfloat16 and autocast regions are promoted), like ``RelationGraph``'s.

Shapes:
    source ``[..., N, D]``, target ``[..., M, D]`` (equal batch shapes ``...``) -> ``[..., N, M]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from relkd.graphs import ops
from relkd.graphs.relation_graph import RelationGraph

__all__ = ["BipartiteGraph", "cross_cosine"]

Input = torch.Tensor | RelationGraph


def _graph(x: Input, side: str) -> RelationGraph:
    if isinstance(x, RelationGraph):
        return x
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"BipartiteGraph: expected the {side} as a tensor or RelationGraph, got {type(x).__name__}"
        )
    return RelationGraph(x)


class BipartiteGraph:
    """Relations between the nodes of ``source`` (rows) and those of ``target`` (columns).

    Args:
        source: ``[..., N, D]`` node features or their ``RelationGraph``.
        target: ``[..., M, D]`` node features or their ``RelationGraph``; same ``D`` and batch shape.

    Relations (``[..., N, M]``): ``gram`` (``S T^T``), ``cosine``.

    Example:
        >>> rotated, originals = torch.randn(48, 128), torch.randn(16, 128)
        >>> BipartiteGraph(rotated, originals).cosine.shape
        torch.Size([48, 16])
    """

    def __init__(self, source: Input, target: Input) -> None:
        self.source, self.target = _graph(source, "source"), _graph(target, "target")
        s, t = self.source.x, self.target.x
        if s.shape[-1] != t.shape[-1] or s.shape[:-2] != t.shape[:-2]:
            raise ValueError(
                "BipartiteGraph: expected source [..., N, D] and target [..., M, D] with the same D and "
                f"batch shape, got {tuple(s.shape)} and {tuple(t.shape)}"
            )
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def num_source(self) -> int:
        return self.source.num_nodes

    @property
    def num_target(self) -> int:
        return self.target.num_nodes

    @property
    def dtype(self) -> torch.dtype:
        """The dtype relations are computed in: float64 if either side is float64, else float32."""
        return torch.promote_types(self.source.dtype, self.target.dtype)

    @property
    def device(self) -> torch.device:
        return self.source.device

    def detach(self) -> BipartiteGraph:
        """The same relations cut from autograd (the sides' detached graphs; this cache is not kept)."""
        return BipartiteGraph(self.source.detach(), self.target.detach())

    def _cached(self, key: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            with ops.full_precision(self.device):
                self._cache[key] = fn()
        return self._cache[key]

    def __repr__(self) -> str:
        return (
            f"BipartiteGraph(source={self.num_source}, target={self.num_target}, "
            f"dim={self.source.x.shape[-1]}, cached=[{', '.join(self._cache)}])"
        )

    @property
    def gram(self) -> torch.Tensor:
        """``G_ij = s_i . t_j``, ``[..., N, M]``."""
        return self._cached("gram", lambda: self.source.x.to(self.dtype) @ self.target.x.to(self.dtype).mT)

    @property
    def cosine(self) -> torch.Tensor:
        """``s_i . t_j / (||s_i|| ||t_j||)``, 0 for zero vectors; the inverse norms are each side's
        cached ``RelationGraph.inv_norm``."""

        def fn() -> torch.Tensor:
            inv_s = self.source.inv_norm.to(self.dtype).unsqueeze(-1)
            inv_t = self.target.inv_norm.to(self.dtype).unsqueeze(-2)
            return self.gram * inv_s * inv_t

        return self._cached("cosine", fn)


def cross_cosine(source: Input, target: Input) -> torch.Tensor:
    """Cosine similarities ``[..., N, M]`` between the rows of ``source`` and those of ``target``
    (see :class:`BipartiteGraph`)."""
    return BipartiteGraph(source, target).cosine
