"""Results tables: mean ± sample std over seeds, recomputed here from the result files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import yaml

from relkd.experiment.results import collect, summarize, write_table

RESULTS = {
    "baseline": [(0, 80.0, 81.0, 97.0), (1, 82.5, 83.0, 98.0), (2, 79.5, 82.0, 96.5)],
    "kd": [(0, 90.25, 91.0, 99.0), (1, 88.0, 90.5, 99.5)],
    "rkd": [(0, 85.0, 86.0, 98.0)],
}


@pytest.fixture
def run_dir(tmp_path):
    for method, runs in RESULTS.items():
        for seed, last, best, last5 in runs:
            out = tmp_path / method / f"seed{seed}"
            out.mkdir(parents=True)
            result = {"seed": seed, "last_acc1": last, "best_acc1": best, "last_acc5": last5}
            (out / "result.json").write_text(json.dumps(result))
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "result.json").write_text(
        json.dumps({"method": "teacher", "seed": 0, "last_acc1": 95.0, "best_acc1": 95.5, "last_acc5": 99.9})
    )
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({"methods": {"rkd": {}, "baseline": {}, "kd": {}}}, sort_keys=False)
    )
    return tmp_path


def _cell(values):
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {float(np.std(values, ddof=1)):.2f}"


def test_markdown_rows_hold_mean_and_sample_std(run_dir):
    text = write_table(run_dir)
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert "last epoch" in lines[0] and "best epoch" in lines[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[1:]}
    for method, runs in RESULTS.items():
        last = [r[1] for r in runs]
        best = [r[2] for r in runs]
        last5 = [r[3] for r in runs]
        expected = f"| {method} | {len(runs)} | {_cell(last)} | {_cell(best)} | {_cell(last5)} |"
        assert rows[method] == expected
    assert rows["teacher"] == "| teacher | 1 | 95.00 | 95.50 | 99.90 |"
    assert "sample std" in text
    assert (run_dir / "results.md").read_text() == text


def test_methods_follow_the_config_order_teacher_first(run_dir):
    assert list(collect(run_dir)) == ["teacher", "rkd", "baseline", "kd"]


def test_csv_beside_the_table(run_dir):
    write_table(run_dir)
    with open(run_dir / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    kd = [r[1] for r in RESULTS["kd"]]
    assert float(rows["kd"]["last_acc1_mean"]) == pytest.approx(np.mean(kd), abs=1e-4)
    assert float(rows["kd"]["last_acc1_std"]) == pytest.approx(np.std(kd, ddof=1), abs=1e-4)
    assert rows["rkd"]["last_acc1_std"] == "" and rows["rkd"]["seeds"] == "1"


def test_summary_statistics():
    rows = summarize({"m": [{"seed": 1, "last_acc1": 2.0}, {"seed": 0, "last_acc1": 4.0}]})
    assert rows[0].seeds == [0, 1] and rows[0].last == [4.0, 2.0]
    assert rows[0].last_stats == (3.0, math.sqrt(2.0))


def test_empty_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no result.json"):
        write_table(tmp_path)
