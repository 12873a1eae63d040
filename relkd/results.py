"""Results tables: mean ± std over seeds of each method's last-epoch and best-epoch accuracy.

Published CIFAR tables differ on which accuracy they report (the last epoch's, or the best epoch's
on the test set, which peeks at the test set); ours gives both, and says which is which. The spread is
the sample standard deviation (``ddof = 1``) over seeds; a single seed has none (shown as ``-``).

``relkd table RUN_DIR`` prints the markdown table and writes ``results.md`` and ``results.csv`` in
``RUN_DIR`` (layout in :mod:`relkd.train`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Row", "collect", "markdown", "summarize", "to_csv", "write_table"]

CAPTION = (
    "Test top-1 accuracy (%), mean ± sample std over seeds: *last* is the final epoch's, *best* the "
    "best epoch's (selected on the test set, as some published tables do)."
)


@dataclass
class Row:
    """One method's summary: accuracies of every seed, and their mean and sample std."""

    method: str
    seeds: list[int]
    last: list[float]
    best: list[float]
    last5: list[float]

    @staticmethod
    def _stats(values: Sequence[float]) -> tuple[float, float]:
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return mean, std

    @property
    def last_stats(self) -> tuple[float, float]:
        return self._stats(self.last)

    @property
    def best_stats(self) -> tuple[float, float]:
        return self._stats(self.best)

    @property
    def last5_stats(self) -> tuple[float, float]:
        return self._stats(self.last5)


def collect(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``{method: [result of each seed]}`` from ``teacher/result.json`` and ``*/seed*/result.json``,
    methods in the order of the run's ``config.yaml`` (else alphabetical), the teacher first."""
    run_dir = Path(run_dir)
    found: dict[str, list[dict[str, Any]]] = {}
    teacher = run_dir / "teacher" / "result.json"
    if teacher.is_file():
        found["teacher"] = [json.loads(teacher.read_text())]
    for path in sorted(run_dir.glob("*/seed*/result.json")):
        method = path.parent.parent.name
        found.setdefault(method, []).append(json.loads(path.read_text()))
    order = ["teacher", *_config_methods(run_dir)]
    rank = {m: i for i, m in enumerate(order)}
    return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def _config_methods(run_dir: Path) -> list[str]:
    config = run_dir / "config.yaml"
    if not config.is_file():
        return []
    methods = (yaml.safe_load(config.read_text()) or {}).get("methods") or {}
    return list(methods) if isinstance(methods, Mapping) else []


def summarize(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[Row]:
    """One :class:`Row` per method; seeds sorted; results without an accuracy are skipped."""
    rows = []
    for method, runs in results.items():
        runs = sorted((r for r in runs if r.get("last_acc1") is not None), key=lambda r: r.get("seed", 0))
        if not runs:
            continue
        rows.append(
            Row(
                method=method,
                seeds=[r.get("seed", 0) for r in runs],
                last=[float(r["last_acc1"]) for r in runs],
                best=[float(r.get("best_acc1", r["last_acc1"])) for r in runs],
                last5=[float(r.get("last_acc5", math.nan)) for r in runs],
            )
        )
    return rows


def _pm(stats: tuple[float, float]) -> str:
    mean, std = stats
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if not math.isnan(std) else f"{mean:.2f}"


def markdown(rows: Sequence[Row]) -> str:
    """The markdown table, with its caption."""
    lines = [
        "| method | seeds | top-1 last epoch | top-1 best epoch | top-5 last epoch |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r.method, str(len(r.seeds)), _pm(r.last_stats), _pm(r.best_stats), _pm(r.last5_stats)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + CAPTION + "\n"


def to_csv(rows: Sequence[Row]) -> str:
    """The table as CSV: one line per method, means and stds in separate columns."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "seeds", "last_acc1_mean", "last_acc1_std", "best_acc1_mean", "best_acc1_std",
                     "last_acc5_mean", "last_acc5_std"])  # fmt: skip
    for r in rows:
        cells = [*r.last_stats, *r.best_stats, *r.last5_stats]
        writer.writerow([r.method, len(r.seeds), *("" if math.isnan(v) else f"{v:.4f}" for v in cells)])
    return buf.getvalue()


def write_table(run_dir: str | Path) -> str:
    """Write ``results.md`` and ``results.csv`` in ``run_dir`` and return the markdown.

    Raises:
        FileNotFoundError: ``run_dir`` holds no ``result.json``.
    """
    run_dir = Path(run_dir)
    rows = summarize(collect(run_dir))
    if not rows:
        raise FileNotFoundError(
            f"{run_dir}: no result.json under teacher/ or <method>/seed<k>/; is it a relkd run directory "
            "whose runs have finished?"
        )
    text = markdown(rows)
    (run_dir / "results.md").write_text(text)
    (run_dir / "results.csv").write_text(to_csv(rows))
    return text
