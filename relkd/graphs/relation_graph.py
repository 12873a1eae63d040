"""``RelationGraph``: the instance-relation graph of a batch of embeddings.

Nodes are the ``N`` instances of a batch, edges their pairwise relations (and triplet angles). Every
relational loss in relkd reads its relations from here, so a step that combines several losses computes
each side's Gram matrix once: distances, cosines and kernels all derive from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from relkd.graphs import ops
from relkd.graphs.angles import angles_from_gram
from relkd.graphs.knn import knn_from_relation

__all__ = ["RelationGraph", "KERNELS", "register_kernel"]

KernelFn = Callable[..., torch.Tensor]
KERNELS: dict[str, KernelFn] = {}

# Relations for which a larger value means "closer" (kNN keeps the largest).
_SIMILARITIES = {"gram", "cosine", "kernel"}


def register_kernel(name: str) -> Callable[[KernelFn], KernelFn]:
    """Register ``fn(graph, **params) -> [..., N, N]`` as ``graph.kernel(name, **params)``."""

    def deco(fn: KernelFn) -> KernelFn:
        KERNELS[name] = fn
        return fn

    return deco


class RelationGraph:
    """Instance-relation graph over the rows of ``x``.

    Relations are computed lazily, cached, on ``x``'s device, in float32 (float64 input stays float64;
    float16/bfloat16 and autocast regions are promoted to float32).

    Args:
        x: node features ``[N, D]`` (one graph) or ``[..., N, D]`` (a batch of graphs).
        y: optional node labels ``[N]`` (carried into conversions and plots).
        index: optional dataset indices of the nodes ``[N]``.

    Relations (all ``[..., N, N]`` unless noted):
        ``gram`` (``X X^T``), ``sq_distance``, ``distance``, ``cosine``, ``kernel(name, **params)``,
        ``normalized_distance`` (RKD's ``d / mean d``), ``angles`` (``[..., N, N, N]``); per node
        (``[..., N]``): ``diag`` (``||x_i||^2``) and ``inv_norm`` (``1 / ||x_i||``).

    Example:
        >>> g = RelationGraph(torch.randn(64, 128))
        >>> g.distance.shape, g.cosine.shape
        (torch.Size([64, 64]), torch.Size([64, 64]))
        >>> edge_index, weight = g.knn(8)
    """

    def __init__(
        self,
        x: torch.Tensor,
        *,
        y: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"RelationGraph expects a tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(
                f"RelationGraph expects node features of shape [N, D] or [..., N, D], got shape "
                f"{tuple(x.shape)}; use RelationGraph.from_features for [B, ...] feature maps"
            )
        if not (x.is_floating_point() or x.is_complex()):
            x = x.float()
        self.x = x
        self.y = y
        self.index = index
        self._cache: dict[Any, torch.Tensor] = {}

    @classmethod
    def from_features(cls, f: torch.Tensor, **kwargs: Any) -> RelationGraph:
        """Graph over a batch of feature maps ``[B, ...]`` (e.g. ``[B, C, H, W]``) -> ``[B, C*H*W]``."""
        if f.dim() < 1:
            raise ValueError("from_features expects a batch [B, ...], got a scalar")
        return cls(f.reshape(f.shape[0], -1), **kwargs)

    # ----------------------------------------------------------------------------------- basics
    @property
    def num_nodes(self) -> int:
        return self.x.shape[-2]

    @property
    def batch_shape(self) -> torch.Size:
        return self.x.shape[:-2]

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype relations are computed in."""
        return ops.compute_dtype(self.x.dtype)

    def detach(self) -> RelationGraph:
        """The same graph cut from autograd (cached relations are kept, detached).

        A graph whose features need no gradient is returned as it is, and the detached copy of any
        other graph is made once: every loss that detaches the teacher's graph then shares one cache,
        so a step with several losses still pays for one Gram matrix per side.
        """
        if not self.x.requires_grad:
            return self
        if "_detached" not in self.__dict__:
            out = RelationGraph(self.x.detach(), y=self.y, index=self.index)
            out._cache = {k: v.detach() for k, v in self._cache.items()}
            self.__dict__["_detached"] = out
        return self.__dict__["_detached"]

    def release(self) -> None:
        """Drop every cached relation (and the cached detached and normalised graphs).

        For a trainer whose losses of a step share this graph: once the last of them has read its
        relations, this frees the ``N x N`` matrices that no backward kept. Relations asked for again
        are computed again.
        """
        self._cache.clear()
        self.__dict__.pop("_detached", None)
        self.__dict__.pop("_normalized", None)

    def _cached(self, key: Any, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            with ops.full_precision(self.device):
                self._cache[key] = fn()
        return self._cache[key]

    def __repr__(self) -> str:
        cached = ", ".join(str(k if isinstance(k, str) else k[0]) for k in self._cache)
        return (
            f"RelationGraph(nodes={self.num_nodes}, dim={self.x.shape[-1]}, "
            f"batch={tuple(self.batch_shape)}, cached=[{cached}])"
        )

    # -------------------------------------------------------------------------------- relations
    @property
    def gram(self) -> torch.Tensor:
        """``G_ij = x_i . x_j``: the one matrix product every other relation derives from."""
        return self._cached("gram", lambda: ops.gram(self.x))

    @property
    def diag(self) -> torch.Tensor:
        """``G_ii = ||x_i||^2``, ``[..., N]`` (a constant on a :meth:`normalized` graph)."""
        return self._cached("diag", lambda: ops.diagonal(self.gram))

    @property
    def sq_distance(self) -> torch.Tensor:
        return self._cached("sq_distance", lambda: ops.sq_distance_from_gram(self.gram))

    @property
    def distance(self) -> torch.Tensor:
        """Euclidean distances, with bounded gradients on (near-)duplicates (see ``ops``)."""
        return self._cached("distance", lambda: ops.distance_from_gram(self.gram))

    @property
    def inv_distance(self) -> torch.Tensor:
        """``1 / d_ij``, 0 on the diagonal and for duplicates."""
        return self._cached("inv_distance", lambda: ops.inv_or_zero(self.distance))

    @property
    def mean_distance(self) -> torch.Tensor:
        """Mean of the nonzero distances (RKD's ``mu``), ``[...]``; 1 where every distance is 0."""

        def fn() -> torch.Tensor:
            return ops.mean_nonzero(self.distance)

        return self._cached("mean_distance", fn)

    @property
    def normalized_distance(self) -> torch.Tensor:
        """RKD's distance potential ``d_ij / mu`` (Park et al., CVPR 2019, Eq. 4)."""
        return self._cached(
            "normalized_distance", lambda: self.distance / self.mean_distance[..., None, None]
        )

    @property
    def cosine(self) -> torch.Tensor:
        """``x_i . x_j / (||x_i|| ||x_j||)``; 0 for zero vectors."""
        return self._cached("cosine", lambda: ops.cosine_from_gram(self.gram))

    @property
    def inv_norm(self) -> torch.Tensor:
        """``1 / ||x_i||`` from the Gram diagonal, ``[..., N]``; 0 for zero vectors."""
        return self._cached("inv_norm", lambda: ops.inv_sqrt_or_zero(self.diag))

    @property
    def angles(self) -> torch.Tensor:
        """Cosines of all triplet angles ``[..., N, N, N]`` indexed ``[i, j, k]``, angle at ``i``.

        Materialised; for N^3 work without N^3 memory use :func:`relkd.graphs.angle_smooth_l1`.
        """
        if self.batch_shape:
            raise ValueError("angles are defined for one graph [N, D], not a batch of graphs")
        return self._cached("angles", lambda: angles_from_gram(self.gram, self.inv_distance))

    def kernel(self, name: str, **params: Any) -> torch.Tensor:
        """A kernel matrix by name: ``linear``, ``rbf``, ``rbf_taylor``, ``cosine``, ``polynomial``."""
        if name not in KERNELS:
            from relkd.registry import suggest

            raise KeyError(f"unknown kernel {name!r}.{suggest(name, KERNELS)} Known: {sorted(KERNELS)}")
        key = ("kernel", name, tuple(sorted(params.items())))
        return self._cached(key, lambda: KERNELS[name](self, **params))

    def relation(self, name: str, **params: Any) -> torch.Tensor:
        """Any relation by name (``"distance"``, ``"cosine"``, ...) or ``"kernel:<name>"``."""
        if name.startswith("kernel:"):
            return self.kernel(name.split(":", 1)[1], **params)
        if name not in _RELATIONS:
            from relkd.registry import suggest

            raise KeyError(
                f"unknown relation {name!r}.{suggest(name, _RELATIONS)} Known: {sorted(_RELATIONS)} "
                "or 'kernel:<name>'"
            )
        return getattr(self, name)

    def normalized(self) -> RelationGraph:
        """The graph of the L2-normalised rows; its Gram matrix is this graph's cosine matrix."""

        def fn() -> RelationGraph:
            x = self.x.to(self.dtype) * self.inv_norm.unsqueeze(-1)
            out = RelationGraph(x, y=self.y, index=self.index)
            out._cache["gram"] = self.cosine
            # Unit rows (zero rows stay zero): the diagonal is a constant, so kernels that read it
            # send no gradient through it.
            out._cache["diag"] = (self.inv_norm > 0).to(self.dtype)
            return out

        if "_normalized" not in self.__dict__:
            self.__dict__["_normalized"] = fn()
        return self.__dict__["_normalized"]

    # ---------------------------------------------------------------------------- sparsification
    def knn(
        self, k: int, relation: str = "cosine", *, loop: bool = False, **params: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """kNN edges ranked by ``relation`` -> ``(edge_index [2, E], edge_weight [E])``.

        Similarities (``gram``, ``cosine``, ``kernel:*``) keep the largest values, distances the
        smallest. Edge ``(j, i)`` means ``j`` is a neighbour of ``i`` (PyG ``source_to_target``).
        """
        rel = self.relation(relation, **params)
        largest = relation.split(":")[0] in _SIMILARITIES
        return knn_from_relation(rel, k, largest=largest, loop=loop)

    # ------------------------------------------------------------------------------- conversions
    def _edges(self, relation: str, k: int | None, loop: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch_shape:
            raise ValueError("conversions take one graph [N, D]; index a batch of graphs first")
        if k is not None:
            return self.knn(k, relation, loop=loop)
        rel = self.relation(relation)
        mask = ~torch.eye(self.num_nodes, dtype=torch.bool, device=self.device)
        if loop:
            mask.fill_(True)
        centre, nbr = mask.nonzero(as_tuple=True)
        return torch.stack([nbr, centre]), rel[centre, nbr]

    def to_pyg(self, k: int | None = None, relation: str = "cosine", *, loop: bool = False):
        """A ``torch_geometric.data.Data`` with ``x``, ``edge_index``, ``edge_attr`` (and ``y``, ``index``).

        ``k=None`` keeps every pair (a complete graph); otherwise the kNN graph of :meth:`knn`.
        """
        from torch_geometric.data import Data

        edge_index, weight = self._edges(relation, k, loop)
        data = Data(x=self.x, edge_index=edge_index, edge_attr=weight.unsqueeze(-1))
        if self.y is not None:
            data.y = self.y
        if self.index is not None:
            data.index = self.index
        return data

    def to_scipy(self, k: int | None = None, relation: str = "cosine", *, loop: bool = False):
        """The relation as a SciPy sparse ``csr_array`` ``[N, N]``: entry ``(i, j)`` is edge ``j -> i``."""
        import scipy.sparse as sp

        edge_index, weight = self._edges(relation, k, loop)
        src, dst = edge_index.cpu().numpy()
        n = self.num_nodes
        return sp.csr_array((weight.detach().cpu().double().numpy(), (dst, src)), shape=(n, n))

    def to_networkx(self, k: int | None = None, relation: str = "cosine", *, loop: bool = False):
        """A networkx graph: ``Graph`` for the complete graph, ``DiGraph`` (neighbour -> centre) for kNN.

        Node attributes: ``label`` and ``index`` when known; edge attribute ``weight`` (and the relation's
        name) holds the relation value.
        """
        import networkx as nx

        edge_index, weight = self._edges(relation, k, loop)
        g = nx.Graph() if k is None else nx.DiGraph()
        for i in range(self.num_nodes):
            attrs = {}
            if self.y is not None:
                attrs["label"] = int(self.y[i])
            if self.index is not None:
                attrs["index"] = int(self.index[i])
            g.add_node(i, **attrs)
        values = weight.detach().cpu().double().tolist()
        for (j, i), w in zip(edge_index.t().cpu().tolist(), values, strict=True):
            g.add_edge(j, i, weight=w, **{relation.replace(":", "_"): w})
        return g


_RELATIONS = {
    "gram",
    "sq_distance",
    "distance",
    "inv_distance",
    "normalized_distance",
    "cosine",
}


@register_kernel("linear")
def _linear(g: RelationGraph) -> torch.Tensor:
    return g.gram


@register_kernel("cosine")
def _cosine(g: RelationGraph) -> torch.Tensor:
    return g.cosine


@register_kernel("rbf")
def _rbf(g: RelationGraph, gamma: float = 1.0) -> torch.Tensor:
    """``exp(-gamma ||x_i - x_j||^2)``."""
    return torch.exp(-gamma * g.sq_distance)


@register_kernel("rbf_taylor")
def _rbf_taylor(g: RelationGraph, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """P-order Taylor expansion of the Gaussian kernel (see ``ops.rbf_taylor_from_gram``)."""
    return ops.rbf_taylor_from_gram(g.gram, gamma=gamma, order=order, diag=g.diag)


@register_kernel("polynomial")
def _polynomial(g: RelationGraph, degree: int = 2, c: float = 1.0) -> torch.Tensor:
    """``(x_i . x_j + c)^degree``."""
    return (g.gram + c) ** degree
