"""Results tables: mean ± std over seeds of each deployed network's last- and best-epoch accuracy.

Published CIFAR tables differ on which accuracy they report (the last epoch's, or the best epoch's
on the test set, which peeks at the test set); ours gives both, and says which is which. The spread is
the sample standard deviation (``ddof = 1``) over seeds; a single seed has none (shown as ``-``).

A method that deploys one network named ``student`` has one row named after the method; a method that
deploys others has one row per deployed network, ``method (network)`` (DML's peers, FFSD's leader).
Numbers of the run's evaluators (robust accuracy, retrieval ...) are extra columns, ``-`` where a row
has none.

``relkd table RUN_DIR`` prints the markdown table and writes ``results.md`` and ``results.csv`` in
``RUN_DIR`` (or ``--out``).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relkd.experiment.rundir import RunDir

__all__ = ["Row", "collect", "markdown", "summarize", "to_csv", "write_table"]

CAPTION = (
    "Test top-1 accuracy (%), mean ± sample std over seeds: *last* is the final epoch's, *best* the "
    "best epoch's (selected on the test set, as some published tables do)."
)
DEFAULT_NETWORK = "student"


@dataclass
class Row:
    """One deployed network's summary: accuracies of every seed, their mean and sample std, and the
    evaluators' numbers (``extra[column] = [value of each seed]``)."""

    method: str
    seeds: list[int]
    last: list[float]
    best: list[float]
    last5: list[float]
    extra: dict[str, list[float]] = field(default_factory=dict)

    @staticmethod
    def stats(values: Sequence[float]) -> tuple[float, float]:
        if not values:
            return math.nan, math.nan
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return mean, std

    @property
    def last_stats(self) -> tuple[float, float]:
        return self.stats(self.last)

    @property
    def best_stats(self) -> tuple[float, float]:
        return self.stats(self.best)

    @property
    def last5_stats(self) -> tuple[float, float]:
        return self.stats(self.last5)


def collect(run_dir: str | Path | RunDir) -> dict[str, list[dict[str, Any]]]:
    """``{method: [result of each seed]}``: the teachers first, then the methods in the order of the
    run's ``config.yaml`` (else alphabetical)."""
    return (run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)).results()


def _networks(result: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    networks = result.get("networks")
    if isinstance(networks, Mapping) and networks:
        return dict(networks)
    return {DEFAULT_NETWORK: result}


def summarize(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[Row]:
    """One :class:`Row` per method and deployed network; seeds sorted; results without an accuracy
    are skipped."""
    rows = []
    for method, runs in results.items():
        runs = sorted(runs, key=lambda r: r.get("seed", 0))
        names = list(dict.fromkeys(n for r in runs for n in _networks(r)))
        for name in names:
            per_seed = [(r.get("seed", 0), _networks(r).get(name)) for r in runs]
            per_seed = [(s, n) for s, n in per_seed if n is not None and n.get("last_acc1") is not None]
            if not per_seed:
                continue
            label = (
                method if name == DEFAULT_NETWORK or method.startswith("teacher") else f"{method} ({name})"
            )
            extra_keys = list(dict.fromkeys(k for _, n in per_seed for k in n if "/" in k))
            rows.append(
                Row(
                    method=label,
                    seeds=[s for s, _ in per_seed],
                    last=[float(n["last_acc1"]) for _, n in per_seed],
                    best=[float(n.get("best_acc1", n["last_acc1"])) for _, n in per_seed],
                    last5=[float(n.get("last_acc5", math.nan)) for _, n in per_seed],
                    extra={k: [float(n[k]) for _, n in per_seed if n.get(k) is not None] for k in extra_keys},
                )
            )
    return rows


def _pm(stats: tuple[float, float]) -> str:
    mean, std = stats
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if not math.isnan(std) else f"{mean:.2f}"


def _extra_columns(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r.extra))


def markdown(rows: Sequence[Row]) -> str:
    """The markdown table, with its caption."""
    extra = _extra_columns(rows)
    head = ["method", "seeds", "top-1 last epoch", "top-1 best epoch", "top-5 last epoch", *extra]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r.method, str(len(r.seeds)), _pm(r.last_stats), _pm(r.best_stats), _pm(r.last5_stats)]
        cells += [_pm(Row.stats(r.extra.get(k, []))) for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    note = f" Other columns: the run's evaluators at the last epoch ({', '.join(extra)})." if extra else ""
    return "\n".join(lines) + "\n\n" + CAPTION + note + "\n"


def to_csv(rows: Sequence[Row]) -> str:
    """The table as CSV: one line per row, means and stds in separate columns."""
    extra = _extra_columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf)
    head = ["method", "seeds", "last_acc1_mean", "last_acc1_std", "best_acc1_mean", "best_acc1_std",
            "last_acc5_mean", "last_acc5_std"]  # fmt: skip
    writer.writerow(head + [f"{k}_{s}" for k in extra for s in ("mean", "std")])
    for r in rows:
        cells = [*r.last_stats, *r.best_stats, *r.last5_stats]
        cells += [v for k in extra for v in Row.stats(r.extra.get(k, []))]
        writer.writerow([r.method, len(r.seeds), *("" if math.isnan(v) else f"{v:.4f}" for v in cells)])
    return buf.getvalue()


def write_table(run_dir: str | Path | RunDir, out: str | Path | None = None) -> str:
    """Write ``results.md`` and ``results.csv`` (in ``out``, default the run directory) and return
    the markdown.

    Raises:
        FileNotFoundError: ``run_dir`` holds no ``result.json``.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    rows = summarize(run.results())
    if not rows:
        raise FileNotFoundError(
            f"{run.path}: no result.json under teacher/ or <method>/seed<k>/; is it a relkd run directory "
            "whose runs have finished?"
        )
    text = markdown(rows)
    folder = run.path if out is None else Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / run.results_md.name).write_text(text)
    (folder / run.results_csv.name).write_text(to_csv(rows))
    return text
