"""A run on two processes is the run on one: whole runs, the augmentation, ``train.sync_bn``.

The end-to-end test runs one suite (a teacher with BatchNorm trained first, then RKD into a LeNet and
into a ResNet with BatchNorm) once in this process and once under ``torchrun`` with two gloo processes,
and requires the same table and the same final weights and BatchNorm statistics. The data sizes make
every kind of step happen: full batches split 8 + 8, last labelled batches that split evenly (2 = 1 + 1)
or not (11 images: replicated on both ranks), and a step that joins a replicated transfer tail (13)
with an evenly split labelled one.

Why a tolerance and not equality: both runs compute the same global-batch loss and update, but not in
the same floating-point order. DDP adds two half-batch gradients where one process sums the whole
batch, and a gathered batch lists each rank's labelled and transfer rows together where one process
lists all labelled rows first, so every step differs by float32 rounding (about 1e-7 of each value),
and SGD carries those differences on. Over this run's 40 steps they stay below 1e-5; 1e-4 is the bound.
A repeated image, a rank's own BatchNorm statistics or a gradient off by the factor W moves the weights
by 1e-3 or more. Runs much longer than this one, or unstable ones, can drift further: a ReLU or
max-pool kink turns a rounding difference into a different gradient (see the README's DDP section).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from relkd import distributed as D
from relkd.data import InMemoryDataset, make_loader
from relkd.data.augment import AugmentSpec
from relkd.train import parallel

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """\
name: ddp_invariance
data: {name: digits, train_subset: 50, unlabeled: true, transfer_size: 61, batch_size: 16,
       transfer_batch_size: 16, test_batch_size: 100}
teacher:
  model: small_resnet
  args: {width: 4}
  data: {train_subset: 75, unlabeled: false}
  train: {epochs: 2, optimizer: {name: sgd, lr: 0.05, momentum: 0.9}}
student: {model: lenet, args: {width: 4}}
train: {epochs: 3, optimizer: {name: sgd, lr: 0.02, momentum: 0.9}}
methods:
  rkd: {losses: {rkd: {distance_weight: 1.0, angle_weight: 2.0}}}
  rkd_bn:
    losses: {rkd: {distance_weight: 1.0, angle_weight: 2.0}}
    students: {student: {model: small_resnet, args: {width: 4}}}
seeds: [0]
threads: 1
log_agreement: false
tensorboard: false
"""
RUNS = {
    "teacher": ("teacher", "teacher"),
    "rkd": ("rkd/seed0", "student"),
    "rkd_bn": ("rkd_bn/seed0", "student"),
}
TOL = {"rtol": 1e-4, "atol": 1e-4}


# ------------------------------------------------------------------------------------ augmentation
@pytest.fixture(scope="module")
def augmented() -> InMemoryDataset:
    images = torch.randint(
        0, 256, (21, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    return InMemoryDataset(
        images, torch.arange(21) % 3, max_value=255, mean=(0.5,) * 3, std=(0.25,) * 3,
        augment_spec=AugmentSpec(padding=2, flip=True), augment=True,
    )  # fmt: skip


def _by_image(batches) -> dict[int, torch.Tensor]:
    return {int(i): x for b in batches for i, x in zip(b["index"], b["input"], strict=True)}


@pytest.mark.parametrize("kind", ["tensor", "dataloader"])
def test_an_image_is_augmented_alike_on_any_rank_and_in_any_batch(augmented, kind):
    def epoch(batch_size: int, rank: int = 0, world: int = 1, e: int = 1) -> dict[int, torch.Tensor]:
        loader = make_loader(augmented, batch_size, True, 3, loader=kind, rank=rank, world_size=world)
        loader.set_epoch(e)
        return _by_image(loader)

    alone = epoch(8)
    assert len(alone) == 21
    for rank in range(2):  # rank 0 and rank 1 of 2: their images as the single process has them
        for i, x in epoch(4, rank, 2).items():
            assert torch.equal(x, alone[i]), (rank, i)
    for i, x in epoch(5).items():  # another batch size: other batches, same augmentation per image
        assert torch.equal(x, alone[i])
    plain = {i: augmented[i]["input"] for i in range(21)}
    assert sum(not torch.equal(alone[i], plain[i]) for i in range(21)) > 15  # it augments
    other = epoch(8, e=2)
    assert sum(not torch.equal(alone[i], other[i]) for i in range(21)) > 10  # anew each epoch


# ------------------------------------------------------------------------------------------ sync_bn
def _nets() -> tuple[nn.Module, nn.Module]:
    return nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)), nn.Sequential(nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("world", "sync_bn", "expected"),
    [(1, None, False), (2, None, True), (2, False, False), (1, True, True)],
)
def test_sync_bn_defaults_to_several_processes_with_batchnorm(monkeypatch, world, sync_bn, expected):
    monkeypatch.setattr(parallel.D, "world_size", lambda: world)
    with_bn, without = _nets()
    assert parallel.use_global_batchnorm([with_bn, without], sync_bn) is expected
    assert isinstance(with_bn[1], D.GlobalBatchNorm2d) is expected
    assert parallel.use_global_batchnorm([nn.Linear(2, 2)], None) is False  # no BatchNorm: off


def test_a_converted_layer_is_plain_batchnorm_in_one_process():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(16))
    converted = copy.deepcopy(plain)
    hits = []
    converted[1].register_forward_hook(lambda *_: hits.append(1))
    assert D.convert_global_batchnorm(converted) == 2
    assert isinstance(converted[3], D.GlobalBatchNorm1d) and hits == []
    assert converted.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(converted(x), plain(x), rtol=0, atol=0)
    assert hits == [1]  # the layer kept its hooks
    for a, b in zip(converted.buffers(), plain.buffers(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------- whole runs, 1 vs 2 ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final(run: Path, name: str) -> dict[str, torch.Tensor]:
    folder, network = RUNS[name]
    return torch.load(run / folder / "final.pt", weights_only=True)["students"][network]


def _rows(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / RUNS[name][0] / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_two_process_run_ends_where_the_one_process_run_ends(tmp_path):
    from relkd.cli import main

    config = tmp_path / "suite.yaml"
    config.write_text(CONFIG)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", str(config), f"out={one}", "--quiet"]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
              "127.0.0.1", "--master_port", str(_free_port()), "-m", "relkd", "run", str(config),
              f"out={two}", "--quiet"]  # fmt: skip
    done = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (two / "results.md").read_text() == (one / "results.md").read_text()
    for name in RUNS:
        a, b = _final(one, name), _final(two, name)
        assert a.keys() == b.keys()
        assert any("running_var" in k for k in a) == (name != "rkd")  # BatchNorm statistics compared too
        for key in a:
            if a[key].is_floating_point():
                torch.testing.assert_close(
                    b[key], a[key], **TOL, msg=lambda m, n=name, k=key: f"{n} {k}: {m}"
                )
            else:
                assert torch.equal(b[key], a[key]), (name, key)
        for row_one, row_two in zip(_rows(one, name), _rows(two, name), strict=True):
            for key, value in row_one.items():
                if key.startswith(("loss/", "train_loss", "train_acc", "test_acc")):
                    assert row_two[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
