"""Recipe features of the engine, each against what it must do: teacher checkpoints in other code bases'
layouts, warm-up and schedules, frozen modules, gradient-norm clipping, the fp16 gradient scaler, and
the transfer set's size and seed."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from relkd.config import load_config
from relkd.experiment import RunDir, run_method, run_teacher
from relkd.experiment.setup import build_model, load_bundle, load_weights
from relkd.methods import parse_terms
from relkd.optim import build_optimizer, build_schedule
from relkd.train import Engine, TrainBatches, build_stages
from relkd.train.checkpoint import CheckpointError

torch.set_num_threads(1)

BASE = {
    "name": "recipes",
    "data": {"name": "digits", "train_subset": 40, "unlabeled": True, "batch_size": 16,
             "transfer_batch_size": 128, "test_batch_size": 256},
    "teacher": {"model": "mlp", "args": {"width": 32, "depth": 1},
                "data": {"train_subset": None, "unlabeled": False, "batch_size": 64}},
    "student": {"model": "mlp", "args": {"width": 16, "depth": 2}},
    "train": {"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
    "methods": {"baseline": {}},
    "seeds": [0],
    "probe_size": 64,
    "tensorboard": False,
    "log_agreement": False,
}  # fmt: skip


def config(*overrides: str, **changes):
    return load_config({**BASE, **changes}, list(overrides))[0]


def quiet(message: str) -> None:
    pass


# --- a teacher from a checkpoint file -----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory) -> tuple[nn.Module, Path]:
    run = RunDir(tmp_path_factory.mktemp("teacher"))
    teacher = run_teacher(config("teacher.train.epochs=1"), run, quiet=True, echo=quiet)
    return teacher, run.teacher().final


@pytest.mark.parametrize("layout", ["relkd", "plain", "model", "state_dict", "module_prefix"])
def test_teacher_checkpoint_in_every_layout_loads_the_same_weights(tmp_path, trained_teacher, layout):
    teacher, final = trained_teacher
    state = teacher.state_dict()
    path = tmp_path / "t.pth"
    if layout == "relkd":
        path = final
    elif layout == "plain":
        torch.save(state, path)
    elif layout == "model":
        torch.save({"model": state, "epoch": 240}, path)  # RepDistiller's save_dict
    elif layout == "state_dict":
        torch.save({"state_dict": state, "best_acc": 0.9}, path)
    else:  # saved from a DataParallel / DistributedDataParallel wrapper
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    cfg = config(f"teacher.checkpoint={path}")
    loaded = run_teacher(cfg, RunDir(tmp_path / "run"), quiet=True, echo=quiet)
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key].cpu(), value.cpu()), key
    result = RunDir(tmp_path / "run").teacher().read_result()
    assert result["checkpoint"] == str(path) and 0 <= result["last_acc1"] <= 100


def test_teacher_checkpoint_that_does_not_fit_names_the_keys(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save({"model": nn.Linear(3, 2).state_dict()}, path)
    model = build_model(config().teacher, load_bundle(config().teacher.data, 0))
    with pytest.raises(CheckpointError, match=r"wrong.pt.*missing keys: .*layers\.0\.0\.weight"):
        load_weights(str(path), model, "teacher")


# --- warm-up and schedules -------------------------------------------------------------------------


def _lrs(spec, epochs, warmup, lr=0.1):
    opt = build_optimizer([nn.Parameter(torch.zeros(1))], {"name": "sgd", "lr": lr})
    schedule = build_schedule(opt, spec, epochs, warmup)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        schedule.step()
    return out


def test_linear_warmup_then_cosine_over_the_remaining_epochs():
    lrs = _lrs({"name": "cosine"}, epochs=6, warmup=2)
    # LinearLR from 1% to 100% over 2 epochs: 0.001, then 0.001 + (0.1 - 0.001) / 2
    assert lrs[0] == pytest.approx(0.001) and lrs[1] == pytest.approx(0.0505)
    # then cosine over the 4 remaining epochs from 0.1 to 0
    expected = [0.05 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    assert lrs[2:] == pytest.approx(expected)


def test_multistep_milestones_count_after_the_warmup():
    lrs = _lrs({"name": "multistep", "milestones": [2, 3], "gamma": 0.1}, epochs=6, warmup=1)
    assert lrs == pytest.approx([0.001, 0.1, 0.1, 0.01, 0.001, 0.001])


def test_the_engine_steps_the_schedule_once_per_epoch(tmp_path, trained_teacher):
    cfg = config("train.epochs=4", "train.warmup_epochs=1", "train.schedule={name: step, step_size: 2}")
    run_method(cfg, "baseline", 0, {"teacher": trained_teacher[0]}, RunDir(tmp_path), quiet=True, echo=quiet)
    rows = RunDir(tmp_path).run("baseline", 0).read_metrics()
    assert [r["lr"] for r in rows] == pytest.approx([0.0005, 0.05, 0.05, 0.005])


# --- frozen modules, clipping, the scaler -------------------------------------------------------------


def _engine(tmp_path, stage_changes=None, **train_changes):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    x = 10 * torch.randn(8, 1, 2, 2, generator=g)
    data = [{"input": x, "target": torch.randint(0, 3, (8,), generator=g), "index": torch.arange(8)}]
    train = config(*(f"train.{k}={v}" for k, v in train_changes.items())).train
    stages = build_stages([stage_changes] if stage_changes else None, train, {})
    loader = _ListLoader(data)
    engine = Engine(
        {"student": student}, stages, TrainBatches(loader), loader, tmp_path, probe=data[0]["input"],
        tensorboard=False, quiet=True, log_agreement=False,
    )  # fmt: skip
    return engine, student, data[0]


class _ListLoader:
    def __init__(self, batches):
        self.batches = batches

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def test_a_frozen_module_keeps_its_weights_and_its_batch_statistics(tmp_path):
    from relkd.config import StageConfig

    stage = StageConfig(name="s", frozen=["student.1", "student.2"])
    engine, student, _ = _engine(tmp_path, stage)
    before = copy.deepcopy(student.state_dict())
    engine.fit()
    after = student.state_dict()
    for key in ("1.weight", "1.bias", "2.weight", "2.bias", "2.running_mean", "2.running_var"):
        assert torch.equal(before[key], after[key]), key  # no update, and BN in eval mode: no new stats
    assert not torch.equal(before["4.weight"], after["4.weight"])
    assert all(p.requires_grad for p in student.parameters())  # flags restored after the stage


def test_clip_grad_norm_bounds_the_update_of_plain_sgd(tmp_path):
    clip = 1e-3
    sgd = "{name: sgd, lr: 1.0, momentum: 0.0, weight_decay: 0.0}"
    engine, student, batch = _engine(tmp_path, None, epochs=1, clip_grad_norm=clip, optimizer=sgd)
    before = [p.detach().clone() for p in student.parameters()]
    engine.fit()
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(student.parameters(), before, strict=True)])
    # lr 1 and one step: the update is minus the clipped gradient, whose total norm is the clip value
    assert float(step.norm()) == pytest.approx(clip, rel=1e-4)


def test_a_scaled_backward_gives_the_unscaled_update(tmp_path):
    reference, student_ref, _ = _engine(tmp_path / "a", None, epochs=1, clip_grad_norm=0.5)
    reference.fit()
    scaled, student, _ = _engine(tmp_path / "b", None, epochs=1, clip_grad_norm=0.5)
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)  # what fp16 training uses on CUDA
    scaled.fit()
    for a, b in zip(student_ref.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert scaled.scaler.get_scale() == 2.0**12  # no inf/NaN: the scale stays (growth after 2000 steps)


def test_fp16_on_the_cpu_warns_and_trains_in_float32(tmp_path):
    with pytest.warns(UserWarning, match="amp='fp16' needs a CUDA device"):
        engine, _, _ = _engine_with_amp(tmp_path)
    assert not engine.scaler.is_enabled()


def _engine_with_amp(tmp_path):
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    data = [
        {
            "input": torch.randn(4, 1, 2, 2),
            "target": torch.zeros(4, dtype=torch.long),
            "index": torch.arange(4),
        }
    ]
    loader = _ListLoader(data)
    stages = build_stages(None, config().train, {})
    engine = Engine(
        {"student": student}, stages, TrainBatches(loader), loader, tmp_path, probe=data[0]["input"],
        amp="fp16", tensorboard=False, quiet=True, log_agreement=False,
    )  # fmt: skip
    return engine, student, data


# --- the transfer set's size and seed -----------------------------------------------------------------


def test_transfer_size_keeps_that_many_transfer_images_chosen_by_subset_seed():
    data = config("data.transfer_size=300", "data.subset_seed=7").data
    a, b = load_bundle(data, 0), load_bundle(data, 5)
    assert len(a.transfer) == len(b.transfer) == 300
    # the run seed does not change the choice when subset_seed is set; the labelled subset neither
    assert torch.equal(a.transfer.indices, b.transfer.indices)
    assert torch.equal(a.train.indices, b.train.indices)
    other = load_bundle(config("data.transfer_size=300", "data.subset_seed=8").data, 0)
    assert not torch.equal(a.transfer.indices, other.transfer.indices)
    # transfer images are outside the labelled subset and hide their labels
    assert not set(a.transfer.indices.tolist()) & set(a.train.indices.tolist())
    assert torch.all(a.transfer.targets == -1)


def test_without_subset_seed_the_run_seed_chooses():
    data = config("data.transfer_size=300").data
    assert not torch.equal(load_bundle(data, 0).train.indices, load_bundle(data, 1).train.indices)


def test_terms_parse_against_the_networks_of_the_method():
    specs = parse_terms({"kd": {"weight": 0.5}}, ["student"], ["teacher"])
    assert (specs["kd"].student, specs["kd"].teacher, specs["kd"].weight) == ("student", "teacher", 0.5)


# --- a student started from a checkpoint ------------------------------------------------------------


def test_a_student_starts_from_a_checkpoint_except_the_skipped_parts(tmp_path, trained_teacher):
    teacher, final = trained_teacher
    student = {"model": "mlp", "args": {"width": 32, "depth": 1}, "init": str(final), "init_skip": ["fc"]}
    cfg = config("train.epochs=0", methods={"baseline": {"students": {"student": student}}})
    run_method(cfg, "baseline", 0, {"teacher": teacher}, RunDir(tmp_path), quiet=True, echo=quiet)
    started = torch.load(RunDir(tmp_path).run("baseline", 0).final, weights_only=True)["students"]["student"]
    for key, value in teacher.state_dict().items():
        if key.startswith("fc."):
            assert not torch.equal(started[key], value.cpu()), key  # a fresh classifier
        else:
            assert torch.equal(started[key], value.cpu()), key


def test_a_checkpoint_of_another_architecture_names_the_missing_weights(tmp_path, trained_teacher):
    _, final = trained_teacher
    cfg = config(f"student.init={final}", "student.args={width: 16, depth: 2}")
    with pytest.raises(CheckpointError, match=r"no weights for layers\.1\.0\.bias.*init_skip"):
        build_model(cfg.student, load_bundle(cfg.data, 0))
