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
from relkd.viz._common import METRIC_NAMES
from relkd.viz.curves import numeric_keys, training_curves
from relkd.viz.save import save_figure

__all__ = ["CURVE_KEYS", "plot_run", "read_histories"]

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


def _curve_keys(histories: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]) -> list[str]:
    """Accuracies, the total loss and every loss term logged, in that order."""
    found = numeric_keys(_rows(histories))

    def rank(key: str) -> int:
        base = key.rsplit("/", 1)[-1]
        return CURVE_KEYS.index(base) if base in CURVE_KEYS else len(CURVE_KEYS)

    keys = [k for k in found if k.startswith("loss/") or k.rsplit("/", 1)[-1] in CURVE_KEYS]
    return sorted(keys, key=lambda k: (rank(k), found.index(k)))


def _title(key: str) -> str:
    """``"loss/kd"`` -> ``"loss term: kd"``, ``"peer1/test_acc1"`` -> ``"peer1: test top-1 (%)"``."""
    if key.startswith("loss/"):
        return f"loss term: {key.removeprefix('loss/')}"
    network, _, base = key.rpartition("/")
    title = CURVE_TITLES.get(base, base)
    return f"{network}: {title}" if network else title


def _label_panels(figure: Figure, keys: Sequence[str]) -> None:
    """Readable panel titles, and whole epochs on the x axes."""
    for ax, key in zip(figure.axes, keys, strict=False):
        ax.set_title(_title(key))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


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
    histories = run.histories()
    if not histories:
        raise FileNotFoundError(
            f"{run.path} holds no metrics.jsonl (teacher/ or <method>/seed<k>/): `{run.hint}` trains and "
            "logs them"
        )
    out = run.plots if out is None else Path(out)
    written: list[Path] = []
    keys = _curve_keys(histories)
    figure = training_curves(histories, keys, band=band, max_panels=max(len(keys), 1))
    _label_panels(figure, keys)
    _emit(written, save_figure(figure, out / "training_curves", formats, dpi))

    students = {name: seeds for name, seeds in histories.items() if name != "teacher"}
    logged = numeric_keys(_rows(students))
    agreement_keys = [key for key in AGREEMENT_KEYS if key in logged]
    if agreement_keys:
        figure = training_curves(students, agreement_keys, band=band)
        _label_panels(figure, agreement_keys)
        figure.suptitle(f"student–teacher agreement on the probe batch; {figure.get_suptitle()}")
        _emit(written, save_figure(figure, out / "agreement_curves", formats, dpi))
    return written


def _emit(paths: list[Path], new: Sequence[Path]) -> None:
    for path in new:
        print(path)
        paths.append(path)
