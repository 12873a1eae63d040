"""Figures of :mod:`relkd.analysis`: layer-CKA heatmaps, tables of metrics, shared mistakes,
interpolation curves, module criticality and block-shuffle robustness.

Each function takes analysis results and returns a :class:`matplotlib.figure.Figure` (no pyplot);
the numbers are drawn as computed, in percent where the analysis gives error or accuracy fractions.
Grids of many panels are laid out with fixed spacing rather than constrained layout, which costs
seconds per figure at dozens of annotated panels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from relkd.analysis import InterpolationCurve, LayerCKA, Mistakes, ModuleCriticality
from relkd.viz._common import method_colours

__all__ = [
    "MISTAKE_KINDS",
    "criticality_grid",
    "criticality_map",
    "interpolation_curves",
    "layer_cka_heatmaps",
    "metric_table",
    "mistakes_bars",
    "robustness_curves",
]


def _require(name: str, items: Mapping) -> None:
    if not items:
        raise ValueError(f"{name} needs at least one result, got none")


def _annotate(ax: Axes, values: np.ndarray, shade: np.ndarray, fmt: str) -> None:
    """Each cell's value printed on it (– where missing), white on the dark half of ``shade`` (0..1)."""
    for (i, j), v in np.ndenumerate(values):
        text = format(v, fmt) if np.isfinite(v) else "–"
        dark = bool(np.isfinite(shade[i, j]) and shade[i, j] < 0.5)
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")


def layer_cka_heatmaps(
    results: Mapping[str, LayerCKA],
    *,
    rows: str = "teacher",
    columns: str = "student",
    ncols: int = 4,
    panel: float = 2.6,
) -> Figure:
    """One annotated heatmap per network pair on a shared ``[0, 1]`` scale: rows are the taps of the
    first network (``rows``), columns those of the second (``columns``).

    Args:
        results: ``{title: LayerCKA}``, e.g. one per method (teacher x student).
        rows, columns: names of the two networks, for the axis labels.
        ncols: panels per row of the figure.
        panel: inches per panel.
    """
    _require("layer_cka_heatmaps", results)
    n = len(results)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    # Fixed margins in inches: room for tick labels, the title above and the colorbar on the right.
    width, height = panel * ncols + 2.0, panel * nrows + 1.3
    fig = Figure(figsize=(width, height))
    grid = {"wspace": 0.6, "hspace": 0.65, "left": 1.0 / width, "right": 1 - 1.0 / width,
            "bottom": 0.75 / height, "top": 1 - 0.55 / height}  # fmt: skip
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw=grid).ravel()
    image = None
    for ax, (title, result) in zip(axes, results.items(), strict=False):
        m = result.matrix.double().cpu().numpy()
        image = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        _annotate(ax, m, m, ".2f")
        ax.set_xticks(range(len(result.taps_b)), result.taps_b, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(result.taps_a)), result.taps_a, fontsize=7)
        ax.set_title(title, fontsize=9)
    for ax in axes[n:]:
        ax.set_axis_off()
    fig.supxlabel(f"{columns} layer", fontsize=9)
    fig.supylabel(f"{rows} layer", fontsize=9)
    fig.colorbar(image, cax=fig.add_axes((1 - 0.75 / width, 0.2, 0.15 / width, 0.6)), label="CKA")
    return fig


def metric_table(
    values: Mapping[str, Mapping[str, float | None]],
    *,
    fmt: str = ".2f",
    per_column: bool = True,
    vmin: float | None = None,
    vmax: float | None = None,
    higher_is_better: Mapping[str, bool] | None = None,
    cmap: str = "viridis",
    colorbar: str | None = None,
) -> Figure:
    """An annotated table drawn as a heatmap: one row per network (or pair), one column per metric.

    Args:
        values: ``{row: {column: value}}``; a missing or None value is drawn as –.
        fmt: number format of the annotations.
        per_column: colour each column on its own range (metrics on different scales); else one
            range, ``vmin`` .. ``vmax`` (default the data's), and a colorbar labelled ``colorbar``.
        higher_is_better: per column, whether bright means large (default True); a False column's
            colours are reversed, so that bright is always the better end.
        cmap: the colour map.
    """
    _require("metric_table", values)
    rows = list(values)
    columns = list(dict.fromkeys(c for row in values.values() for c in row))
    raw = np.array([[_number(values[r].get(c)) for c in columns] for r in rows])
    if per_column:
        shade = np.full_like(raw, np.nan)
        for j, column in enumerate(columns):
            col = raw[:, j]
            if np.isfinite(col).any():
                lo, hi = np.nanmin(col), np.nanmax(col)
                shade[:, j] = (col - lo) / ((hi - lo) or 1.0)
            if higher_is_better is not None and not higher_is_better.get(column, True):
                shade[:, j] = 1.0 - shade[:, j]
    else:
        lo = float(np.nanmin(raw)) if vmin is None else vmin
        hi = float(np.nanmax(raw)) if vmax is None else vmax
        shade = (raw - lo) / ((hi - lo) or 1.0)
    fig = Figure(figsize=(2.0 + 1.05 * len(columns), 1.2 + 0.28 * len(rows)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shade, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    _annotate(ax, raw, shade, fmt)
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="left", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.xaxis.tick_top()
    if not per_column:
        bar = fig.colorbar(image, ax=ax, label=colorbar or "", shrink=0.9)
        ticks = np.linspace(0.0, 1.0, 5)
        bar.set_ticks(ticks, labels=[f"{lo + t * (hi - lo):.3g}" for t in ticks])
    return fig


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


MISTAKE_KINDS = {
    "both_correct": "both right",
    "only_a_correct": "only {a} right",
    "only_b_correct": "only {b} right",
    "same_mistake": "both wrong, same class",
    "different_mistake": "both wrong, different classes",
}
_MISTAKE_COLOURS = ("#4c9f70", "#9ecae1", "#fdae6b", "#d62728", "#f4a3a8")


def mistakes_bars(tables: Mapping[str, Mistakes], *, a: str = "student", b: str = "teacher") -> Figure:
    """The common / uncommon mistakes table of each pair (:class:`relkd.analysis.Mistakes`) as
    stacked horizontal bars: every test image on the left, only the images some side gets wrong on
    the right (the same colours, zoomed in). ``a`` and ``b`` name the two sides."""
    _require("mistakes_bars", tables)
    labels = list(tables)
    shares = np.array([[tables[k].fractions()[kind] * 100 for kind in MISTAKE_KINDS] for k in labels])
    fig = Figure(figsize=(10.0, 1.2 + 0.3 * len(labels)), layout="constrained")
    ax_all, ax_wrong = fig.subplots(1, 2, sharey=True, width_ratios=[1.0, 1.0])
    ys = np.arange(len(labels))
    for ax, first in ((ax_all, 0), (ax_wrong, 1)):
        left = np.zeros(len(labels))
        for col in range(first, len(MISTAKE_KINDS)):
            kind = list(MISTAKE_KINDS)[col]
            ax.barh(ys, shares[:, col], left=left, color=_MISTAKE_COLOURS[col],
                    label=MISTAKE_KINDS[kind].format(a=a, b=b))  # fmt: skip
            left += shares[:, col]
        ax.set_xlabel("test images (%)")
    ax_all.set_yticks(ys, labels, fontsize=8)
    ax_all.invert_yaxis()
    ax_all.set_xlim(0, 100)
    ax_all.set_title("every test image", fontsize=9)
    ax_wrong.set_title("the images at least one side gets wrong", fontsize=9)
    ax_wrong.grid(axis="x", alpha=0.3)
    handles, names = ax_all.get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=len(names), frameon=False, fontsize=8)
    fig.suptitle(f"who is right: {a} vs {b}", fontsize=10)
    return fig


def _check_metric(metric: str) -> str:
    if metric not in ("error", "loss"):
        raise ValueError(f"metric must be 'error' or 'loss', got {metric!r}")
    return "test error (%)" if metric == "error" else "test cross-entropy (nats)"


def interpolation_curves(curves: Mapping[str, InterpolationCurve], *, metric: str = "error") -> Figure:
    """Test error (%) (or ``metric="loss"``: cross-entropy) along ``(1 - lambda) theta_a + lambda
    theta_b``, one line per pair, its barrier in the legend."""
    _require("interpolation_curves", curves)
    ylabel = _check_metric(metric)
    scale, unit = (100.0, "pts") if metric == "error" else (1.0, "nats")
    fig = Figure(figsize=(8.0, 4.2), layout="constrained")
    ax = fig.subplots()
    for (label, curve), colour in zip(curves.items(), method_colours(len(curves)), strict=True):
        values = np.asarray(getattr(curve, metric)) * scale
        height = (curve.barrier if metric == "error" else curve.loss_barrier) * scale
        ax.plot(curve.lambdas, values, marker="o", markersize=3, color=colour,
                label=f"{label} (barrier {height:.1f} {unit})")  # fmt: skip
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_xlabel("λ  (0: first network, 1: second)")
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=7)
    return fig


def criticality_map(results: Mapping[str, Mapping[str, ModuleCriticality]]) -> Figure:
    """Networks x modules: the smallest rewinding ``alpha`` that keeps the error within ``eps``
    (0: the module can be reset to its initial value; 1: critical; – when even the trained value
    exceeds ``eps``), annotated."""
    _require("criticality_map", results)
    labels = list(results)
    modules = list(dict.fromkeys(m for per in results.values() for m in per))
    values = np.full((len(labels), len(modules)), np.nan)
    for i, label in enumerate(labels):
        for j, module in enumerate(modules):
            found = results[label].get(module)
            if found is not None and found.rewind_alpha is not None:
                values[i, j] = found.rewind_alpha
    eps = {c.eps for per in results.values() for c in per.values()}
    fig = Figure(figsize=(2.2 + 0.8 * len(modules), 1.4 + 0.3 * len(labels)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, cmap="magma_r", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    _annotate(ax, values, 1.0 - values, ".1f")
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("module rewound toward its initial value")
    bound = f"ε = {eps.pop():g}" if len(eps) == 1 else "its ε"
    ax.set_title(f"smallest α keeping the error ≤ {bound}", fontsize=9)
    fig.colorbar(image, ax=ax, label="α  (1 = critical)", shrink=0.9)
    return fig


def criticality_grid(result: Mapping[str, ModuleCriticality], *, panel: float = 2.4) -> Figure:
    """One panel per module of one network: the error (%) over rewinding ``alpha`` (x) and noise
    ``sigma`` (y), the region within ``eps`` outlined."""
    _require("criticality_grid", result)
    fig = Figure(figsize=(panel * len(result) + 1.0, panel + 0.6), layout="constrained")
    axes = fig.subplots(1, len(result), squeeze=False, sharey=True).ravel()
    image = None
    for ax, (module, c) in zip(axes, result.items(), strict=True):
        err = c.error.double().cpu().numpy().T * 100
        image = ax.imshow(err, cmap="magma_r", vmin=0, vmax=100, origin="lower", aspect="auto",
                          interpolation="nearest")  # fmt: skip
        ok = err <= c.eps * 100
        if ok.any() and not ok.all():
            ax.contour(ok.astype(float), levels=[0.5], colors="cyan", linewidths=1.0)
        ax.set_xticks(range(len(c.alphas)), [f"{a:g}" for a in c.alphas], fontsize=6, rotation=90)
        ax.set_yticks(range(len(c.sigmas)), [f"{s:g}" for s in c.sigmas], fontsize=7)
        ax.set_xlabel("α (0: initial, 1: trained)", fontsize=8)
        ax.set_title(f"{module}  (‖Δθ‖ = {c.distance:.2g})", fontsize=9)
    axes[0].set_ylabel("noise σ", fontsize=8)
    fig.colorbar(image, ax=axes.tolist(), label="error (%)", shrink=0.85)
    return fig


def robustness_curves(curves: Mapping[str, Mapping[int, float]], *, ylabel: str = "test top-1 (%)") -> Figure:
    """Accuracy (%) against the block size of block-shuffled inputs (log scale; the largest size is
    the unshuffled image), one line per network."""
    _require("robustness_curves", curves)
    fig = Figure(figsize=(6.5, 4.0), layout="constrained")
    ax = fig.subplots()
    sizes: set[int] = set()
    for (label, curve), colour in zip(curves.items(), method_colours(len(curves)), strict=True):
        ks = sorted(curve)
        sizes.update(ks)
        ax.plot(ks, [curve[k] * 100 for k in ks], marker="o", markersize=3, color=colour, label=label)
    ticks = sorted(sizes)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.minorticks_off()
    ax.set_xlabel("block size k (pixels; the largest = no shuffling)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=7)
    return fig
