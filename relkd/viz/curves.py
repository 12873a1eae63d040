"""Per-epoch curves of several methods: mean over seeds with a band, one panel per quantity."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from relkd.registry import suggest
from relkd.viz._common import method_colours

__all__ = ["BANDS", "numeric_keys", "series", "training_curves"]

Row = Mapping[str, Any]
BandFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def numeric_keys(rows: Iterable[Row], x: str | None = "epoch") -> list[str]:
    """Keys holding a number in at least one row, in order of first appearance, except ``x``."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update((k, None) for k, v in row.items() if k != x and _is_number(v))
    return list(keys)


def series(rows: Sequence[Row], key: str, x: str = "epoch") -> tuple[np.ndarray, np.ndarray]:
    """``(x, value)`` of the rows with a finite number under ``key``, sorted by ``x``; a row without
    ``x`` stands at its position (1-based)."""
    xs, vs = [], []
    for pos, row in enumerate(rows, start=1):
        v = row.get(key)
        if _is_number(v) and math.isfinite(v):
            xs.append(row.get(x, pos))
            vs.append(float(v))
    xs, vs = np.asarray(xs, dtype=float), np.asarray(vs)
    order = np.argsort(xs, kind="stable")
    return xs[order], vs[order]


def _seed_matrix(seeds: Sequence[Sequence[Row]], key: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    """Epochs logged by any seed and the ``[seeds, epochs]`` values (NaN where a seed has none)."""
    per_seed = [dict(zip(*series(rows, key, x), strict=True)) for rows in seeds]
    per_seed = [s for s in per_seed if s]
    epochs = np.asarray(sorted(set().union(*per_seed)), dtype=float)
    values = np.array([[s.get(e, np.nan) for e in epochs] for s in per_seed])
    return epochs, values.reshape(len(per_seed), len(epochs))


def _minmax(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.nanmin(values, axis=0), np.nanmax(values, axis=0)


def _std(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean -/+ the sample standard deviation (ddof 1; 0 where a single seed logged the epoch)."""
    count = np.sum(~np.isnan(values), axis=0)
    mean = np.nanmean(values, axis=0)
    sq = np.nansum((values - mean) ** 2, axis=0)
    std = np.sqrt(sq / np.maximum(count - 1, 1))
    return mean - std, mean + std


BANDS: dict[str, BandFn | None] = {"minmax": _minmax, "std": _std, "none": None}
_BAND_TITLES = {"minmax": "band: min–max over seeds", "std": "band: ± 1 std over seeds", "none": ""}


def _panel_order(key: str) -> int:
    """Accuracy first, then total losses, then loss terms (``loss/...``), then everything else."""
    k = key.lower()
    if "acc" in k:
        return 0
    if "loss" in k:
        return 2 if "/" in k else 1
    return 3


def training_curves(
    runs: Mapping[str, Sequence[Sequence[Row]]],
    keys: Sequence[str] | None = None,
    *,
    x: str = "epoch",
    band: str = "minmax",
    max_panels: int = 12,
    ncols: int = 3,
    panel_size: tuple[float, float] = (4.0, 3.0),
    colours: Mapping[str, Any] | None = None,
    log_keys: Sequence[str] = (),
    boundary: float | None = None,
) -> Figure:
    """Accuracy, every loss term and every other logged quantity per epoch, for several methods.

    Each panel is one quantity; each method one colour: the line is the mean over its seeds at each
    epoch, the shaded band their spread (``band``), drawn when at least two seeds logged it.

    Args:
        runs: ``{method: [rows_seed0, rows_seed1, ...]}``; a row is one epoch's log, e.g.
            ``{"epoch": 1, "test_acc1": 0.8, "train_loss": 1.2, "loss/ce": 1.0, "cka": 0.7}``.
            Keys may differ between rows and methods; a method lacking a key is left out of its
            panel, a seed lacking an epoch out of that epoch's mean.
        keys: the quantities to plot; default every numeric key but ``x``, accuracies first, then
            total losses, loss terms and the rest.
        x: the row key of the x axis; a row without it stands at its position.
        band: ``"minmax"``, ``"std"`` (mean -/+ sample std) or ``"none"``.
        max_panels: at most this many panels; with more keys the last ones are dropped with a
            warning (pass ``keys`` to choose).
        ncols: panels per row.
        panel_size: inches per panel.
        colours: ``{method: colour}`` (default: tab10 in the order of ``runs``); give every figure of
            a run the same mapping (:func:`relkd.viz._common.colour_map`) so a method keeps its colour.
        log_keys: quantities drawn on a logarithmic y axis (losses whose scales differ by orders of
            magnitude between methods; non-positive values are left out of such a panel).
        boundary: an x value where the runs change stage, drawn as a dotted vertical line.

    Returns:
        A figure with one axes per quantity and one legend of the methods.
    """
    if band not in BANDS:
        raise KeyError(f"unknown band {band!r}.{suggest(band, BANDS)} Known: {sorted(BANDS)}")
    if not runs:
        raise ValueError("training_curves needs at least one method in runs, got none")
    if keys is None:
        found = numeric_keys((row for seeds in runs.values() for rows in seeds for row in rows), x)
        keys = sorted(found, key=lambda k: (_panel_order(k), found.index(k)))
    if not keys:
        raise ValueError(f"training_curves found no numeric key besides {x!r} in the rows")
    if len(keys) > max_panels:
        warnings.warn(
            f"training_curves: {len(keys)} quantities, showing the first {max_panels}; dropped "
            f"{list(keys[max_panels:])} (pass keys=... to choose, or raise max_panels)",
            stacklevel=2,
        )
        keys = keys[:max_panels]

    cols = min(ncols, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(keys) :]:
        ax.remove()
    palette = dict(zip(runs, method_colours(len(runs)), strict=True))
    palette.update(colours or {})
    spread = BANDS[band]
    for ax, key in zip(axes, keys, strict=False):
        log = key in log_keys
        for name, seeds in runs.items():
            colour = palette[name]
            epochs, values = _seed_matrix(seeds, key, x)
            if log:
                values = np.where(values > 0, values, np.nan)
            if not len(epochs) or np.all(np.isnan(values)):
                continue
            mean = np.nanmean(values, axis=0)
            ax.plot(epochs, mean, color=colour, linewidth=1.5, marker="o" if len(epochs) == 1 else None)
            if spread is not None and values.shape[0] >= 2:
                lo, hi = spread(values)
                ax.fill_between(epochs, lo, hi, color=colour, alpha=0.2, linewidth=0)
        if log:
            ax.set_yscale("log")
        if boundary is not None:
            ax.axvline(boundary, color="grey", linestyle=":", linewidth=1.0)
        ax.set_title(key)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)

    handles = [
        Line2D(
            [],
            [],
            color=palette[name],
            linewidth=2,
            label=f"{name} ({len(seeds)} seed{'s' * (len(seeds) != 1)})",
        )
        for name, seeds in runs.items()
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5))
    fig.suptitle("; ".join(filter(None, ["mean over seeds", _BAND_TITLES[band]])))
    return fig
