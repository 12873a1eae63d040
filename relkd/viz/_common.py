"""What the figures share: labels and their class order, class colours, readable relation names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
import torch

from relkd.graphs import RelationGraph

Labels = torch.Tensor | np.ndarray | Sequence[int] | None

# Readable names of the relations for titles and colorbars; others print as given.
RELATION_NAMES = {
    "gram": "inner product",
    "sq_distance": "squared distance",
    "distance": "Euclidean distance",
    "inv_distance": "inverse distance",
    "normalized_distance": "RKD-normalised distance",
    "cosine": "cosine similarity",
}

METRIC_NAMES = {
    "knn_overlap": "kNN overlap (Jaccard)",
    "cka": "linear CKA",
    "distance_spearman": "distance rank corr. (Spearman)",
}

# Beyond this many classes, no tick or legend entry per class: the figure shows blocks and colours.
MAX_NAMED_CLASSES = 20


def relation_name(relation: str, params: dict[str, Any] | None = None) -> str:
    """A readable relation name: ``"cosine"`` -> ``"cosine similarity"``, ``"kernel:rbf"`` with
    ``gamma=0.5`` -> ``"rbf kernel (gamma=0.5)"``."""
    if relation.startswith("kernel:"):
        name = f"{relation.split(':', 1)[1]} kernel"
    else:
        name = RELATION_NAMES.get(relation, relation)
    if params:
        name += " (" + ", ".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"
    return name


def resolve_labels(name: str, labels: Labels, n: int, *graphs: RelationGraph) -> np.ndarray | None:
    """The labels to plot: ``labels`` if given, else the first graph's ``y``; else ``None``."""
    if labels is None:
        labels = next((g.y for g in graphs if g.y is not None), None)
    if labels is None:
        return None
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{name}: expected one label per instance ({n}), got {y.shape[0]} labels")
    return y


def class_blocks(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instances ordered by class (stable) -> ``(order, classes, starts)``; class ``c`` occupies
    positions ``starts[c] : starts[c + 1]`` of the ordered batch."""
    order = np.argsort(y, kind="stable")
    classes, starts = np.unique(y[order], return_index=True)
    return order, classes, starts


def display_names(classes: np.ndarray, names: Sequence[str] | None) -> list[str]:
    """Display names of ``classes``: ``names[c]`` when given, else the class value itself."""
    if names is None:
        return [str(c) for c in classes]
    try:
        return [str(names[int(c)]) for c in classes]
    except (IndexError, ValueError, TypeError) as err:
        raise ValueError(
            f"class_names must be indexable by every class label, got {len(names)} names for "
            f"labels {classes.tolist()}"
        ) from err


def method_colours(n: int) -> list[tuple[float, float, float]]:
    """One colour per method or metric (tab10, repeating beyond ten)."""
    palette = matplotlib.colormaps["tab10"].colors
    return [palette[i % len(palette)] for i in range(n)]


def colour_map(names: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """``{name: colour}`` in the order given: pass every figure of a run the same mapping (built from the
    run's full list of methods) and a method keeps its colour from figure to figure."""
    unique = list(dict.fromkeys(names))
    return dict(zip(unique, method_colours(len(unique)), strict=True))


def class_colours(n: int) -> np.ndarray:
    """``n`` distinct colours: tab10 / tab20 where they suffice, else evenly spaced on turbo."""
    if n <= 10:
        return np.asarray(matplotlib.colormaps["tab10"].colors)[:n]
    if n <= 20:
        return np.asarray(matplotlib.colormaps["tab20"].colors)[:n]
    return matplotlib.colormaps["turbo"](np.linspace(0.05, 0.95, n))
