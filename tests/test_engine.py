"""The engine on tiny digits runs: resume exactness, stages, seams, checkpoints, NaN stop, sizes, taps.

The losses and the transform that exist only for these tests are registered by the module-scoped
fixture ``probes`` and removed afterwards, so the global registries are as the package leaves them for
every other test module.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from relkd.config import load_config
from relkd.experiment import RunDir, run_method, run_teacher
from relkd.experiment.setup import build_model, load_bundle
from relkd.experiment.suite import used_teachers
from relkd.losses import LOSSES, DistillLoss
from relkd.methods import BATCH_TRANSFORMS, cross_entropy, parse_terms
from relkd.train import CheckpointError, Engine, NonFiniteLossError, TrainBatches, build_stages
from relkd.train.backward import backward
from relkd.train.checkpoint import load_checkpoint, load_state, save_checkpoint
from relkd.train.metrics import topk_correct
from relkd.train.seeding import seed_everything

torch.set_num_threads(1)

BASE = {
    "name": "tiny",
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
}  # fmt: skip


# --- losses and a transform that exist only for these tests ---------------------------------------


class HeadsProbe(DistillLoss):
    """A loss with a part pre-trained on the teacher (``pretrain_step``) and a flag set afterwards."""

    taps = ("penultimate",)

    def __init__(self, teacher_dim: int) -> None:
        super().__init__()
        self.head = nn.Linear(teacher_dim, 1)
        self.register_buffer("finished", torch.zeros(()))

    def pretrain_step(self, teacher, batch):
        return (self.head(teacher["penultimate"]) - 1.0).pow(2).mean()

    def finish(self) -> None:
        self.finished.fill_(1.0)

    def count(self) -> None:
        self.finished.add_(1.0)

    def write_ones(self, linear: nn.Linear) -> None:
        with torch.no_grad():
            linear.weight.fill_(1.0)

    def forward(self, student, teacher):
        return (student.mean(1) - teacher.mean(1)).pow(2).mean()


class NaNOnCall(DistillLoss):
    """Finite until its ``at``-th call, NaN from then on."""

    taps = ("logits",)

    def __init__(self, at: int = 3) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, student, teacher):
        self.calls += 1
        value = (student - teacher).pow(2).mean()
        return value * float("nan") if self.calls >= self.at else value


class Sizes(DistillLoss):
    """Records the sizes the engine fills in."""

    taps = ("penultimate", "stage1")
    seen: dict = {}

    def __init__(self, student_dim, teacher_dim, student_channels, teacher_channels, num_data, targets):
        super().__init__()
        Sizes.seen = {
            "student_dim": student_dim,
            "teacher_dim": teacher_dim,
            "student_channels": student_channels,
            "teacher_channels": teacher_channels,
            "num_data": num_data,
            "targets": targets,
        }

    def forward(self, student, teacher):
        return student[0].sum() * 0.0


class SeenInputs(DistillLoss):
    """Keeps the raw inputs each network received (the input of the MLP's ``flatten``)."""

    taps = ("flatten:input",)
    seen: list = []

    def forward(self, student, teacher):
        SeenInputs.seen.append((student.detach().clone(), teacher.detach().clone()))
        return student.sum() * 0.0


def constant(value: float = 3.0):
    return lambda batch, ctx: {**batch, "input": torch.full_like(batch["input"], value)}


@pytest.fixture(scope="module", autouse=True)
def probes():
    """Register the test-only losses and transform for this module, and remove them after."""
    with contextlib.ExitStack() as stack:
        for name, cls in [("_t_heads", HeadsProbe), ("_t_nan", NaNOnCall), ("_t_sizes", Sizes),
                          ("_t_inputs", SeenInputs)]:  # fmt: skip
            stack.enter_context(LOSSES.temporarily(name, cls))
        stack.enter_context(BATCH_TRANSFORMS.temporarily("_t_constant", constant))
        yield


# --- helpers --------------------------------------------------------------------------------------


def config(methods: dict, *overrides: str):
    return load_config({**BASE, "methods": methods}, list(overrides))[0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, probes):
    cfg = config({"baseline": {}}, "teacher.train.epochs=1")
    return run_teacher(cfg, RunDir(tmp_path_factory.mktemp("teacher")), quiet=True, echo=lambda s: None)


def run(cfg, name, teacher, run_dir, resume=False):
    run_dir = RunDir(Path(run_dir))
    return run_method(
        cfg, name, 0, {"teacher": teacher}, run_dir, resume=resume, quiet=True, echo=lambda s: None
    )


class Interrupt(BaseException):
    pass


def interrupt_at(monkeypatch, epoch: int) -> None:
    """Make the run stop (like Ctrl-C) when it starts epoch ``epoch`` (0-based), once."""
    original = TrainBatches.epoch
    state = {"armed": True}

    def epoch_fn(self, e, with_transfer):
        if state["armed"] and e == epoch:
            state["armed"] = False
            raise Interrupt
        return original(self, e, with_transfer)

    monkeypatch.setattr(TrainBatches, "epoch", epoch_fn)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(node, torch.Tensor):
            flat[prefix] = node

    walk("", {"students": state["students"], "losses": state["losses"]})
    return flat


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


# --- resume ---------------------------------------------------------------------------------------

# CRD's memory banks and random negatives (global RNG) and KD on the transfer images: all of the
# state a resume must restore.
STATEFUL = {"losses": {"kd": {"weight": 0.9}, "crd": {"weight": 0.8, "num_negatives": 64, "feat_dim": 16}}}


def test_resume_ends_bit_identical_on_cpu(tmp_path, teacher, monkeypatch):
    cfg = config({"m": STATEFUL})
    straight = run(cfg, "m", teacher, tmp_path / "a")
    interrupt_at(monkeypatch, 1)
    with pytest.raises(Interrupt):
        run(cfg, "m", teacher, tmp_path / "b")
    assert load_checkpoint(tmp_path / "b" / "m" / "seed0" / "checkpoint.pt")["epoch"] == 1
    resumed = run(cfg, "m", teacher, tmp_path / "b", resume=True)
    assert_same_weights(tmp_path / "a/m/seed0/final.pt", tmp_path / "b/m/seed0/final.pt")
    assert resumed["last_acc1"] == straight["last_acc1"]
    rows = [json.loads(line) for line in (tmp_path / "b/m/seed0/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


TWO_STAGES = {
    "losses": {"heads": {"loss": "_t_heads", "weight": 0.5}},
    "stages": [
        {"name": "pre", "epochs": 1, "terms": {"heads": {"call": "pretrain_step", "network": "teacher"}},
         "ce_weight": 0.0, "trainable": ["loss.heads.head"], "after": ["loss.heads.finish"],
         "optimizer": {"name": "sgd", "lr": 0.001}},
        {"name": "main"},
    ],
}  # fmt: skip


def test_resume_at_a_stage_boundary_is_bit_identical(tmp_path, teacher, monkeypatch):
    cfg = config({"m": TWO_STAGES})
    run(cfg, "m", teacher, tmp_path / "a")
    interrupt_at(monkeypatch, 1)
    with pytest.raises(Interrupt):
        run(cfg, "m", teacher, tmp_path / "b")
    run(cfg, "m", teacher, tmp_path / "b", resume=True)
    assert_same_weights(tmp_path / "a/m/seed0/final.pt", tmp_path / "b/m/seed0/final.pt")


# --- stages and the other seams ------------------------------------------------------------------------


def test_first_stage_trains_only_its_modules_then_calls_after(tmp_path, teacher):
    pre = {**TWO_STAGES["stages"][0], "epochs": 2}
    cfg = config({"m": {**TWO_STAGES, "stages": [pre]}})
    run(cfg, "m", teacher, tmp_path)
    final = torch.load(tmp_path / "m/seed0/final.pt", weights_only=True)
    seed_everything(0)
    fresh = build_model(cfg.student, load_bundle(cfg.data, 0)).state_dict()
    for key, value in fresh.items():
        assert torch.equal(final["students"]["student"][key], value), key
    assert final["losses"]["heads.finished"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "m/seed0/metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["pre", "pre"] and "loss/ce" not in rows[0]
    assert rows[1]["loss/heads"] < rows[0]["loss/heads"]


def test_after_epoch_and_after_calls_with_module_arguments(tmp_path, teacher, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stage = {**TWO_STAGES["stages"][0], "epochs": 3, "after": ["loss.heads.write_ones(student.fc)"],
             "after_epoch": ["loss.heads.count"]}  # fmt: skip
    run(config({"m": {**TWO_STAGES, "stages": [stage]}}), "m", teacher, tmp_path / "run")
    final = torch.load(tmp_path / "run/m/seed0/final.pt", weights_only=True)
    assert final["losses"]["heads.finished"] == 3.0  # once per epoch
    assert torch.all(final["students"]["student"]["fc.weight"] == 1.0)
    # the last epoch's evaluation comes after the stage's `after` call: with every row of fc equal, the
    # network predicts one class (the largest bias) for every image
    rows = [json.loads(line) for line in (tmp_path / "run/m/seed0/metrics.jsonl").read_text().splitlines()]
    test_targets = load_bundle(config({"baseline": {}}).data, 0).test.targets
    shares = {round(100.0 * float((test_targets == k).double().mean()), 6) for k in range(10)}
    assert round(rows[-1]["test_acc1"], 6) in shares
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written where the run was started


def test_batch_transform_reaches_teacher_and_student_identically(tmp_path, teacher):
    SeenInputs.seen.clear()
    method = {
        "losses": {"inputs": {"loss": "_t_inputs"}},
        "train": {"batch_transform": {"name": "_t_constant"}},
    }
    run(config({"m": method}, "train.epochs=1"), "m", teacher, tmp_path)
    assert SeenInputs.seen
    for student, teacher_input in SeenInputs.seen:
        assert torch.equal(student, teacher_input)
        assert torch.all(student == 3.0)


def test_sizes_are_measured_and_filled_in(tmp_path, teacher):
    run(config({"m": {"losses": {"s": {"loss": "_t_sizes"}}}}, "train.epochs=1"), "m", teacher, tmp_path)
    seen = Sizes.seen
    # mlp width 16 (student) and 32 (teacher): penultimate and the first hidden layer
    assert (seen["student_dim"], seen["teacher_dim"]) == (16, 32)
    assert (seen["student_channels"], seen["teacher_channels"]) == ([16, 16], [32, 32])
    assert seen["num_data"] == 1347 and seen["targets"].shape == (1347,)


def test_wrong_tap_lists_the_closest_module_names(tmp_path, teacher):
    method = {"losses": {"rkd": {"taps": ["layers.7"]}}}
    with pytest.raises(KeyError, match="layers.1"):
        run(config({"m": method}, "train.epochs=1"), "m", teacher, tmp_path)


def test_several_students_and_teachers(tmp_path):
    torch.manual_seed(0)

    def net(width):
        return nn.Sequential(nn.Flatten(), nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))

    students = {"a": net(8), "b": net(6)}
    teachers = {"t1": net(16).eval(), "t2": net(12).eval()}
    data = [{"input": torch.randn(8, 1, 2, 2), "target": torch.randint(0, 3, (8,)), "index": torch.arange(8)}]
    loader = _ListLoader(data)
    specs = parse_terms(
        {
            "kd_a": {"loss": "kd", "student": "a", "teacher": "t1"},
            "rkd_b": {"loss": "rkd", "student": "b", "teacher": "t2"},
        },
        list(students),
        list(teachers),
    )
    stages = build_stages(None, config({"baseline": {}}).train, {"kd_a": 1.0, "rkd_b": 1.0})
    engine = Engine(
        students,
        stages,
        TrainBatches(loader),
        loader,
        tmp_path,
        teachers=teachers,
        terms=specs,
        probe=data[0]["input"],
        tensorboard=False,
        quiet=True,
    )
    engine.fit()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss/kd_a", "loss/rkd_b", "test_acc1", "b/test_acc1", "cka"} <= set(row)


class _ListLoader:
    def __init__(self, batches):
        self.batches = batches

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


# --- checkpoints, NaN, logs -----------------------------------------------------------------------


def test_checkpoints_load_with_weights_only_and_logs_are_written(tmp_path, teacher):
    result = run(config({"m": STATEFUL}), "m", teacher, tmp_path)
    out = tmp_path / "m/seed0"
    for name in ("checkpoint.pt", "final.pt"):
        assert isinstance(torch.load(out / name, weights_only=True), dict)
    assert set(result) >= {"last_acc1", "best_acc1", "best_epoch", "last_acc5", "wall_time_s", "seed"}
    assert json.loads((out / "result.json").read_text()) == result
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/ce", "loss/kd", "loss/crd", "test_acc1", "test_acc5", "knn_overlap", "cka"} <= set(rows[0])
    assert result["best_acc1"] == max(r["test_acc1"] for r in rows)
    assert result["last_acc1"] == rows[-1]["test_acc1"]
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["epoch", "stage"] and "loss/crd" in header


def test_nan_stops_the_run_naming_term_and_step_and_keeps_the_checkpoint(tmp_path, teacher):
    # 40 labelled + 1307 transfer images in batches of 128: 11 steps per epoch; NaN at the 14th step.
    cfg = config({"m": {"losses": {"bad": {"loss": "_t_nan", "at": 14}}}})
    with pytest.raises(NonFiniteLossError) as info:
        run(cfg, "m", teacher, tmp_path)
    message = str(info.value)
    assert "'bad'" in message and "step 14" in message and "epoch 2, step 3 of 11" in message
    checkpoint = load_checkpoint(tmp_path / "m/seed0/checkpoint.pt")
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["students"]["student"].values())


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_checkpoint_is_an_error_naming_the_file(tmp_path, teacher, damage):
    cfg = config({"m": STATEFUL}, "train.epochs=1")
    run(cfg, "m", teacher, tmp_path)
    path = tmp_path / "m/seed0/checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint" * 10)
    (tmp_path / "m/seed0/result.json").unlink()
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        run(cfg, "m", teacher, tmp_path, resume=True)


def test_mismatched_state_names_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"students": {"student": nn.Linear(3, 2).state_dict()}})
    state = load_checkpoint(path, ["students"])["students"]["student"]
    with pytest.raises(CheckpointError) as info:
        load_state(path, "student", nn.Sequential(nn.Linear(3, 2)), state)
    message = str(info.value)
    assert str(path) in message and "0.weight" in message and "unexpected keys: bias, weight" in message
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(path, ["students", "optimizer"])


def test_resume_with_another_config_is_refused(tmp_path, teacher):
    run(config({"m": STATEFUL}, "train.epochs=1"), "m", teacher, tmp_path)
    (tmp_path / "m/seed0/result.json").unlink()
    with pytest.raises(ValueError, match="another configuration"):
        other = config({"m": STATEFUL}, "train.epochs=1", "train.optimizer.lr=0.01")
        run(other, "m", teacher, tmp_path, resume=True)


# --- the pieces of a step -------------------------------------------------------------------------


def test_cross_entropy_averages_over_labelled_images_only():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]], dtype=torch.float64)
    target = torch.tensor([0, -1, 1])
    expected = (-torch.log_softmax(logits[0], 0)[0] - torch.log_softmax(logits[2], 0)[1]) / 2
    assert torch.allclose(cross_entropy(logits, target), expected.float())
    assert cross_entropy(logits, torch.full((3,), -1)) == 0.0


def test_topk_counts_labelled_hits():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.3, 0.2, 0.5], [1.0, 0.0, 0.0]])
    target = torch.tensor([1, 2, 0, -1])
    # top-1: only the first row; top-2: also the third (0 is second there); the last is unlabelled
    assert topk_correct(logits, target, (1, 2)).tolist() == [1.0, 2.0]


def test_backward_clips_each_distillation_gradient_to_the_ce_gradient_norm():
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    q = nn.Parameter(torch.tensor([3.0]))  # reached by the distillation term only
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([30.0, 0.0])
    losses = {"ce": (p * a).sum(), "kd": 0.5 * ((p * b).sum() + 2 * q.sum())}
    backward(losses, [p, q], lambda x: x, clip_to_ce=True)
    # g_ce = a (norm 5), g_kd = 0.5 b (norm 15) -> scaled by 5/15; q keeps its unclipped gradient
    assert torch.allclose(p.grad, a + 0.5 * b * (5.0 / 15.0))
    assert torch.allclose(q.grad, torch.tensor([1.0]))


def test_train_batches_cycle_the_labelled_set_over_the_transfer_epoch():
    class Counter(_ListLoader):
        def __init__(self, n, tag):
            super().__init__([])
            self.n, self.tag, self.epoch = n, tag, 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __len__(self):
            return self.n

        def __iter__(self):
            epoch, self.epoch = self.epoch, self.epoch + 1
            return iter({"input": torch.tensor([[self.tag, epoch, i]]), "target": torch.tensor([0])}
                        for i in range(self.n))  # fmt: skip

    batches = TrainBatches(Counter(2, 0), Counter(5, 1))
    seen = [b["input"].tolist() for b in batches.epoch(1, with_transfer=True)]
    # 5 steps; the labelled loader is cycled 3 times, from its epoch 1*3 = 3
    assert [s[0] for s in seen] == [[0, 3, 0], [0, 3, 1], [0, 4, 0], [0, 4, 1], [0, 5, 0]]
    assert [s[1] for s in seen] == [[1, 1, i] for i in range(5)]
    alone = [b["input"].tolist() for b in batches.epoch(1, with_transfer=False)]
    assert alone == [[s[0]] for s in seen]


@pytest.mark.slow
def test_every_builtin_method_trains_a_small_cnn(tmp_path):
    from relkd import configs
    from relkd.config.methods import load_method, missing_losses

    methods = {n: load_method(n, n) for n in configs.method_names()}
    # the image methods (a text method needs a tokenised corpus and a transformer: tests/test_text_*)
    names = [n for n, m in methods.items() if m.get("modality", "image") == "image" and not missing_losses(m)]
    suite = {
        **BASE,
        "teacher": {**BASE["teacher"], "model": "lenet", "args": {"width": 8}},
        "student": {"model": "lenet", "args": {"width": 4}},
        "methods": names,
        "loss_args": {"crd": {"num_negatives": 32}, "hkd": {"num_negatives": 32}},
        # one epoch of a width-4 network on 40 labels: a self-teacher may still be at chance
        "check_teachers": False,
        # the built-in digits experiment's recipe: AT's weight of 1000 diverges under SGD at lr 0.05 here
        "train": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 1e-4}},
    }
    full = load_config(suite, ["teacher.train.epochs=1"])[0]
    shorter = [
        f"methods.{name}.stages.{i}.epochs=1"
        for name, method in full.methods.items()
        for i, _ in enumerate(method.stages or [])
    ]
    cfg = load_config(suite, ["teacher.train.epochs=1", *shorter])[0]
    trained = {
        t: run_teacher(cfg, RunDir(tmp_path), t, quiet=True, echo=lambda s: None) for t in used_teachers(cfg)
    }
    for name in names:
        result = run_method(cfg, name, 0, trained, RunDir(tmp_path), quiet=True, echo=lambda s: None)
        stages = cfg.methods[name].stages
        assert result["epochs"] == (len(stages) if stages else 1), name


def test_relational_terms_of_a_step_share_one_gram_product_per_side(tmp_path, teacher, monkeypatch):
    import relkd.graphs.ops as ops
    from relkd.methods.weighted_sum import WeightedSum

    grams, steps = [], []
    real_gram, real_forward = ops.gram, WeightedSum.forward
    monkeypatch.setattr(ops, "gram", lambda x: grams.append(x.shape) or real_gram(x))

    def counted(self, ctx):
        steps.append(1)
        return real_forward(self, ctx)

    monkeypatch.setattr(WeightedSum, "forward", counted)
    losses = {"rkd": {"weight": 1.0}, "sp": {"weight": 1.0}, "cc": {"weight": 1.0}, "pkt": {"weight": 1.0}}
    cfg = config({"four": {"losses": losses}}, "train.epochs=1", "log_agreement=false")
    run(cfg, "four", teacher, tmp_path / "four")
    assert steps and len(grams) == 2 * len(steps), (len(grams), len(steps))
