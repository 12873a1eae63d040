"""The ``relkd`` command end to end on a tiny digits suite: run, reuse, table, list, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from relkd.cli import main

ROOT = Path(__file__).resolve().parents[1]

TINY = """
name: tiny
data: {name: digits, train_subset: 30, unlabeled: true, batch_size: 16, transfer_batch_size: 256}
teacher:
  model: mlp
  args: {width: 32, depth: 1}
  data: {train_subset: null, unlabeled: false, batch_size: 128}
student: {model: mlp, args: {width: 16, depth: 1}}
train: {epochs: 1, optimizer: {name: adamw, lr: 0.003}}
methods: [baseline, kd]
seeds: [0, 1]
probe_size: 32
tensorboard: false
threads: 1
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_run_then_reuse_then_table(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(config_file), f"out={out}", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| kd | 2 |" in printed and "| teacher | 1 |" in printed
    for method in ("baseline", "kd"):
        for seed in (0, 1):
            assert json.loads((out / method / f"seed{seed}" / "result.json").read_text())["seed"] == seed
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert list(resolved["methods"]) == ["baseline", "kd"]

    # options may come before the overrides; finished runs are reused, not retrained
    assert main(["run", str(config_file), "--quiet", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing") == 5

    assert main(["table", str(out)]) == 0
    table = capsys.readouterr().out
    assert table == (out / "results.md").read_text()
    assert (out / "results.csv").is_file()

    # the figures command reads the same layout
    assert main(["plot", str(out)]) == 0
    assert (out / "plots" / "training_curves.png").is_file()


def test_config_error_is_one_line_and_status_2(config_file, capsys):
    assert main(["run", str(config_file), "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "train.epoch: unknown key" in err and "'epochs'" in err


def test_unknown_argument_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["table", "a", "b=1"])


def test_list_shows_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("models:", "resnet8x4", "torchvision:<name>", "losses:", "rkd", "datasets:", "digits",
                 "methods:", "baseline"):  # fmt: skip
        assert word in out
    assert main(["list", "losses"]) == 0
    assert "models:" not in capsys.readouterr().out


def test_table_of_a_missing_run_is_an_error(tmp_path, capsys):
    assert main(["table", str(tmp_path)]) == 1
    assert "no result.json" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_relkd_runs_a_suite(config_file, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "relkd", "run", str(config_file), f"out={out}", "seeds=[0]", "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "| kd | 1 |" in done.stdout and (out / "results.md").is_file()
