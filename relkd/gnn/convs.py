"""The torch-geometric convolutions an encoder can stack, each a factory ``(in_dim, out_dim, **kw)``.

They run on plain PyTorch (no pyg-lib or torch-scatter): PyG's scatter falls back to
``Tensor.scatter_reduce_`` / ``index_add_``. Whether a layer reads edge weights follows from its
``forward`` signature (``edge_weight``): TAG and GCN do, GAT and GraphSAGE do not.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from relkd.gnn.registry import register

if TYPE_CHECKING:
    from torch_geometric.nn.conv import MessagePassing


def _pyg() -> Any:
    """``torch_geometric.nn``, imported on first use (it takes a second or two) and without the
    deprecation notice its import makes torch print, which says nothing to a relkd user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        import torch_geometric.nn as pyg_nn
    return pyg_nn


@register("tag")
def tag(in_dim: int, out_dim: int, K: int = 1, **kwargs: Any) -> MessagePassing:
    r"""Topology adaptive convolution (Du et al., 2017), as used by HKD with ``K = 1``:
    ``X' = sum_{k=0..K} (D^{-1/2} A D^{-1/2})^k X W_k + b``, ``D`` the in-degree (weighted) matrix."""
    return _pyg().TAGConv(in_dim, out_dim, K=K, **kwargs)


@register("gcn")
def gcn(in_dim: int, out_dim: int, **kwargs: Any) -> MessagePassing:
    r"""Graph convolution (Kipf & Welling, ICLR 2017): ``X' = D^{-1/2} (A + I) D^{-1/2} X W + b``."""
    return _pyg().GCNConv(in_dim, out_dim, **kwargs)


@register("gat")
def gat(in_dim: int, out_dim: int, heads: int = 1, **kwargs: Any) -> MessagePassing:
    """Graph attention (Velickovic et al., ICLR 2018); ``heads`` heads of ``out_dim / heads``
    channels each, concatenated back to ``out_dim``. Attention replaces edge weights."""
    if out_dim % heads:
        raise ValueError(f"gat: out_dim={out_dim} must be divisible by heads={heads}")
    return _pyg().GATConv(in_dim, out_dim // heads, heads=heads, concat=True, **kwargs)


@register("sage", "graphsage")
def sage(in_dim: int, out_dim: int, aggr: str = "mean", **kwargs: Any) -> MessagePassing:
    """GraphSAGE (Hamilton et al., NeurIPS 2017): ``x_i' = W_1 x_i + W_2 aggr_{j in N(i)} x_j``."""
    return _pyg().SAGEConv(in_dim, out_dim, aggr=aggr, **kwargs)
