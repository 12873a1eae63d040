"""RSLAD and PGD adversarial training: the KL/C reduction against a written-out float64 formula, the
5/6 adversarial + 1/6 natural split with the attack's direction derived by hand for a linear student,
labels never read, the student attacked in eval mode (BatchNorm moved by the two training forwards
only), PGD-AT's loss on the adversarial labelled rows, bad setups, the pinned defaults of the authors'
codes, and a 2-epoch run of every method of the rslad experiment with finite losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relkd.config import load_config
from relkd.config.methods import load_method
from relkd.evaluation.robust import PixelSpace
from relkd.experiment import RunDir, run_method
from relkd.experiment.suite import run_teacher, used_teachers
from relkd.methods import StageInfo, StepContext
from relkd.methods.pgd_at import PGDAT
from relkd.methods.rslad import RSLAD, rslad_kl

torch.set_num_threads(1)

MEAN, STD = (0.3, 0.6), (0.2, 0.45)
SPACE = PixelSpace(MEAN, STD)
C, K = 2, 4  # image channels, classes
EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "rslad" / "config.yaml"


# --- float64 references, written out --------------------------------------------------------------


def softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def ref_d(student: torch.Tensor, teacher: torch.Tensor, log_eps: float = 1e-5) -> float:
    """(1 / (B C)) sum_b sum_c p_t (log(p_t + eps) - log p_s), by loops."""
    total, b_count, c_count = 0.0, student.shape[0], student.shape[1]
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        p_s, p_t = softmax_row(s_row), softmax_row(t_row)
        total += sum(pt * (math.log(pt + log_eps) - math.log(ps)) for ps, pt in zip(p_s, p_t, strict=True))
    return total / (b_count * c_count)


def linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    net = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0])).double()
    with torch.no_grad():
        net[1].weight.copy_(weight)
        net[1].bias.copy_(bias)
    return net


def pixels(b: int, seed: int) -> torch.Tensor:
    p = torch.rand(b, C, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    p[:, :, 0, 0] = 0.0
    p[:, :, 0, 1] = 1.0
    return p


def stage(ce_weight: float = 0.0) -> StageInfo:
    return StageInfo("train", 0, 1, 0, (), ce_weight)


def context(batch, networks, students=("student",), teachers=("robust",), ce_weight=0.0) -> StepContext:
    return StepContext(
        batch=batch,
        epoch=0,
        step=0,
        steps_per_epoch=1,
        stage=stage(ce_weight),
        networks=networks,
        students=list(students),
        teachers=list(teachers),
        terms={},
        taps={},
    )


# --- the loss ----------------------------------------------------------------------------------------


def test_rslad_kl_is_the_authors_mean_over_batch_and_classes():
    g = torch.Generator().manual_seed(0)
    s = 2 * torch.randn(5, K, generator=g, dtype=torch.float64)
    t = 3 * torch.randn(5, K, generator=g, dtype=torch.float64)
    assert float(rslad_kl(s, t)) == pytest.approx(ref_d(s, t), abs=1e-12)
    # batchmean is the per-image sum: K times the authors' mean over B x K
    assert float(rslad_kl(s, t, reduction="batchmean")) == pytest.approx(K * ref_d(s, t), abs=1e-12)
    assert float(rslad_kl(s, t, log_eps=0.0, reduction="batchmean")) == pytest.approx(
        float(F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")), abs=1e-12
    )


def test_rslad_kl_gradient_and_a_constant_teacher():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, K, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, K, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: rslad_kl(z, t), (s,))
    rslad_kl(s, t).backward()
    assert t.grad is None and s.grad is not None


def test_rslad_kl_bad_inputs():
    with pytest.raises(ValueError, match=r"same shape \[B, C\].*\[2, 4\] and \[3, 4\]"):
        rslad_kl(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="reduction must be one of"):
        rslad_kl(torch.zeros(2, 4), torch.zeros(2, 4), reduction="sum")


# --- the step ----------------------------------------------------------------------------------------


def rslad_setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = C * 9
    w_s, b_s = (
        torch.randn(K, d, generator=g, dtype=torch.float64),
        torch.randn(K, generator=g, dtype=torch.float64),
    )
    w_t, b_t = (
        torch.randn(K, d, generator=g, dtype=torch.float64),
        torch.randn(K, generator=g, dtype=torch.float64),
    )
    nets = {"student": linear(w_s, b_s), "robust": linear(w_t, b_t).eval().requires_grad_(False)}
    return nets, w_s, b_s, w_t, b_t


def test_step_is_five_sixths_adversarial_plus_one_sixth_natural_on_a_hand_derived_attack():
    nets, w_s, b_s, w_t, b_t = rslad_setup()
    p = pixels(6, 2)
    eps, alpha = 0.1, 0.06
    step = RSLAD(
        epsilon=eps,
        step_size=alpha,
        steps=1,
        init_std=0.0,
        students=["student"],
        teachers=["robust"],
        stage=stage(),
        pixels=SPACE,
    )
    out = step(context({"input": SPACE.to_inputs(p)}, nets))
    # The attack by hand: d/dp sum_c p_t (log p_t - log q) = sum_c (q_c - p_t,c) W_ck / std_k, one signed step
    # from the clean pixels, clamped to the ball and the box.
    std = torch.tensor(STD, dtype=torch.float64).repeat_interleave(9)
    mean = torch.tensor(MEAN, dtype=torch.float64).repeat_interleave(9)
    flat = p.flatten(1)
    adv = torch.empty_like(flat)
    for b in range(6):
        x = (flat[b] - mean) / std
        q = softmax_row((w_s @ x + b_s).tolist())
        pt = softmax_row((w_t @ x + b_t).tolist())
        for k in range(C * 9):
            grad = sum((q[c] - pt[c]) * float(w_s[c, k]) / float(std[k]) for c in range(K))
            moved = float(flat[b, k]) + alpha * math.copysign(1.0, grad)
            adv[b, k] = min(max(moved, max(float(flat[b, k]) - eps, 0.0)), min(float(flat[b, k]) + eps, 1.0))
    z_t = ((flat - mean) / std) @ w_t.T + b_t
    z_adv = ((adv - mean) / std) @ w_s.T + b_s
    z_nat = ((flat - mean) / std) @ w_s.T + b_s
    assert float(out.losses["adv"].detach()) == pytest.approx(5 / 6 * ref_d(z_adv, z_t), abs=1e-12)
    assert float(out.losses["nat"].detach()) == pytest.approx(1 / 6 * ref_d(z_nat, z_t), abs=1e-12)
    assert float(out.metrics["kl_adv"]) > float(out.metrics["kl_nat"])  # the attack raised the KL
    assert torch.allclose(out.logits, z_nat, atol=1e-12)


def test_labels_are_never_read():
    nets, *_ = rslad_setup(1)
    step = RSLAD(
        epsilon=0.1,
        step_size=0.03,
        steps=3,
        students=["student"],
        teachers=["robust"],
        stage=stage(),
        pixels=SPACE,
    )
    x = SPACE.to_inputs(pixels(5, 3))
    torch.manual_seed(7)
    bare = step(context({"input": x}, nets))  # no target at all: any read would be a KeyError
    for target in (torch.arange(5) % K, torch.full((5,), -1), torch.tensor([3, 3, 0, 1, 2])):
        torch.manual_seed(7)
        out = step(context({"input": x, "target": target, "index": torch.arange(5)}, nets))
        for key in ("adv", "nat"):
            assert torch.equal(out.losses[key], bare.losses[key])


class BNStudent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(27, K)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_the_student_is_attacked_in_eval_mode_and_trains_on_two_forwards():
    torch.manual_seed(0)
    student = BNStudent().double().train()
    nets = {
        "student": student,
        "robust": linear(torch.randn(K, C * 9, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)),
    }
    modes = []
    student.register_forward_pre_hook(lambda m, a: modes.append(m.bn.training))
    step = RSLAD(
        epsilon=0.1,
        step_size=0.03,
        steps=4,
        students=["student"],
        teachers=["robust"],
        stage=stage(),
        pixels=SPACE,
    )
    out = step(context({"input": SPACE.to_inputs(pixels(6, 4))}, nets))
    assert modes == [False] * 4 + [True, True]  # 4 attack steps in eval mode, then x' and x in training mode
    assert int(student.bn.num_batches_tracked) == 2 and student.training
    assert student.conv.weight.grad is None  # the attack left the gradients alone
    sum(out.losses.values()).backward()
    assert student.conv.weight.grad is not None


def test_bad_setups_raise_clearly():
    common = {"students": ["student"], "teachers": ["robust"]}
    with pytest.raises(ValueError, match="cross-entropy weight must be 0, got ce_weight 1.0"):
        RSLAD(**common, stage=stage(1.0))
    with pytest.raises(ValueError, match="one robust teacher into one student"):
        RSLAD(students=["student"], teachers=[])
    with pytest.raises(ValueError, match="give both mean and std"):
        RSLAD(**common, mean=(0.5,))
    nets, *_ = rslad_setup()
    with pytest.raises(ValueError, match="give the step mean and std"):
        RSLAD(**common)(context({"input": torch.zeros(2, C, 3, 3, dtype=torch.float64)}, nets))
    with pytest.raises(ValueError, match="ce_weight must not be 0"):
        PGDAT(students=["student"], stage=stage(0.0))
    with pytest.raises(ValueError, match="random_start must be one of"):
        PGDAT(students=["student"], random_start="gauss")
    with pytest.raises(ValueError, match="trains one network"):
        PGDAT(students=["a", "b"])


def test_pgd_at_is_the_cross_entropy_on_the_worst_case_of_the_labelled_rows():
    # Two classes, linear: the worst case moves each pixel by epsilon against the sign of the true class's
    # pixel-space margin direction (clipped to the box); unlabelled rows are left out.
    g = torch.Generator().manual_seed(5)
    w, bias = (
        torch.randn(2, C * 9, generator=g, dtype=torch.float64),
        torch.randn(2, generator=g, dtype=torch.float64),
    )
    nets = {"student": linear(w, bias)}
    p = pixels(5, 6)
    target = torch.tensor([0, -1, 1, 1, -1])
    eps = 0.12
    step = PGDAT(
        epsilon=eps,
        step_size=eps / 3,
        steps=6,
        random_start="none",
        students=["student"],
        stage=stage(0.5),
        pixels=SPACE,
    )
    out = step(context({"input": SPACE.to_inputs(p), "target": target}, nets, teachers=(), ce_weight=0.5))
    std = torch.tensor(STD, dtype=torch.float64).repeat_interleave(9)
    mean = torch.tensor(MEAN, dtype=torch.float64).repeat_interleave(9)
    total, labelled = 0.0, [0, 2, 3]
    for b in labelled:
        y = int(target[b])
        d = (w[y] - w[1 - y]) / std
        adv = [
            max(v - eps, 0.0) if dk > 0 else min(v + eps, 1.0)
            for v, dk in zip(p.flatten(1)[b].tolist(), d.tolist(), strict=True)
        ]
        z = ((torch.tensor(adv, dtype=torch.float64) - mean) / std) @ w.T + bias
        total += -math.log(softmax_row(z.tolist())[y])
    # (the cross-entropy is computed in float32, as every relkd step's)
    assert float(out.losses["adv_ce"].detach()) == pytest.approx(0.5 * total / len(labelled), rel=1e-6)
    assert out.logits.shape == (5, 2) and torch.equal(
        out.logits[[1, 4]], torch.zeros(2, 2, dtype=torch.float64)
    )


# --- defaults ----------------------------------------------------------------------------------------


def test_pinned_defaults_are_the_authors_codes():
    # RSLAD resnet18_rslad_cifar10.py: rslad_inner_loss(step_size=2/255, epsilon=8/255, perturb_steps=10),
    # 0.001 N(0, 1) start, loss 5/6 kl(adv) + 1/6 kl(nat) with torch.mean, log(b + 1e-5).
    step = RSLAD(students=["s"], teachers=["t"])
    assert step.attack == {"epsilon": 8 / 255, "step_size": 2 / 255, "steps": 10, "init_std": 0.001}
    assert (step.adv_weight, step.nat_weight, step.scale) == (5 / 6, 1 / 6, 1.0)
    assert (step.reduction, step.log_eps) == ("mean", 1e-5)
    # Madry et al. cifar10_challenge config.json: epsilon 8, 10 steps of 2 (0-255 scale), random start
    assert PGDAT(students=["s"]).attack == {
        "epsilon": 8 / 255,
        "step_size": 2 / 255,
        "steps": 10,
        "random_start": "uniform",
    }
    rslad = load_method("rslad", "rslad")
    assert rslad["teachers"] == {
        "robust": {"like": "teacher", "method": "pgd_at", "data": {"train_subset": None, "unlabeled": False}}
    }
    assert rslad["train"]["ce_weight"] == 0.0 and rslad["losses"] == {}
    assert {k: v for k, v in rslad["step"].items() if k != "name"} == {
        "epsilon": 8 / 255,
        "step_size": 2 / 255,
        "steps": 10,
        "init_std": 0.001,
        "adv_weight": 5 / 6,
        "nat_weight": 1 / 6,
        "scale": 1.0,
        "reduction": "mean",
    }
    pgd_at = load_method("pgd_at", "pgd_at")
    assert pgd_at["step"] == {
        "name": "pgd_at",
        "epsilon": 8 / 255,
        "step_size": 2 / 255,
        "steps": 10,
        "random_start": "uniform",
    }
    assert pgd_at["teachers"] == []


# --- the experiment, two epochs -------------------------------------------------------------------


@pytest.mark.slow
def test_every_method_of_the_rslad_experiment_trains_two_epochs_with_finite_losses(tmp_path):
    cfg = load_config(
        EXPERIMENT,
        [f"out={tmp_path}", "seeds=[0]", "train.epochs=2", "evaluate.robust.steps=5"],
    )[0]
    assert set(cfg.methods) == {"baseline", "kd", "pgd_at", "rslad"}
    run_dir = RunDir(tmp_path)
    trained = {t: run_teacher(cfg, run_dir, t, quiet=True, echo=lambda s: None) for t in used_teachers(cfg)}
    assert list(trained) == ["robust"]
    for name in cfg.methods:
        result = run_method(cfg, name, 0, trained, run_dir, quiet=True, echo=lambda s: None)
        rows = [
            json.loads(line)
            for line in (tmp_path / name / "seed0" / "metrics.jsonl").read_text().splitlines()
        ]
        assert len(rows) == 2
        losses = [v for row in rows for k, v in row.items() if k.startswith("loss/")]
        assert losses and all(math.isfinite(v) for v in losses), name
        assert 0.0 <= result["robust/acc1"] <= 100.0 and result["robust/clean_acc1"] == pytest.approx(
            result["last_acc1"]
        )
    rows = [
        json.loads(line) for line in (tmp_path / "rslad" / "seed0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert {"loss/adv", "loss/nat", "raw/kl_adv", "raw/kl_nat"} <= set(rows[0])
