"""``relkd plot``'s reading of a run: stages on one epoch axis, their losses apart, one colour per method
in every figure, losses on a log scale."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.colors as mcolors

from relkd.experiment.plot import _title, plot_run, staged
from relkd.viz import training_curves
from relkd.viz._common import colour_map


def test_earlier_stages_come_before_epoch_one_with_their_own_loss_keys():
    rows = [
        {"epoch": 1, "stage": "heads", "train_loss": 2.0, "loss/mhgd": 2.0},
        {"epoch": 2, "stage": "heads", "train_loss": 1.5, "loss/mhgd": 1.5},
        {
            "epoch": 3,
            "stage": "distill",
            "train_loss": 9.0,
            "loss/mhgd": 8.0,
            "loss/ce": 1.0,
            "test_acc1": 50.0,
        },
    ]
    out = staged(rows)
    assert [r["epoch"] for r in out] == [-1, 0, 1]
    assert out[0]["loss/mhgd [heads]"] == 2.0 and "loss/mhgd" not in out[0]
    assert out[2]["loss/mhgd"] == 8.0 and out[2]["test_acc1"] == 50.0
    assert staged([{"epoch": 1, "stage": "train", "loss/kd": 1.0}]) == [
        {"epoch": 1, "stage": "train", "loss/kd": 1.0}
    ]


def test_panel_titles_say_weighted_and_the_stage():
    assert _title("loss/kd") == "kd (weighted term, log scale)"
    assert _title("loss/mhgd [heads]") == "mhgd (weighted term, log scale), heads stage"
    assert _title("peer1/test_acc1") == "peer1: test top-1 (%)"


def test_a_method_keeps_its_colour_in_every_figure():
    colours = colour_map(["teacher", "baseline", "kd"])
    runs = {"baseline": [[{"epoch": 1, "loss/ce": 1.0}]], "kd": [[{"epoch": 1, "loss/ce": 2.0}]]}
    fig = training_curves(runs, ["loss/ce"], colours=colours, log_keys=["loss/ce"])
    drawn = {mcolors.to_hex(line.get_color()) for line in fig.axes[0].get_lines()}
    assert drawn == {mcolors.to_hex(colours["baseline"]), mcolors.to_hex(colours["kd"])}
    assert fig.axes[0].get_yscale() == "log"


def _write(run: Path, method: str, rows: list[dict]) -> None:
    folder = run / method / "seed0"
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_run_draws_the_stage_boundary_and_colours_agreement_like_training(tmp_path, capsys):
    _write(tmp_path, "kd", [{"epoch": 1, "stage": "train", "train_loss": 1.0, "test_acc1": 60.0, "cka": 0.5}])
    _write(tmp_path, "mhgd", [
        {"epoch": 1, "stage": "heads", "train_loss": 2.0, "test_acc1": 10.0},
        {"epoch": 2, "stage": "distill", "train_loss": 800.0, "test_acc1": 70.0, "cka": 0.6},
    ])  # fmt: skip
    from relkd.experiment import plot as plot_module

    figures = []
    real = plot_module.save_figure
    plot_module.save_figure = lambda fig, path, formats, dpi: (
        figures.append(fig) or real(fig, path, formats, dpi)
    )
    try:
        plot_run(tmp_path)
    finally:
        plot_module.save_figure = real
    training, agreement = figures
    ax = training.axes[0]
    assert any(line.get_linestyle() == ":" and line.get_xdata()[0] == 0.5 for line in ax.get_lines())

    def colour_of(fig, method_index):
        legend = fig.legends[0]
        return {
            t.get_text().split(" (")[0]: mcolors.to_hex(h.get_color())
            for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)
        }

    assert colour_of(training, 0)["mhgd"] == colour_of(agreement, 0)["mhgd"]
