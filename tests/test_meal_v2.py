"""MEAL V2: the ensemble's probability average (not the softmax of the mean logits), the soft
cross-entropy against a written-out float64 reference, labels never read, the discriminator's input
and target layout and released architecture, the sign of the discriminator's gradient into the
student's logits in each mode, bad input, the pinned defaults, a digits run with two teachers and a
bit-identical resume after an interruption in the middle of an epoch."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from relkd import configs
from relkd.config import load_config
from relkd.experiment import RunDir, run_method, run_teacher
from relkd.experiment.results import summarize
from relkd.methods import STEPS, StageInfo, StepContext
from relkd.methods.meal_v2 import (
    MEALV2,
    LogitDiscriminator,
    discriminator_loss,
    discriminator_targets,
    ensemble_probabilities,
    soft_cross_entropy,
)
from relkd.train import TrainBatches

torch.set_num_threads(1)

C = 16


# --- float64 references, written out --------------------------------------------------------------


def ref_softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def ref_similarity(student: torch.Tensor, teachers: list[torch.Tensor]) -> float:
    """-1/B sum_b sum_c pbar_bc log softmax(z_s)_bc with pbar the mean of the teachers' softmaxes."""
    total = 0.0
    for b, row in enumerate(student.tolist()):
        probs = [ref_softmax(t[b].tolist()) for t in teachers]
        pbar = [sum(p[c] for p in probs) / len(probs) for c in range(len(row))]
        log_q = [math.log(q) for q in ref_softmax(row)]
        total -= sum(p * lq for p, lq in zip(pbar, log_q, strict=True))
    return total / len(student)


def ref_discriminator(d: LogitDiscriminator, x: torch.Tensor) -> torch.Tensor:
    """relu(W3 relu(W2 relu(W1 x + b1) + b2) + b3), from D's weights, in float64."""
    h = x
    for layer in (d.layers[0], d.layers[2], d.layers[4]):
        w, b = layer.weight.detach().double(), layer.bias.detach().double()
        h = torch.clamp(h @ w.T + b, min=0.0)
    return h


def ref_bce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over every entry of -(y log sigmoid(o) + (1 - y) log(1 - sigmoid(o)))."""
    s = 1.0 / (1.0 + torch.exp(-output))
    return -(target * torch.log(s) + (1 - target) * torch.log(1 - s)).mean()


def ref_d_loss(d: LogitDiscriminator, z_s: torch.Tensor, teachers: list[torch.Tensor]) -> torch.Tensor:
    mean = sum(t.double() for t in teachers) / len(teachers)
    b = z_s.shape[0]
    target = torch.tensor([[1.0, 0.0]] * b + [[0.0, 1.0]] * b, dtype=torch.float64)
    return ref_bce(ref_discriminator(d, torch.cat([z_s, mean])), target)


# --- helpers ---------------------------------------------------------------------------------------


def logits(b: int, seed: int, scale: float = 2.0, classes: int = C) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(b, classes, generator=g, dtype=torch.float64)


class Fixed(nn.Module):
    """A network whose output is a fixed logit matrix (a parameter), whatever its input."""

    def __init__(self, z: torch.Tensor) -> None:
        super().__init__()
        self.z = nn.Parameter(z.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.z


def context(networks, batch, teachers, ce_weight=0.0) -> StepContext:
    stage = StageInfo("meal_v2", 1, 1, 1, (), ce_weight)
    students = [n for n in networks if n not in teachers]
    return StepContext(
        batch=batch, epoch=1, step=0, steps_per_epoch=1, stage=stage, networks=networks,
        students=students, teachers=list(teachers), terms={}, taps={},
    )  # fmt: skip


def meal(mode: str = "joint", teachers=("t1", "t2"), seed: int = 0, **options) -> MEALV2:
    torch.manual_seed(seed)
    step = MEALV2(mode, students=["student"], teachers=list(teachers), num_classes=C, **options).double()
    if step.discriminator is not None:
        with torch.no_grad():
            for layer in step.discriminator.layers[::2]:  # positive biases: every ReLU carries gradient
                layer.bias.uniform_(0.5, 1.0)
    return step


def networks(b: int = 5, seeds=(0, 1, 2)) -> dict[str, nn.Module]:
    return {"t1": Fixed(logits(b, seeds[1], 3.0)), "t2": Fixed(logits(b, seeds[2], 1.0)),
            "student": Fixed(logits(b, seeds[0]))}  # fmt: skip


def batch(b: int = 5, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    return {
        "input": torch.zeros(b, 1),
        "target": torch.zeros(b, dtype=torch.long) if target is None else target,
    }


# --- the ensemble and the similarity loss ----------------------------------------------------------


def test_probability_average_is_not_the_softmax_of_the_mean_logits():
    # Two teachers on two classes: logits (0, 0) and (4, 0).
    # By hand: softmax = (1/2, 1/2) and (e^4 / (e^4 + 1), 1 / (e^4 + 1)) = (0.98201, 0.01799), so
    # pbar = (0.74101, 0.25899); the mean logits (2, 0) give softmax (0.88080, 0.11920).
    t1 = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t2 = torch.tensor([[4.0, 0.0]], dtype=torch.float64)
    pbar = ensemble_probabilities([t1, t2])[0]
    e4 = math.exp(4.0)
    expected = [(0.5 + e4 / (e4 + 1)) / 2, (0.5 + 1 / (e4 + 1)) / 2]
    torch.testing.assert_close(pbar, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert abs(float(pbar[0]) - 0.74101) < 1e-5
    of_mean = torch.softmax((t1 + t2) / 2, dim=1)[0]
    assert abs(float(of_mean[0]) - 0.88080) < 1e-5 and abs(float(pbar[0] - of_mean[0])) > 0.1
    # The step's loss uses pbar: a student at (1, -1) is scored against pbar, not softmax(zbar).
    nets = {
        "t1": Fixed(t1),
        "t2": Fixed(t2),
        "student": Fixed(torch.tensor([[1.0, -1.0]], dtype=torch.float64)),
    }
    step = MEALV2("none", students=["student"], teachers=["t1", "t2"])
    with torch.no_grad():
        got = float(step(context(nets, batch(1), ["t1", "t2"])).losses["similarity"])
    log_q = [math.log(q) for q in ref_softmax([1.0, -1.0])]
    assert abs(got - -sum(p * lq for p, lq in zip(expected, log_q, strict=True))) < 1e-12
    assert abs(got - -sum(float(p) * lq for p, lq in zip(of_mean, log_q, strict=True))) > 0.05


@pytest.mark.parametrize("m", [1, 3])
def test_similarity_matches_the_written_out_reference(m):
    student = logits(6, 0).requires_grad_()
    teachers = [logits(6, s, 3.0) for s in range(1, m + 1)]
    got = soft_cross_entropy(student, ensemble_probabilities(teachers)).detach()
    assert abs(float(got) - ref_similarity(student.detach(), teachers)) < 1e-12
    assert torch.autograd.gradcheck(
        lambda z: soft_cross_entropy(z, ensemble_probabilities(teachers)), (student,)
    )


def test_labels_are_never_read():
    class NoTarget(dict):
        def __getitem__(self, key):
            if key == "target":
                raise AssertionError("the step read batch['target']")
            return super().__getitem__(key)

    results = []
    for target in (
        torch.zeros(5, dtype=torch.long),
        torch.tensor([3, 1, 4, 1, 5]),
        torch.full((5,), -1),
        None,
    ):
        nets = networks()
        data = batch(5, target) if target is not None else NoTarget(input=torch.zeros(5, 1))
        out = meal("joint")(context(nets, data, ["t1", "t2"]))
        sum(out.losses.values()).backward()
        results.append(({k: v.detach() for k, v in out.losses.items()}, nets["student"].z.grad))
    first_losses, first_grad = results[0]
    for losses, grad in results[1:]:
        assert all(torch.equal(losses[k], first_losses[k]) for k in first_losses)
        assert torch.equal(grad, first_grad)
    # with labels, a cross-entropy on these targets would differ between the first two batches
    ce = [
        torch.nn.functional.cross_entropy(logits(5, 0), t)
        for t in (torch.zeros(5).long(), torch.tensor([3, 1, 4, 1, 5]))
    ]
    assert abs(float(ce[0] - ce[1])) > 1e-3


# --- the discriminator -----------------------------------------------------------------------------


def test_discriminator_target_layout_and_input_order():
    assert discriminator_targets(3, torch.zeros(1)).tolist() == [[1, 0]] * 3 + [[0, 1]] * 3
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x)
            return x[:, :2]

    student, mean = logits(4, 0), logits(4, 1)
    loss = discriminator_loss(Recorder(), student, mean)
    assert torch.equal(seen[0][:4], student) and torch.equal(seen[0][4:], mean)
    target = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4, dtype=torch.float64)
    assert abs(float(loss) - float(ref_bce(torch.cat([student, mean])[:, :2], target))) < 1e-12


def test_discriminator_is_the_released_architecture():
    d = LogitDiscriminator(1000)
    linears = [m for m in d.layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1000, 125), (125, 15), (15, 2)]
    assert [type(m) for m in d.layers] == [nn.Linear, nn.ReLU] * 3  # ReLU after the output layer too
    assert all(m.bias is not None for m in linears)
    x = torch.randn(64, 1000)
    assert (d(x) >= 0).all()
    assert [m.out_features for m in LogitDiscriminator(10).layers[::2]] == [1, 1, 2]  # widths kept >= 1
    assert [m.out_features for m in LogitDiscriminator(100).layers[::2]] == [12, 1, 2]


@pytest.mark.parametrize("mode, sign", [("joint", 1.0), ("grl", -1.0), ("none", 0.0)])
def test_sign_of_the_discriminator_gradient_into_the_student_logits(mode, sign):
    nets = networks()
    step = meal(mode)
    out = step(context(nets, batch(), ["t1", "t2"]))
    assert ("discriminator" in out.losses) == (mode != "none")
    sum(out.losses.values()).backward()
    teachers = [nets["t1"].z.detach(), nets["t2"].z.detach()]
    z = nets["student"].z.detach().clone().requires_grad_()
    (g_similarity,) = torch.autograd.grad(
        -(ensemble_probabilities(teachers) * torch.log_softmax(z, 1)).sum(1).mean(), z
    )
    grad_from_d = nets["student"].z.grad - g_similarity
    assert nets["t1"].z.grad is None and nets["t2"].z.grad is None
    if mode == "none":
        assert list(step.parameters()) == [] and torch.equal(grad_from_d, torch.zeros_like(z))
        return
    (g_d,) = torch.autograd.grad(ref_d_loss(step.discriminator, z, teachers), z)
    assert g_d.norm() > 1e-3
    torch.testing.assert_close(grad_from_d, sign * g_d, rtol=1e-10, atol=1e-12)
    # Meaning: a small student step against its gradient separates it from the teachers (L_D falls)
    # in joint mode, and fools the discriminator (L_D rises) under gradient reversal.
    before = float(ref_d_loss(step.discriminator, z.detach(), teachers))
    after = float(ref_d_loss(step.discriminator, z.detach() - 1e-3 * sign * g_d, teachers))
    assert (after < before) if mode == "joint" else (after > before)


def d_loss_of_weights(z: torch.Tensor, mean: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    h = torch.cat([z, mean])
    for i in range(3):
        h = torch.clamp(h @ weights[2 * i].T + weights[2 * i + 1], min=0.0)
    b = z.shape[0]
    return ref_bce(h, torch.tensor([[1.0, 0.0]] * b + [[0.0, 1.0]] * b, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["joint", "grl"])
def test_the_discriminator_descends_on_its_loss_in_both_modes(mode):
    nets = networks()
    step = meal(mode)
    step(context(nets, batch(), ["t1", "t2"])).losses["discriminator"].backward()
    weights = [p.detach().clone().requires_grad_() for p in step.discriminator.parameters()]
    mean = (nets["t1"].z.detach() + nets["t2"].z.detach()) / 2
    expected = torch.autograd.grad(d_loss_of_weights(nets["student"].z.detach(), mean, *weights), weights)
    for p, e in zip(step.discriminator.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


def test_grl_scale_scales_the_reversed_gradient():
    grads = {}
    for scale in (1.0, 0.25):
        nets = networks()
        out = meal("grl", grl_scale=scale)(context(nets, batch(), ["t1", "t2"]))
        out.losses["discriminator"].backward()
        grads[scale] = nets["student"].z.grad
    torch.testing.assert_close(grads[0.25], 0.25 * grads[1.0], rtol=1e-12, atol=1e-15)


# --- errors and defaults ---------------------------------------------------------------------------


def test_bad_configurations_and_inputs_raise_clearly():
    with pytest.raises(ValueError, match="one of joint, grl, none"):
        MEALV2("adversarial", students=["student"], teachers=["t"], num_classes=C)
    with pytest.raises(ValueError, match="distils one student, got 2"):
        MEALV2(students=["a", "b"], teachers=["t"], num_classes=C)
    with pytest.raises(ValueError, match="at least one teacher"):
        MEALV2(students=["student"], teachers=[], num_classes=C)
    stage = StageInfo("meal_v2", 1, 1, 1, (), 1.0)
    with pytest.raises(ValueError, match="without labels.*ce_weight 1.0"):
        MEALV2(students=["student"], teachers=["t"], num_classes=C, stage=stage)
    with pytest.raises(ValueError, match=r"teacher logits of the student's shape \[5, 16\], got \[5, 8\]"):
        nets = {
            "t1": Fixed(logits(5, 1, classes=8)),
            "t2": Fixed(logits(5, 2)),
            "student": Fixed(logits(5, 0)),
        }
        meal("none")(context(nets, batch(), ["t1", "t2"]))
    with pytest.raises(ValueError, match=r"same shape \[B, C\], got \[4, 16\] and \[3, 16\]"):
        soft_cross_entropy(logits(4, 0), torch.softmax(logits(3, 1), 1))


def test_pinned_defaults():
    assert STEPS.get("meal_v2") is MEALV2
    defaults = {k: p.default for k, p in inspect.signature(MEALV2).parameters.items()}
    # train.py: discriminator loss added with weight 1; models/discriminator.py with K = 8
    assert defaults["discriminator"] == "joint" and defaults["discriminator_weight"] == 1.0
    assert defaults["reduction"] == 8
    method = yaml.safe_load(configs.method_path("meal_v2").read_text())
    assert method["step"] == {"name": "meal_v2", "discriminator": "joint", "discriminator_weight": 1.0}
    assert method["train"]["ce_weight"] == 0.0 and "teachers" not in method  # every teacher of the suite
    pretrain, distil = method["stages"]
    assert pretrain["step"] == {"name": "weighted_sum"} and pretrain["ce_weight"] == 1.0
    assert pretrain["trainable"] == ["student"] and not method["losses"]
    # train.py create_optimizer / opts.py: SGD, momentum 0.9, weight decay 0; model_factory LR_REGIME 0.01
    assert distil["optimizer"] == {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0}


# --- digits runs -----------------------------------------------------------------------------------

TEACHER = {"model": "mlp", "args": {"width": 32, "depth": 1},
           "data": {"train_subset": None, "unlabeled": False, "batch_size": 64}}  # fmt: skip
BASE = {
    "name": "tiny",
    "data": {"name": "digits", "train_subset": 40, "unlabeled": True, "batch_size": 16,
             "transfer_batch_size": 128, "test_batch_size": 256},
    "teachers": {"t1": TEACHER, "t2": {**TEACHER, "args": {"width": 24, "depth": 1}, "seed": 1}},
    "student": {"model": "mlp", "args": {"width": 16, "depth": 2}},
    "train": {"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
    "methods": ["meal_v2"],
    "seeds": [0],
    "probe_size": 64,
    "tensorboard": False,
}  # fmt: skip


def config(*overrides: str):
    return load_config(BASE, ["teachers.t1.train.epochs=1", "teachers.t2.train.epochs=1", *overrides])[0]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    cfg, run_dir = config(), RunDir(tmp_path_factory.mktemp("teachers"))
    return {name: run_teacher(cfg, run_dir, name, quiet=True, echo=lambda s: None) for name in ("t1", "t2")}


def run(cfg, teachers, run_dir: Path, resume: bool = False) -> dict:
    return run_method(
        cfg, "meal_v2", 0, teachers, RunDir(run_dir), resume=resume, quiet=True, echo=lambda s: None
    )


def test_digits_run_pretrains_then_distils_both_teachers(tmp_path, teachers):
    cfg = config()
    assert cfg.methods["meal_v2"].teachers == {"t1": "t1", "t2": "t2"}
    result = run(cfg, teachers, tmp_path)
    assert [r.method for r in summarize({"meal_v2": [result]})] == ["meal_v2"]
    rows = [json.loads(line) for line in (tmp_path / "meal_v2/seed0/metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["pretrain", "pretrain", "meal_v2", "meal_v2"]
    assert "loss/ce" in rows[0] and "loss/similarity" not in rows[0]
    assert {"loss/similarity", "loss/discriminator"} <= set(rows[2]) and "loss/ce" not in rows[2]
    assert rows[3]["loss/similarity"] < rows[2]["loss/similarity"]
    steps = torch.load(tmp_path / "meal_v2/seed0/final.pt", weights_only=True)["steps"]
    assert {"1.discriminator.layers.0.weight", "1.discriminator.layers.4.bias"} <= set(steps)


class Interrupt(BaseException):
    pass


def interrupt_mid_epoch(monkeypatch, epoch: int, after: int) -> None:
    """Stop the run (like Ctrl-C) after ``after`` training steps of epoch ``epoch`` (0-based), once."""
    original = TrainBatches.epoch
    armed = [True]

    def epoch_fn(self, e, with_transfer):
        batches = original(self, e, with_transfer)
        if not (armed[0] and e == epoch):
            return batches
        armed[0] = False

        def cut():
            for i, b in enumerate(batches):
                if i == after:
                    raise Interrupt
                yield b

        return cut()

    monkeypatch.setattr(TrainBatches, "epoch", epoch_fn)


def final_tensors(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(node, torch.Tensor):
            flat[prefix] = node

    walk("", {k: state[k] for k in ("students", "losses", "steps")})
    return flat


@pytest.mark.parametrize("epoch, mode", [(1, "joint"), (3, "joint"), (3, "grl")])
def test_resume_after_a_mid_epoch_interruption_is_bit_identical(tmp_path, monkeypatch, teachers, epoch, mode):
    cfg = config(f"methods.meal_v2.step.discriminator={mode}")
    straight = run(cfg, teachers, tmp_path / "a")
    interrupt_mid_epoch(monkeypatch, epoch=epoch, after=5)
    with pytest.raises(Interrupt):
        run(cfg, teachers, tmp_path / "b")
    assert torch.load(tmp_path / "b/meal_v2/seed0/checkpoint.pt", weights_only=True)["epoch"] == epoch
    resumed = run(cfg, teachers, tmp_path / "b", resume=True)
    a, b = (
        final_tensors(tmp_path / "a/meal_v2/seed0/final.pt"),
        final_tensors(tmp_path / "b/meal_v2/seed0/final.pt"),
    )
    assert a.keys() == b.keys() and any(".discriminator." in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["networks"] == straight["networks"]
