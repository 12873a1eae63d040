"""Write a figure to PNG, SVG and/or PDF next to each other."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from relkd.registry import suggest

__all__ = ["FORMATS", "save_figure"]

# Raster resolution for print; vector formats ignore it.
FORMATS = {"png": {"dpi": 300}, "svg": {}, "pdf": {}}


def save_figure(
    fig: Figure, path: str | Path, formats: Sequence[str] = ("png",), dpi: int | None = None
) -> list[Path]:
    """Save ``fig`` as ``<path>.<format>`` for each format, cropped to its content.

    Args:
        fig: the figure.
        path: file path with or without suffix; a ``.png``/``.svg``/``.pdf`` suffix is replaced by
            each format's. Missing parent folders are created.
        formats: any of ``"png"`` (300 dpi), ``"svg"``, ``"pdf"``.
        dpi: raster resolution of the PNG instead of 300 (e.g. 100 for a README).

    Returns:
        The paths written, in the order of ``formats``.
    """
    if isinstance(formats, str):
        formats = (formats,)
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown figure format {fmt!r}.{suggest(fmt, FORMATS)} Known: {list(FORMATS)}")
    path = Path(path)
    if path.suffix.lstrip(".").lower() in FORMATS:
        path = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        out = path.with_name(f"{path.name}.{fmt}")
        options = dict(FORMATS[fmt])
        if dpi is not None and "dpi" in options:
            options["dpi"] = dpi
        fig.savefig(out, format=fmt, bbox_inches="tight", **options)
        written.append(out)
    return written
