"""What a new user runs into in the first hour, each case with the behaviour and the message asserted:
nothing lost or mixed in a run directory, sanity stops, one-line errors found before anything trains,
a quiet and quick command line."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from relkd.cli import main

torch.set_num_threads(1)

TINY = [
    "data.train_subset=40", "data.batch_size=16", "data.transfer_batch_size=128",
    "teacher.model=mlp", "teacher.args={width: 32, depth: 1}", "teacher.data.batch_size=64",
    "student.model=mlp", "student.args={width: 16, depth: 1}", "train.epochs=1", "teacher.train.epochs=2",
    "seeds=[0]", "tensorboard=false", "probe_size=32", "--quiet",
]  # fmt: skip


def relkd(capsys, *args: str) -> tuple[int, str]:
    """Exit status and what went to stderr."""
    capsys.readouterr()
    status = main(["--log-level", "WARNING", *args])
    return status, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run of kd and rkd (teacher included), copied by the tests that change it."""
    out = tmp_path_factory.mktemp("first_hour") / "run"
    assert main(["--log-level", "WARNING", "run", "methods=[kd, rkd]", f"out={out}", *TINY]) == 0
    return out


def copy_run(finished: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(finished, tmp_path / "run"))


# --- nothing lost, nothing mixed -----------------------------------------------------------------------


def test_a_changed_config_into_an_old_run_is_refused_and_nothing_is_touched(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    status, err = relkd(capsys, "run", "methods=[kd]", f"out={run}", *TINY, "train.epochs=2")
    assert status == 2
    assert "holds runs of another configuration" in err and "train.epochs: 1" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_a_subset_of_the_methods_reuses_and_keeps_the_others_in_config_and_table(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    status, err = relkd(capsys, "run", "methods=[kd, baseline]", f"out={run}", *TINY)
    assert status == 0, err
    import yaml

    methods = list(yaml.safe_load((run / "config.yaml").read_text())["methods"])
    assert methods == ["kd", "rkd", "baseline"]
    rows = [line.split(" | ")[0].strip("| ") for line in (run / "results.md").read_text().splitlines()]
    assert {"teacher", "kd", "rkd", "baseline"} <= set(rows)


def test_a_directory_from_before_a_new_config_key_is_still_reused(finished, tmp_path, capsys):
    """A key added to relkd later (here: every key at its default removed from config.yaml, as an
    older relkd wrote it) is no difference: the runs are reused, not refused nor retrained."""
    import yaml

    run = copy_run(finished, tmp_path)

    def strip(node):
        if isinstance(node, dict):
            return {
                k: strip(v) for k, v in node.items() if k not in ("init", "init_skip", "compile", "sync_bn")
            }
        return node

    (run / "config.yaml").write_text(yaml.safe_dump(strip(yaml.safe_load((run / "config.yaml").read_text()))))
    finals = {p: p.stat().st_mtime_ns for p in run.rglob("final.pt")}
    status, err = relkd(capsys, "run", "methods=[kd, rkd]", f"out={run}", *TINY)
    assert status == 0, err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("final.pt")} == finals


def test_a_run_hash_ignores_fields_at_their_default():
    from dataclasses import dataclass, field

    from relkd.experiment.setup import config_hash

    @dataclass
    class Old:
        lr: float = 0.1
        layers: list = field(default_factory=lambda: [1, 2])

    @dataclass
    class New(Old):
        added: str | None = None

    assert config_hash(Old(), 3) == config_hash(New(), 3)
    assert config_hash(Old(lr=0.2), 3) == config_hash(New(lr=0.2), 3) != config_hash(New(), 3)
    assert config_hash(New(added="x")) != config_hash(New())
    assert config_hash(New(layers=[1])) != config_hash(New())


def test_overwrite_starts_over(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    status, _ = relkd(
        capsys, "run", "methods=[baseline]", f"out={run}", *TINY, "train.epochs=2", "--overwrite"
    )
    assert status == 0
    assert not (run / "kd").exists() and (run / "baseline" / "seed0" / "final.pt").is_file()


def test_an_interrupted_run_needs_resume(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    (run / "kd" / "seed0" / "final.pt").unlink()  # as a kill after the first checkpoint leaves it
    (run / "kd" / "seed0" / "result.json").unlink()
    status, err = relkd(capsys, "run", "methods=[kd, rkd]", f"out={run}", *TINY)
    assert status == 2 and "interrupted runs: kd seed 0 (epoch 1)" in err and "--resume" in err
    assert (run / "kd" / "seed0" / "checkpoint.pt").is_file()
    status, err = relkd(capsys, "run", "methods=[kd, rkd]", f"out={run}", *TINY, "--resume")
    assert status == 0, err


def test_a_corrupted_final_checkpoint_is_not_reused(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    (run / "kd" / "seed0" / "final.pt").write_bytes(b"\x00" * 64)
    status, err = relkd(capsys, "run", "methods=[kd, rkd]", f"out={run}", *TINY)
    assert status == 1 and "kd/seed0/final.pt: cannot read the checkpoint" in err
    assert f"delete {run / 'kd' / 'seed0'}" in err and err.count("\n") == 1


# --- sanity stops --------------------------------------------------------------------------------------


def test_a_teacher_at_chance_stops_the_suite(tmp_path, capsys):
    # one epoch of plain SGD with a learning rate of 1e-6 leaves the teacher where it started
    sgd = "teacher.train.optimizer={name: sgd, lr: 1.0e-6}"
    status, err = relkd(
        capsys, "run", "methods=[kd]", f"out={tmp_path / 'r'}", *TINY, "teacher.train.epochs=1", sgd
    )
    assert status == 1 and "no better than chance" in err and "check_teachers: false" in err
    assert not (tmp_path / "r" / "kd").exists()


def test_nan_inputs_are_named_as_the_cause(tmp_path):
    from relkd.config import load_config
    from relkd.train import Engine, NonFiniteLossError, TrainBatches, build_stages

    class Loader:
        def __init__(self, batches):
            self.batches = batches

        def set_epoch(self, e):
            pass

        def __len__(self):
            return len(self.batches)

        def __iter__(self):
            return iter(self.batches)

    x = torch.randn(4, 1, 2, 2)
    x[2, 0, 0, 0] = float("nan")
    batch = {"input": x, "target": torch.zeros(4, dtype=torch.long), "index": torch.tensor([7, 8, 9, 10])}
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    train = load_config({"student": {"model": "mlp"}, "teacher": None})[0].train
    engine = Engine({"student": student}, build_stages(None, train, {}), TrainBatches(Loader([batch])),
                    Loader([batch]), tmp_path, probe=torch.zeros(2, 1, 2, 2), tensorboard=False,
                    quiet=True, log_agreement=False)  # fmt: skip
    with pytest.raises(
        NonFiniteLossError, match=r"batch itself holds NaN or infinite inputs .*indices \[9\]"
    ):
        engine.fit()


# --- one-line errors before anything trains ---------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.optimizer.lr=-1", "methods.kd.train.optimizer: Invalid learning rate: -1"),
        ("methods.kd.losses.kd.taps=[layers.7]", "has no default tap or module 'layers.7'"),
        (
            "student.model=torchvision:resnt18",
            "unknown torchvision model 'torchvision:resnt18'. Did you mean",
        ),
        ("student.args.widht=3", "students.student.args.widht: unknown key. Did you mean 'width'?"),
    ],
)
def test_config_mistakes_fail_before_the_teacher_trains(tmp_path, capsys, override, message):
    status, err = relkd(capsys, "run", "methods=[kd]", f"out={tmp_path / 'r'}", *TINY, override)
    assert status == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "r" / "teacher").exists()


def test_crd_with_too_small_num_data_is_a_config_error(tmp_path, capsys):
    status, err = relkd(capsys, "run", "methods=[crd]", f"out={tmp_path / 'r'}", *TINY,
                        "methods.crd.losses.crd.num_data=100")  # fmt: skip
    assert status == 2 and "num_data: 100 is smaller than the training set (1347 images)" in err


def test_an_unwritable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    status, err = relkd(capsys, "run", "methods=[baseline]", f"out={blocker / 'run'}", *TINY)
    assert status == 1 and err.startswith("relkd: error: cannot write to the run directory") and "out=" in err


def test_table_plot_and_viz_on_an_unwritable_run_suggest_out(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    (run / "results.md").unlink()
    (run / "results.md").mkdir()  # a results.md that cannot be written
    status, err = relkd(capsys, "table", str(run))
    assert status == 1 and "pass --out DIR" in err and "--no-write" in err and err.count("\n") == 1
    status, err = relkd(capsys, "table", str(run), "--out", str(tmp_path / "tables"))
    assert status == 0 and (tmp_path / "tables" / "results.md").is_file()
    (run / "plots").write_text("")  # a file where the folder would go
    status, err = relkd(capsys, "plot", str(run))
    assert status == 1 and "pass --out DIR" in err
    status, _ = relkd(capsys, "plot", str(run), "--out", str(tmp_path / "plots"))
    assert status == 0 and (tmp_path / "plots" / "training_curves.png").is_file()


# --- quiet and quick --------------------------------------------------------------------------------


def test_help_does_not_import_torch_and_importing_the_losses_prints_nothing():
    code = (
        "import sys; from relkd.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
    )
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("False")
    command = [sys.executable, "-W", "default", "-c", "import relkd.losses"]
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_the_frozen_heads_warning_names_every_loss():
    import relkd.losses as L

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            loss = L.build("mhgd", teacher_channels=[4, 6, 8])
            s = [torch.randn(6, c, 3, 3) for c in (4, 6, 8)]
            loss(s, [x.clone() for x in s])
    assert sum("not frozen" in str(w.message) for w in caught) == 2


def test_metrics_of_the_finished_run_are_readable(finished):
    rows = [
        json.loads(line) for line in (finished / "kd" / "seed0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows and "loss/kd" in rows[0] and "raw/kd" in rows[0]
