"""Data-parallel runs: sharded loaders, the ``data.loader`` switch, and ``torchrun -m relkd run``.

The end-to-end check launches two gloo processes on the loopback interface and compares them with one
process on the same global batch. The tiny config makes an epoch a single optimiser step (20 labelled
digits, batch 20, no augmentation, an untrained teacher): the two-process step sees the same 20 images
(each rank its contiguous 10 of them), so its loss values and the weights after the step must equal the
single-process ones. A relational loss over each rank's 10 images alone, or a gradient off by the factor
``W`` of the convention in :mod:`relkd.distributed`, would not. ``rkd_clip`` takes the ``clip_to_ce``
path (no DDP; the two gradients averaged before the rule). Whole runs of several epochs, with
replicated tails and BatchNorm: ``tests/test_ddp_invariance.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from relkd.config import ConfigError, load_config
from relkd.data import build, make_loader

ROOT = Path(__file__).resolve().parents[1]
TINY = """\
name: ddp_tiny
data: {name: digits, train_subset: 20, batch_size: 20, test_batch_size: 200, augment: false}
teacher: {model: mlp, args: {width: 16, depth: 2}, train: {epochs: 0}}
student: {model: mlp, args: {width: 8, depth: 2}}
train: {epochs: 1, optimizer: {name: sgd, lr: 0.1, momentum: 0.9}}
methods:
  baseline: baseline
  rkd: rkd
  rkd_clip: {losses: {rkd: {}}, train: {clip_to_ce: true}}
seeds: [0]
threads: 1
log_agreement: false
tensorboard: false
check_teachers: false
"""


@pytest.fixture(scope="module")
def train_set():
    return build("digits").train


def _indices(loader) -> list[list[int]]:
    return [b["index"].tolist() for b in loader]


# ------------------------------------------------------------------------------------ sharded loaders
@pytest.mark.parametrize("kind", ["tensor", "dataloader"])
@pytest.mark.parametrize("world", [2, 3])
def test_training_shards_are_contiguous_parts_of_the_single_process_batches(train_set, kind, world):
    n, per_rank = len(train_set), 16  # 1347 images: the last global batch does not split evenly
    single = _indices(make_loader(train_set, per_rank * world, True, 7, loader=kind))
    shards = [
        list(make_loader(train_set, per_rank, True, 7, loader=kind, rank=r, world_size=world))
        for r in range(world)
    ]
    assert all(len(s) == len(single) for s in shards)
    for step, whole in enumerate(single):
        parts = [s[step] for s in shards]
        flags = {bool(f) for p in parts for f in p["replicated"]}
        if len(whole) % world:  # every rank holds the whole batch, flagged, nothing repeated
            assert flags == {True} and all(p["index"].tolist() == whole for p in parts)
        else:  # the ranks' shards in rank order are the single-process batch
            assert flags == {False} and sum((p["index"].tolist() for p in parts), []) == whole
    # 1347 = 3 x 449: the last batch (3 images) is replicated on 2 ranks and split 1 + 1 + 1 on 3
    assert any(len(whole) % world for whole in single) == (world == 2) and n == 1347
    assert sorted(sum(single, [])) == sorted(train_set.indices.tolist())


def test_a_tail_that_splits_evenly_is_sharded(train_set):
    subset = train_set.subset(torch.arange(36))  # batches of 16, 16 and 4: the 4 split 2 + 2
    shards = [_indices(make_loader(subset, 8, True, 1, rank=r, world_size=2)) for r in range(2)]
    assert [len(b) for b in shards[0]] == [8, 8, 2] and [len(b) for b in shards[1]] == [8, 8, 2]
    assert sorted(sum(shards[0] + shards[1], [])) == sorted(subset.indices.tolist())


def test_one_process_batches_carry_no_flag(train_set):
    batch = next(iter(make_loader(train_set, 8, True, 0)))
    assert set(batch) == {"input", "target", "index"}


def test_evaluation_shards_cover_the_test_set_once(train_set):
    world = 4
    shards = [
        sum(_indices(make_loader(train_set, 50, False, 0, rank=r, world_size=world, even=False)), [])
        for r in range(world)
    ]
    assert sorted(sum(shards, [])) == sorted(train_set.indices.tolist())


def test_dataloader_path_gives_the_tensor_paths_batches(train_set):
    tensor = make_loader(train_set, 32, True, 3, loader="tensor", rank=1, world_size=2)
    torch_path = make_loader(train_set, 32, True, 3, loader="dataloader", rank=1, world_size=2)
    assert type(tensor).__name__ == "TensorDataLoader" and type(torch_path).__name__ == "EpochDataLoader"
    assert train_set.augment  # the equality covers the batch augmentation too
    for a, b in zip(tensor, torch_path, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["target"], b["target"])
        torch.testing.assert_close(a["input"], b["input"])


def test_unknown_loader_is_an_error_with_a_hint():
    with pytest.raises(ConfigError, match=r"data\.loader: unknown loader 'tensors'.*'tensor'"):
        load_config(None, ["data.loader=tensors"])
    with pytest.raises(ValueError, match="loader must be one of"):
        make_loader(build("digits").test, 8, False, 0, loader="gpu")


def test_batch_not_divisible_by_the_world_size_is_an_error(monkeypatch):
    from relkd.train import parallel

    monkeypatch.setattr(parallel.D, "world_size", lambda: 3)
    assert parallel.per_rank(63, "data.batch_size") == 21
    with pytest.raises(ConfigError, match="data.batch_size: the batch of 64 images .* 3 processes"):
        parallel.per_rank(64, "data.batch_size")


# ------------------------------------------------------------------------------ torchrun -m relkd run
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _student(run: Path, method: str) -> dict[str, torch.Tensor]:
    return torch.load(run / method / "seed0" / "final.pt", weights_only=True)["students"]["student"]


def _first_row(run: Path, method: str) -> dict:
    return json.loads((run / method / "seed0" / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_run_equals_one_process_on_the_global_batch(tmp_path):
    from relkd.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(["run", str(config), f"out={single}", "--quiet"]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
              "127.0.0.1", "--master_port", str(_free_port()), "-m", "relkd", "run", str(config),
              f"out={multi}", "--quiet"]  # fmt: skip
    done = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (multi / "results.md").is_file() and (multi / "rkd" / "seed0" / "result.json").is_file()
    assert done.stdout.count("rkd seed 0: top-1") == 1  # rank 0 alone prints
    for method in ("baseline", "rkd", "rkd_clip"):
        one, two = _first_row(single, method), _first_row(multi, method)
        for key in ("loss/ce", "loss/rkd", "test_acc1", "test_acc5"):
            if key in one:
                assert two[key] == pytest.approx(one[key], rel=1e-5), key
        a, b = _student(single, method), _student(multi, method)
        moved = max(float((a[k] - _student(single, "baseline")[k]).abs().max()) for k in a)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
        if method != "baseline":
            assert moved > 1e-4  # the RKD term changed the step: its gradient is part of the comparison
