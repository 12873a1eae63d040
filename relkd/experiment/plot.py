"""``relkd plot``: a run's training curves (and agreement curves): every method, mean over seeds.

``plot_run(RUN_DIR)`` reads every ``metrics.jsonl`` of the run (teachers and ``<method>/seed<k>``) and
writes ``RUN_DIR/plots/training_curves.png`` (accuracy, total loss and each loss term per epoch, mean
over seeds with a band) and, when the run logged them, ``RUN_DIR/plots/agreement_curves.png`` (the
agreement metrics per epoch, one line per method).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from relkd.experiment.rundir import RunDir
from relkd.graphs.agreement import AGREEMENT_KEYS
from relkd.viz._common import METRIC_NAMES, colour_map
from relkd.viz.curves import numeric_keys, training_curves
from relkd.viz.save import save_figure

__all__ = ["CURVE_KEYS", "plot_run", "read_histories", "staged"]

# Training-curve panels: these keys (also as a network's prefixed key, "peer1/test_acc1"), then
# every loss term; learning rate, timings and best-so-far are left out.
CURVE_KEYS = ("test_acc1", "train_acc1", "train_loss")
CURVE_TITLES = {
    "test_acc1": "test top-1 (%)",
    "train_acc1": "train top-1, labelled images (%)",
    "train_loss": "training loss (weighted total)",
    **METRIC_NAMES,
}


def read_histories(run_dir: str | Path | RunDir) -> dict[str, list[list[dict[str, Any]]]]:
    """``{network: [rows of each seed]}``: the teachers first, then the methods in the order of the
    run's ``config.yaml`` (others alphabetically), seeds in numeric order."""
    return (run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)).histories()


def _rows(histories: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]) -> Iterator[Mapping[str, Any]]:
    return (row for seeds in histories.values() for rows in seeds for row in rows)


def staged(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One run's rows with the epochs counted from its last stage (earlier stages at epochs <= 0) and
    the loss terms of earlier stages renamed ``loss/<term> [<stage>]``, so that a pre-training loss and
    the distillation loss of the same term are two curves, and every method's main stage starts at 1."""
    if not rows:
        return []
    last = rows[-1].get("stage")
    first_of_last = min((r["epoch"] for r in rows if r.get("stage") == last and "epoch" in r), default=1)
    out = []
    for row in rows:
        row = dict(row)
        if "epoch" in row:
            row["epoch"] = row["epoch"] - (first_of_last - 1)
        stage = row.get("stage")
        if stage != last:
            for key in [k for k in row if k.startswith("loss/") or k == "train_loss"]:
                row[f"{key} [{stage}]"] = row.pop(key)
        out.append(row)
    return out


def _curve_keys(histories: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]) -> list[str]:
    """Accuracies, the total loss and every (weighted) loss term logged, in that order."""
    found = numeric_keys(_rows(histories))

    def base(key: str) -> str:
        return key.split(" [")[0].rsplit("/", 1)[-1]

    def rank(key: str) -> int:
        return CURVE_KEYS.index(base(key)) if base(key) in CURVE_KEYS else len(CURVE_KEYS)

    keys = [k for k in found if k.startswith("loss/") or base(k) in CURVE_KEYS]
    return sorted(keys, key=lambda k: (rank(k), found.index(k)))


def _title(key: str) -> str:
    """``"loss/kd"`` -> ``"kd (weighted term)"``, ``"peer1/test_acc1"`` -> ``"peer1: test top-1 (%)"``,
    ``"loss/mhgd [heads]"`` -> ``"mhgd (weighted term), heads stage"``."""
    key, _, stage = key.partition(" [")
    where = f", {stage.rstrip(']')} stage" if stage else ""
    if key.startswith("loss/"):
        return f"{key.removeprefix('loss/')} (weighted term, log scale){where}"
    network, _, base = key.rpartition("/")
    title = CURVE_TITLES.get(base, base) + (", log scale" if base == "train_loss" else "")
    return (f"{network}: {title}" if network else title) + where


def _label_panels(
    figure: Figure, keys: Sequence[str], boundary: bool, histories: Mapping[str, Any] | None = None
) -> None:
    """Readable panel titles, whole epochs on the x axes, one epoch range for every panel."""
    epochs = [r["epoch"] for r in _rows(histories or {}) if isinstance(r.get("epoch"), (int, float))]
    for ax, key in zip(figure.axes, keys, strict=False):
        ax.set_title(_title(key), fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        if boundary:
            ax.set_xlabel("epoch of the main stage (earlier stages at <= 0)")


def plot_run(
    run_dir: str | Path | RunDir,
    *,
    formats: Sequence[str] = ("png",),
    band: str = "minmax",
    dpi: int | None = None,
    out: str | Path | None = None,
) -> list[Path]:
    """Training curves of every method of a run (and agreement curves, when logged); print and
    return the paths written to ``run_dir/plots/``.

    Every method keeps one colour in both figures. Losses are drawn on a log scale (methods' totals
    differ by orders of magnitude) and are the weighted terms, the parts of the total. A method with
    stages before its main one (head pre-training ...) has those at epochs <= 0, left of a dotted line,
    and their loss terms as curves of their own.

    Args:
        run_dir: a directory written by ``relkd run``.
        formats: figure formats (``png``, ``svg``, ``pdf``).
        band: spread over seeds drawn around the mean: ``minmax`` or ``std`` (see
            :func:`relkd.viz.training_curves`).
        dpi: PNG resolution.
        out: output folder (default ``run_dir/plots``).

    Raises:
        FileNotFoundError: no run directory, or no ``metrics.jsonl`` in it.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run.require()
    histories = {name: [staged(rows) for rows in seeds] for name, seeds in run.histories().items()}
    if not histories:
        raise FileNotFoundError(
            f"{run.path} holds no metrics.jsonl (teacher/ or <method>/seed<k>/): `{run.hint}` trains and "
            "logs them"
        )
    out = run.plots if out is None else Path(out)
    colours = colour_map(list(histories))
    boundary = 0.5 if any(r.get("epoch", 1) <= 0 for r in _rows(histories)) else None
    written: list[Path] = []
    keys = _curve_keys(histories)
    log_keys = [k for k in keys if k.startswith(("loss/", "train_loss"))]
    figure = training_curves(
        histories, keys, band=band, max_panels=max(len(keys), 1), colours=colours, log_keys=log_keys,
        boundary=boundary,
    )  # fmt: skip
    _label_panels(figure, keys, boundary is not None, histories)
    _emit(written, save_figure(figure, out / "training_curves", formats, dpi))

    students = {name: seeds for name, seeds in histories.items() if not name.startswith("teacher")}
    logged = numeric_keys(_rows(students))
    agreement_keys = [key for key in AGREEMENT_KEYS if key in logged]
    if agreement_keys:
        figure = training_curves(students, agreement_keys, band=band, colours=colours, boundary=boundary)
        _label_panels(figure, agreement_keys, boundary is not None, students)
        figure.suptitle(f"student–teacher agreement on the probe batch; {figure.get_suptitle()}")
        _emit(written, save_figure(figure, out / "agreement_curves", formats, dpi))
    return written


def _emit(paths: list[Path], new: Sequence[Path]) -> None:
    for path in new:
        print(path)
        paths.append(path)
