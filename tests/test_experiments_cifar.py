"""The CIFAR-100 benchmark configs: all load with the standard recipe, and one runs a few steps on a
handful of images written in the official python-pickle layout."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from relkd.cli import main
from relkd.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "experiments" / "cifar100"
PAIRS = {
    "resnet32x4": "resnet8x4",
    "wrn_40_2": "wrn_16_2",
    "resnet56": "resnet20",
    "resnet110": "resnet32",
    "vgg13": "vgg8",
}
SMALL_LR_STUDENTS = ("mobilenetv2", "shufflenetv1", "shufflenetv2")


def write_cifar100(root: Path, n_train: int = 24, n_test: int = 12) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": [int(k) for k in rng.integers(0, 100, n)],
            b"coarse_labels": [0] * n,
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{k}".encode() for k in range(100)]}, f)


def test_every_benchmark_pair_has_a_config_with_the_standard_recipe():
    configs = {}
    for path in sorted(CIFAR.glob("*_*.yaml")):
        config, _ = load_config(path)
        configs[(config.teacher.model, config.student.model)] = config
    assert set(PAIRS.items()) <= set(configs)
    assert {s for _, s in configs} >= set(SMALL_LR_STUDENTS)
    for (_, student), config in configs.items():
        train = config.methods["baseline"].train
        assert config.data.name == "cifar100" and config.data.batch_size == 64
        assert train.epochs == 240 and train.schedule == {
            "name": "multistep", "milestones": [150, 180, 210], "gamma": 0.1
        }  # fmt: skip
        expected_lr = 0.01 if student in SMALL_LR_STUDENTS else 0.05
        assert train.optimizer == {"name": "sgd", "lr": expected_lr, "momentum": 0.9, "weight_decay": 5e-4}
        assert config.teacher.train.optimizer["lr"] == 0.05


@pytest.mark.slow
def test_a_cifar100_pair_runs_a_few_steps(tmp_path, capsys):
    write_cifar100(tmp_path / "data")
    out = tmp_path / "run"
    status = main([
        "run", str(CIFAR / "resnet56_resnet20.yaml"), f"data.root={tmp_path / 'data'}", f"out={out}",
        "seeds=[0]", "methods=[kd, crd]", "train.epochs=1", "teacher.train.epochs=1", "data.batch_size=8",
        "data.test_batch_size=12", "probe_size=8", "tensorboard=false", "threads=1",
        "loss_args={crd: {num_negatives: 16}}", "--quiet",
        # one epoch on a few random images: the teacher is at chance, which the pipeline may not refuse here
        "check_teachers=false",
    ])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    result = json.loads((out / "crd" / "seed0" / "result.json").read_text())
    assert result["epochs"] == 1 and 0.0 <= result["last_acc1"] <= 100.0
    assert (out / "teacher" / "final.pt").is_file() and (out / "results.md").is_file()
