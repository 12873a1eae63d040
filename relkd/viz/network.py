"""The kNN relation graphs of a batch drawn as networks: teacher | student, on shared positions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from relkd.graphs import RelationGraph
from relkd.graphs.agreement import centred_gram, jaccard, knn_adjacency, probe_pair
from relkd.registry import suggest
from relkd.viz._common import (
    MAX_NAMED_CLASSES,
    Labels,
    class_colours,
    display_names,
    relation_name,
    resolve_labels,
)

__all__ = ["LAYOUTS", "knn_graphs", "register_layout"]

LayoutFn = Callable[[RelationGraph, np.ndarray, int], np.ndarray]
LAYOUTS: dict[str, LayoutFn] = {}

EDGE_STYLES = {
    "shared": {"color": "0.6", "linewidth": 0.7, "alpha": 0.8},
    "teacher only": {"color": "black", "linewidth": 0.9, "alpha": 0.9},
    "student only": {"color": "#c2185b", "linewidth": 0.9, "alpha": 0.9, "linestyle": (0, (4, 1.5))},
}


def register_layout(name: str) -> Callable[[LayoutFn], LayoutFn]:
    """Register ``fn(teacher, adjacency, seed) -> positions [N, 2]`` as ``knn_graphs(layout=name)``;
    ``adjacency`` is the teacher's undirected kNN graph as a boolean ``[N, N]`` array."""

    def deco(fn: LayoutFn) -> LayoutFn:
        LAYOUTS[name] = fn
        return fn

    return deco


@register_layout("pca")
def _pca_layout(teacher: RelationGraph, adjacency: np.ndarray, seed: int) -> np.ndarray:
    """Teacher's 2-D PCA scores ``U_2 Lambda_2^{1/2}`` from its centred Gram ``U Lambda U^T``."""
    values, vectors = torch.linalg.eigh(centred_gram(teacher))
    scores = vectors[:, -2:].flip(-1) * values[-2:].flip(-1).clamp_min(0).sqrt()
    pos = scores.cpu().numpy()
    # An eigenvector's sign is arbitrary: fix it so the same embedding always looks the same.
    peak = pos[np.abs(pos).argmax(0), [0, 1]]
    return pos * np.where(peak < 0, -1.0, 1.0)


@register_layout("spring")
def _spring_layout(teacher: RelationGraph, adjacency: np.ndarray, seed: int) -> np.ndarray:
    """Fruchterman-Reingold layout of the teacher's kNN graph (networkx, seeded)."""
    import networkx as nx

    pos = nx.spring_layout(nx.from_numpy_array(adjacency.astype(np.int8)), seed=seed)
    return np.array([pos[i] for i in range(adjacency.shape[0])])


def _segments(pos: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """``[E, 2, 2]`` line segments of the node pairs (rows of the upper triangle of a mask)."""
    i, j = np.nonzero(np.triu(pairs, 1))
    return np.stack([pos[i], pos[j]], axis=1)


def _draw(ax: Axes, pos: np.ndarray, edges: dict[str, np.ndarray], colours: np.ndarray, size: float) -> None:
    """Edges of each kind as one ``LineCollection`` under the nodes, one ``PathCollection``."""
    for label, pairs in edges.items():
        lines = LineCollection(_segments(pos, pairs), label=label, zorder=1, **EDGE_STYLES[label])
        ax.add_collection(lines, autolim=False)
    ax.scatter(pos[:, 0], pos[:, 1], c=colours, s=size, edgecolors="white", linewidths=0.4, zorder=2)
    ax.set_aspect("equal", adjustable="datalim")


def knn_graphs(
    student: torch.Tensor | RelationGraph,
    teacher: torch.Tensor | RelationGraph,
    labels: Labels = None,
    k: int = 5,
    relation: str = "cosine",
    layout: str = "pca",
    *,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    figsize: tuple[float, float] = (11.0, 5.4),
) -> Figure:
    """The kNN graphs of teacher and student drawn side by side on the same node positions.

    Nodes are the instances, coloured by class. A line joins ``i`` and ``j`` when either is among
    the other's ``k`` nearest neighbours under ``relation``; grey lines are edges both graphs have,
    black ones edges only the teacher has (left panel), dashed crimson ones edges only the
    student has (right panel). The title gives the directed kNN edge overlap of
    :func:`relkd.graphs.agreement.knn_overlap`.

    Args:
        student, teacher: embeddings ``[N, ...]`` (widths may differ) or ``RelationGraph`` s.
        labels: class of each instance ``[N]``; default the graphs' ``y`` (teacher first).
        k: neighbours per instance.
        relation: what "nearest" means (any :meth:`RelationGraph.relation` name).
        layout: node positions shared by both panels, from the teacher: ``"pca"`` (2-D PCA of
            its embedding, axes = principal components) or ``"spring"`` (force-directed layout of
            its kNN graph); :func:`register_layout` adds more.
        class_names: display name of each class label (``class_names[y]``).
        seed: seed of stochastic layouts.
        figsize: inches.

    Returns:
        A figure with two axes (teacher, student); each holds one ``LineCollection`` per edge
        kind (labelled ``"shared"`` and ``"teacher only"`` / ``"student only"``) and one
        ``PathCollection`` of the ``N`` nodes.
    """
    if layout not in LAYOUTS:
        raise KeyError(f"unknown layout {layout!r}.{suggest(layout, LAYOUTS)} Known: {sorted(LAYOUTS)}")
    s, t = probe_pair("knn_graphs", student, teacher)
    n = s.num_nodes
    directed = torch.stack([knn_adjacency(s, k, relation), knn_adjacency(t, k, relation)])
    overlap = float(jaccard(directed[0], directed[1]))
    adj_s, adj_t = (directed | directed.transpose(1, 2)).cpu().numpy()
    pos = LAYOUTS[layout](t, adj_t, seed)

    y = resolve_labels("knn_graphs", labels, n, t, s)
    if y is None:
        classes, colours = np.empty(0), np.full((n, 3), 0.3)
    else:
        classes, codes = np.unique(y, return_inverse=True)
        palette = class_colours(len(classes))
        colours = palette[codes]
    size = float(np.clip(2500.0 / n, 6.0, 40.0))

    kinds = {"shared": adj_s & adj_t, "teacher only": adj_t & ~adj_s, "student only": adj_s & ~adj_t}
    panels = (("Teacher", ("shared", "teacher only")), ("Student", ("shared", "student only")))
    fig = Figure(figsize=figsize, layout="constrained")
    for ax, (title, drawn) in zip(fig.subplots(1, 2), panels, strict=True):
        _draw(ax, pos, {kind: kinds[kind] for kind in drawn}, colours, size)
        ax.set_title(title)
        if layout == "pca":
            ax.set_xlabel("teacher PC 1")
            ax.set_ylabel("teacher PC 2")
        else:
            ax.set_xticks([])
            ax.set_yticks([])

    fig.legend(
        handles=[
            Line2D(
                [],
                [],
                linewidth=2,
                label=f"{label} ({int(np.triu(m, 1).sum())})",
                **{key: v for key, v in EDGE_STYLES[label].items() if key != "linewidth"},
            )
            for label, m in kinds.items()
        ],
        loc="outside lower center",
        ncol=3,
        title="kNN edges",
    )
    if 0 < len(classes) <= MAX_NAMED_CLASSES:
        fig.legend(
            handles=[
                Line2D([], [], linestyle="", marker="o", markersize=6, color=c, label=name)
                for c, name in zip(palette, display_names(classes, class_names), strict=True)
            ],
            loc="outside right upper",
            ncol=1 if len(classes) <= 10 else 2,
            title="class",
        )
    fig.suptitle(
        f"{k}-NN graphs by {relation_name(relation)}, batch of {n}: edge overlap (Jaccard) {overlap:.2f}"
    )
    return fig
