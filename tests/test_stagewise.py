"""Data-efficient stagewise KD (Kulkarni et al.): after stage k only the student's stage k (and its
regressor) changed, its loss is the mean squared error of the hooked outputs, and the classifier
stage runs without the teacher."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from relkd import configs
from relkd.config import load_config
from relkd.experiment import RunDir, run_method, run_teacher

torch.set_num_threads(1)

SUITE = {
    "name": "stagewise",
    "data": {
        "name": "digits",
        "train_subset": 40,
        "unlabeled": True,
        "batch_size": 16,
        "transfer_batch_size": 128,
    },
    "teacher": {"model": "lenet", "args": {"width": 8}, "data": {"train_subset": None, "unlabeled": False}},
    "student": {"model": "lenet", "args": {"width": 4}},
    "train": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 0.003}},
    "methods": ["stagewise"],
    "seeds": [0],
    "tensorboard": False,
    "log_agreement": False,
    "check_teachers": False,
}

PARTS = {  # LeNet's parameters by the stage that trains them
    "stage1": ("stage1.",),
    "stage2": ("stage2.",),
    "stage3": ("stage3.",),
    "classifier": ("hidden.", "fc."),
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    cfg = load_config(SUITE, ["teacher.train.epochs=1"])[0]
    return run_teacher(cfg, RunDir(tmp_path_factory.mktemp("t")), quiet=True, echo=lambda s: None)


def _states_after_each_stage(tmp_path, teacher):
    states = []
    names = [s["name"] for s in yaml.safe_load(configs.method_path("stagewise").read_text())["stages"]]
    for k in range(len(names) + 1):
        # the first k stages of one epoch each, the others of none
        epochs = [f"methods.stagewise.stages.{i}.epochs={1 if i < k else 0}" for i in range(len(names))]
        cfg = load_config(SUITE, epochs)[0]
        run_method(
            cfg, "stagewise", 0, {"teacher": teacher}, RunDir(tmp_path / str(k)), quiet=True, echo=print
        )
        final = torch.load(tmp_path / str(k) / "stagewise/seed0/final.pt", weights_only=True)
        states.append(final["students"]["student"])
    return names, states


def test_each_stage_changes_only_its_own_part(tmp_path, teacher):
    names, states = _states_after_each_stage(tmp_path, teacher)
    for k, name in enumerate(names):
        before, after = states[k], states[k + 1]
        changed = {key for key in before if not torch.equal(before[key], after[key])}
        own = {key for key in before if key.startswith(PARTS[name])}
        assert changed and changed <= own, (name, sorted(changed - own))


def test_the_stage_loss_is_the_mse_of_the_hooked_outputs():
    import relkd.losses as L

    loss = L.build("fitnet", student_shape=(4, 4, 4), teacher_shape=(4, 4, 4), regressor="none")
    s, t = torch.randn(3, 4, 4, 4, dtype=torch.float64), torch.randn(3, 4, 4, 4, dtype=torch.float64)
    expected = (
        sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), t.flatten().tolist(), strict=True)) / s.numel()
    )
    assert float(loss(s, t)) == pytest.approx(expected, rel=1e-12)


def test_the_classifier_stage_runs_without_the_teacher(tmp_path, teacher):
    cfg = load_config(SUITE, [f"methods.stagewise.stages.{i}.epochs=0" for i in range(3)])[0]
    calls = []
    tracked = copy.deepcopy(teacher)
    tracked.register_forward_hook(lambda m, i, o: calls.append(1))
    run_method(cfg, "stagewise", 0, {"teacher": tracked}, RunDir(tmp_path), quiet=True, echo=print)
    rows = RunDir(tmp_path).run("stagewise", 0).read_metrics()
    assert [r["stage"] for r in rows] == ["classifier"] and "loss/ce" in rows[0]
    # the teacher ran only for the probe batch that sizes the losses, never in a training step
    assert len(calls) == 1
