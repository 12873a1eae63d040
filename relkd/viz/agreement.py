"""Student-teacher agreement (kNN overlap, CKA, distance rank correlation) as figures."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from relkd.graphs.agreement import AGREEMENT_KEYS
from relkd.viz._common import METRIC_NAMES, method_colours
from relkd.viz.curves import numeric_keys, series

__all__ = ["agreement_bars", "agreement_curves"]


def _default_keys(found: list[str]) -> list[str]:
    """The agreement metrics present, in :data:`AGREEMENT_KEYS` order."""
    return [k for k in AGREEMENT_KEYS if k in found]


def _y_limits(values: np.ndarray, pad: float) -> tuple[float, float]:
    """``[0, 1]`` plus ``pad`` above (room for labels), widened for negative or larger values."""
    finite = values[np.isfinite(values)]
    lo = min(0.0, float(finite.min()) - pad) if finite.size else 0.0
    hi = max(1.0, float(finite.max())) if finite.size else 1.0
    return lo, hi + pad


def agreement_bars(
    metrics: Mapping[str, Mapping[str, float]],
    keys: Sequence[str] | None = None,
    *,
    figsize: tuple[float, float] | None = None,
    colours: Mapping[str, Any] | None = None,
) -> Figure:
    """Grouped bars: one group per metric, one bar per method, value printed on each bar.

    Args:
        metrics: ``{method: {"knn_overlap": J, "cka": c, "distance_spearman": rho}}``, e.g. one
            :func:`relkd.graphs.agreement.agreement` result per method. A missing value draws no
            bar height (NaN) and no label.
        keys: the metrics to show; default those of :data:`AGREEMENT_KEYS` present (or, if none is,
            every numeric key).
        figsize: inches; default grows with the number of bars.
        colours: ``{method: colour}`` (default: tab10 in the order of ``metrics``), the mapping the
            run's other figures use.

    Returns:
        A figure with one axes holding ``len(metrics) * len(keys)`` bars and a legend of methods.
    """
    if not metrics:
        raise ValueError("agreement_bars needs at least one method in metrics, got none")
    found = numeric_keys(metrics.values(), x=None)
    keys = list(keys) if keys is not None else _default_keys(found) or found
    if not keys:
        raise ValueError("agreement_bars found no numeric value in metrics")
    methods = list(metrics)
    table = np.array([[float(metrics[m].get(k, np.nan)) for k in keys] for m in methods])

    width = 0.8 / len(methods)
    size = figsize or (max(4.5, 1.0 + 0.45 * table.size + 0.4 * len(keys)), 3.6)
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    centres = np.arange(len(keys))
    palette = dict(zip(methods, method_colours(len(methods)), strict=True))
    palette.update(colours or {})
    for i, method in enumerate(methods):
        colour = palette[method]
        offset = (i - (len(methods) - 1) / 2) * width
        bars = ax.bar(centres + offset, table[i], width, color=colour, label=method)
        labels = ["" if np.isnan(v) else f"{v:.2f}" for v in table[i]]
        ax.bar_label(bars, labels=labels, padding=2, fontsize=7)
    ax.set_xticks(centres, [textwrap.fill(METRIC_NAMES.get(k, k), 16) for k in keys])
    ax.set_ylabel("student–teacher agreement")
    ax.set_ylim(*_y_limits(table, pad=0.1))
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def agreement_curves(
    history: Sequence[Mapping[str, float]],
    keys: Sequence[str] | None = None,
    *,
    x: str = "epoch",
    figsize: tuple[float, float] = (6.0, 3.6),
) -> Figure:
    """The agreement metrics of one run per epoch, one line each, on one axes.

    Args:
        history: one row per evaluation, e.g. ``{"epoch": 3, "knn_overlap": 0.4, "cka": 0.8,
            "distance_spearman": 0.7}``; other keys are ignored unless named in ``keys``.
        keys: the metrics to plot; default those of :data:`AGREEMENT_KEYS` present.
        x: the row key of the x axis; a row without it stands at its position.
        figsize: inches.

    Returns:
        A figure with one axes holding one line per metric and a legend.
    """
    found = numeric_keys(history, x)
    keys = list(keys) if keys is not None else _default_keys(found)
    if not keys:
        raise ValueError(
            f"agreement_curves found none of {list(AGREEMENT_KEYS)} in the history; its numeric "
            f"keys are {found}: pass keys=... to plot them"
        )
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.subplots()
    values = []
    for key, colour in zip(keys, method_colours(len(keys)), strict=True):
        xs, vs = series(history, key, x)
        ax.plot(
            xs,
            vs,
            color=colour,
            linewidth=1.5,
            marker="o",
            markersize=3,
            label=METRIC_NAMES.get(key, key),
        )
        values.append(vs)
    ax.set_xlabel(x)
    ax.set_ylabel("student–teacher agreement")
    ax.set_ylim(*_y_limits(np.concatenate(values), pad=0.05))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig
