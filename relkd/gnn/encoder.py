r"""``GNNEncoder``: node embeddings of a relation graph from a stack of graph convolutions.

.. math::
    h^{0} = x, \qquad
    h^{l+1} = \mathrm{dropout}\big(\sigma(\mathrm{norm}(\mathrm{conv}_l(h^{l}, A)))\big)
    \quad (l < L - 1), \qquad
    z = \mathrm{conv}_{L-1}(h^{L-1}, A), \quad \text{optionally } z / \|z\|

The last layer has no norm or activation (as torch-geometric's ``BasicGNN``). Widths:
``in_dim -> hidden_dim -> ... -> hidden_dim -> out_dim`` (one layer: ``in_dim -> out_dim``).

An encoder is an ordinary ``nn.Module`` with trainable parameters. Inside a distillation loss it is a
submodule, so ``loss.parameters()`` yields its weights: the optimiser must be given
``student.parameters()`` *and* every loss's ``parameters()`` (the engine does this), or the encoder
stays at its initialisation.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from relkd.gnn.registry import CONVS
from relkd.graphs import RelationGraph
from relkd.registry import suggest

__all__ = ["GNNEncoder", "create"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "prelu": nn.PReLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}

_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "none": lambda dim: nn.Identity(),
    "batch": nn.BatchNorm1d,
    "layer": nn.LayerNorm,
}


def _lookup(table: dict[str, Callable], kind: str, name: str) -> Callable:
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}.{suggest(name, table)} Known: {sorted(table)}")
    return table[name]


class GNNEncoder(nn.Module):
    """A stack of ``num_layers`` registered graph convolutions (see :func:`relkd.gnn.available`).

    Args:
        conv: the convolution's registered name (``"tag"``, ``"gcn"``, ``"gat"``, ``"sage"``).
        in_dim, hidden_dim, out_dim: widths of the input, hidden and output node features.
        num_layers: number of convolutions (depth).
        act: activation between layers (``relu``, ``elu``, ``gelu``, ``leaky_relu``, ``prelu``,
            ``tanh``, ``identity``).
        norm: normalisation between layers (``none``, ``batch``, ``layer``).
        dropout: dropout probability between layers.
        normalize: L2-normalise the output rows (HKD does).
        **conv_kwargs: passed to every convolution (e.g. ``K=2`` for TAG, ``heads=4`` for GAT).

    Edges follow torch-geometric's ``source_to_target`` convention, which is what
    :meth:`RelationGraph.knn` returns (row 0 the neighbour, row 1 the centre). Edge weights are read
    by layers whose ``forward`` takes ``edge_weight`` (TAG, GCN); the others ignore them, with a
    warning.

    Shapes:
        ``x`` ``[N, in_dim]``, ``edge_index`` ``[2, E]``, ``edge_weight`` ``[E]`` -> ``[N, out_dim]``.
    """

    def __init__(
        self,
        conv: str,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 1,
        *,
        act: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
        normalize: bool = False,
        **conv_kwargs: Any,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"a GNN encoder needs num_layers >= 1, got {num_layers}")
        build = CONVS.get(conv)
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.conv_name = conv
        self.convs = nn.ModuleList(
            build(a, b, **conv_kwargs) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        make_act, make_norm = _lookup(_ACTIVATIONS, "activation", act), _lookup(_NORMS, "norm", norm)
        self.acts = nn.ModuleList(make_act() for _ in range(num_layers - 1))
        self.norms = nn.ModuleList(make_norm(hidden_dim) for _ in range(num_layers - 1))
        self.dropout = nn.Dropout(dropout)
        self.normalize = normalize
        self.uses_edge_weight = "edge_weight" in inspect.signature(self.convs[0].forward).parameters

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Node embeddings ``[N, out_dim]`` of the graph ``(x, edge_index, edge_weight)``."""
        x = x.to(next(self.parameters()).dtype)
        if edge_weight is not None and not self.uses_edge_weight:
            warnings.warn(
                f"GNNEncoder({self.conv_name!r}) ignores edge weights; its convolution has none",
                stacklevel=2,
            )
        extra = (edge_weight,) if self.uses_edge_weight else ()
        for i, conv in enumerate(self.convs):
            x = conv(x, edge_index, *extra)
            if i < len(self.acts):
                x = self.dropout(self.acts[i](self.norms[i](x)))
        return F.normalize(x, dim=-1) if self.normalize else x

    def from_graph(
        self,
        graph: RelationGraph | Any,
        k: int | None = None,
        relation: str = "cosine",
        *,
        loop: bool = False,
        weighted: bool = False,
    ) -> torch.Tensor:
        """Embed the nodes of a ``RelationGraph`` or a torch-geometric ``Data``.

        A ``RelationGraph`` is sparsified to its kNN graph under ``relation``
        (:meth:`RelationGraph.knn`; a batch of graphs becomes one disjoint graph), or kept complete
        with ``k=None``. A ``Data`` is used as it is (``x``, ``edge_index``, and ``edge_weight`` or a
        one-column ``edge_attr``). ``weighted=True`` passes the relation values as edge weights;
        mind that GCN/TAG normalisation needs non-negative weights.
        """
        if isinstance(graph, RelationGraph):
            x = graph.x.reshape(-1, graph.x.shape[-1])
            if k is None:
                data = graph.to_pyg(None, relation, loop=loop)
                edge_index, weight = data.edge_index, data.edge_attr.reshape(-1)
            else:
                edge_index, weight = graph.knn(k, relation, loop=loop)
        else:
            x, edge_index = graph.x, graph.edge_index
            weight = getattr(graph, "edge_weight", None)
            if weight is None and getattr(graph, "edge_attr", None) is not None:
                weight = graph.edge_attr.reshape(-1)
        return self(x, edge_index, weight if weighted else None)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"


def create(
    name: str, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 1, **kwargs: Any
) -> GNNEncoder:
    """Build an encoder of the registered convolution ``name``; see :class:`GNNEncoder` for kwargs.

    >>> enc = create("tag", 128, 128, 128, num_layers=1, K=1, normalize=True)   # HKD's encoder
    >>> enc = create("gat", 64, 128, 32, num_layers=3, heads=4, norm="layer", act="elu")
    """
    return GNNEncoder(name, in_dim, hidden_dim, out_dim, num_layers, **kwargs)
