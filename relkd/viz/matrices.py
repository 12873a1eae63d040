"""Relation matrices of a batch, teacher | student | student - teacher, ordered by class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from relkd.graphs import RelationGraph
from relkd.graphs.agreement import probe_pair
from relkd.viz._common import (
    MAX_NAMED_CLASSES,
    Labels,
    class_blocks,
    display_names,
    relation_name,
    resolve_labels,
)

__all__ = ["relation_matrices"]


def _mark_classes(
    ax: Axes, classes: np.ndarray, starts: np.ndarray, n: int, names: list[str], colour: str
) -> None:
    """Class boundaries as lines; class names as ticks at the block centres while legible."""
    for b in starts[1:]:
        ax.axhline(b - 0.5, color=colour, linewidth=0.8)
        ax.axvline(b - 0.5, color=colour, linewidth=0.8)
    if len(classes) <= MAX_NAMED_CLASSES:
        centres = (starts + np.append(starts[1:], n)) / 2 - 0.5
        ax.set_xticks(centres, names, rotation=90 if len(classes) > 10 else 0)
        ax.set_yticks(centres, names)
        ax.tick_params(length=0)
        ax.set_xlabel("class")
        ax.set_ylabel("class")
    else:
        ax.set_xlabel("instance (ordered by class)")
        ax.set_ylabel("instance (ordered by class)")


def relation_matrices(
    student: torch.Tensor | RelationGraph,
    teacher: torch.Tensor | RelationGraph,
    labels: Labels = None,
    relation: str = "cosine",
    *,
    class_names: Sequence[str] | None = None,
    cmap: str = "viridis",
    figsize: tuple[float, float] = (12.5, 4.0),
    **kernel_params: Any,
) -> Figure:
    """Teacher, student and difference relation matrices of one batch, side by side.

    Instances are ordered by class (stable within a class) and class boundaries drawn as lines,
    so the block structure of a good embedding shows as bright diagonal blocks (similarities) or
    dark ones (distances). Teacher and student share one colour scale, so the panels compare
    directly; the difference ``R^s - R^t`` has its own diverging scale centred on 0. Raw
    distances differ in scale between networks: ``relation="normalized_distance"`` (RKD's
    ``d / mean d``) removes that.

    Args:
        student, teacher: embeddings ``[N, ...]`` (widths may differ) or ``RelationGraph`` s.
        labels: class of each instance ``[N]``; default the graphs' ``y`` (teacher first); without
            labels the batch keeps its order.
        relation: any :meth:`RelationGraph.relation` name: ``"cosine"``, ``"distance"``,
            ``"normalized_distance"``, ``"kernel:rbf"``, ...
        class_names: display name of each class label (``class_names[y]``).
        cmap: colour map of the teacher and student panels.
        figsize: inches.
        **kernel_params: parameters of a ``kernel:<name>`` relation (e.g. ``gamma=0.5``).

    Returns:
        A figure with three image axes (teacher, student, difference) and two colorbars.
    """
    s, t = probe_pair("relation_matrices", student, teacher)
    n = s.num_nodes
    rel = torch.stack(
        [
            t.relation(relation, **kernel_params).double(),
            s.relation(relation, **kernel_params).double(),
        ]
    )
    mats = rel.cpu().numpy()
    y = resolve_labels("relation_matrices", labels, n, t, s)
    if y is not None:
        order, classes, starts = class_blocks(y)
        mats = mats[:, order][:, :, order]
    mt, ms = mats
    diff = ms - mt

    name = relation_name(relation, kernel_params)
    fig = Figure(figsize=figsize, layout="constrained")
    ax_t, ax_s, ax_d = fig.subplots(1, 3)
    lo, hi = float(mats.min()), float(mats.max())
    for ax, m, title in ((ax_t, mt, "Teacher"), (ax_s, ms, "Student")):
        image = ax.imshow(m, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title)
    fig.colorbar(image, ax=[ax_t, ax_s], label=name, shrink=0.9)
    lim = float(np.abs(diff).max()) or 1.0
    image = ax_d.imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax_d.set_title("Student − Teacher")
    fig.colorbar(image, ax=ax_d, label="difference", shrink=0.9)

    for ax, colour in ((ax_t, "white"), (ax_s, "white"), (ax_d, "black")):
        if y is None:
            ax.set_xlabel("instance")
            ax.set_ylabel("instance")
        else:
            names = display_names(classes, class_names)
            _mark_classes(ax, classes, starts, n, names, colour)
    fig.suptitle(f"{name}, batch of {n}")
    return fig
