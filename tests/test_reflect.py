"""Reflect: the soft cross-entropy at temperature T and its three scales against a written-out float64
formula, its gradient equal to the KL's (they differ by the teacher's entropy), labels never read at
ce_weight 0, no gradient into the teacher, the pinned defaults (T = 5, the code's 1/T^2, no labels), and a
digits run with the shift_scale evaluator turned on."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
import yaml
from torch import nn

from relkd import configs
from relkd.config import load_config
from relkd.experiment import RunDir, run_method, run_teacher
from relkd.methods import STEPS, StageInfo, StepContext
from relkd.methods.reflect import Reflect, reflect_distill

torch.set_num_threads(1)


def softmax(row: list[float], T: float) -> list[float]:
    m = max(row)
    e = [math.exp((v - m) / T) for v in row]
    return [v / sum(e) for v in e]


def reference(student: torch.Tensor, teacher: torch.Tensor, T: float, factor: float) -> float:
    """factor / B * sum_b -sum_c p_t log q_s, p_t = softmax(z_t / T), q_s = softmax(z_s / T)."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        p, q = softmax(t_row, T), softmax(s_row, T)
        total -= sum(pi * math.log(qi) for pi, qi in zip(p, q, strict=True))
    return factor * total / len(student)


def logits(seed: int, b: int = 5, c: int = 6) -> torch.Tensor:
    return 4 * torch.randn(b, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("T", [1.0, 5.0])
def test_value_for_each_scale(T):
    s, t = logits(0), logits(1)
    for scale, factor in (("code", 1 / T**2), ("none", 1.0), ("hinton", T**2)):
        assert reflect_distill(s, t, T, scale).item() == pytest.approx(reference(s, t, T, factor), rel=1e-12)


def test_gradient_is_the_kl_gradient_scaled_by_one_over_t_squared():
    s, t, T = logits(2), logits(3), 5.0

    def kl(z: torch.Tensor) -> torch.Tensor:  # written out: sum p (log p - log q) / B, p from the teacher
        p = torch.exp(t / T) / torch.exp(t / T).sum(1, keepdim=True)
        log_q = z / T - torch.log(torch.exp(z / T).sum(1, keepdim=True))
        return (p * (torch.log(p) - log_q)).sum(1).mean()

    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    reflect_distill(a, t, T, "code").backward()
    (kl(b) / T**2).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)
    # The cross-entropy exceeds the KL by the teacher's entropy, a constant of the student.
    p = torch.softmax(t / T, 1)
    entropy = -(p * torch.log(p)).sum(1).mean()
    assert reflect_distill(s, t, T, "none").item() == pytest.approx((kl(s) + entropy).item(), rel=1e-12)
    assert torch.autograd.gradcheck(lambda z: reflect_distill(z, t, T), (s.clone().requires_grad_(True),))


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"same shape \[B, C\], got \[5, 6\] and \[4, 6\]"):
        reflect_distill(logits(0), logits(1, b=4))
    with pytest.raises(ValueError, match="scale must be one of code, none, hinton, got 'T2'"):
        reflect_distill(logits(0), logits(1), scale="T2")
    with pytest.raises(ValueError, match="temperature T must be positive"):
        Reflect(T=-1.0, students=["s"], teachers=["t"])
    with pytest.raises(ValueError, match="one teacher into one student"):
        Reflect(students=["s"], teachers=[])


class Linear(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def context(target: torch.Tensor, ce_weight: float = 0.0) -> StepContext:
    x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    nets = {"student": Linear(0), "teacher": Linear(1).eval().requires_grad_(False)}
    return StepContext(
        batch={"input": x, "target": target, "index": torch.arange(6)}, epoch=0, step=0, steps_per_epoch=1,
        stage=StageInfo("train", 0, 1, 0, (), ce_weight), networks=nets, students=["student"],
        teachers=["teacher"], terms={}, taps={},
    )  # fmt: skip


def test_step_is_pure_distillation_and_the_teacher_gets_no_gradient():
    step = Reflect(students=["student"], teachers=["teacher"])
    values = []
    for target in (torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3, 3, -1, 0, 2, -1])):
        ctx = context(target)
        out = step(ctx)
        assert set(out.losses) == {"distill"}
        values.append(out.losses["distill"].item())
    assert values[0] == values[1]
    s, t = ctx.networks["student"](ctx.batch["input"]), ctx.networks["teacher"](ctx.batch["input"])
    assert values[0] == pytest.approx(reference(s.double(), t.double(), 5.0, 1 / 25), rel=1e-6)
    out.losses["distill"].backward()
    assert ctx.networks["student"].fc.weight.grad is not None
    assert ctx.networks["teacher"].fc.weight.grad is None
    # With a label weight, the cross-entropy on the labelled rows joins.
    out = Reflect(distill_weight=0.9, students=["student"], teachers=["teacher"])(
        context(torch.arange(6) % 4, 0.1)
    )
    assert set(out.losses) == {"distill", "ce"}
    assert out.losses["distill"].item() == pytest.approx(0.9 * out.metrics["distill"].item())


def test_pinned_defaults():
    assert STEPS.get("reflect") is Reflect
    defaults = {k: p.default for k, p in inspect.signature(Reflect).parameters.items()}
    # util/distill_params.py pure_dstl5_4_crs_slw_mnst: distill_temp 5, student_distill_rate 1
    assert (defaults["T"], defaults["scale"], defaults["distill_weight"]) == (5.0, "code", 1.0)
    method = yaml.safe_load(configs.method_path("reflect").read_text())
    assert method["step"] == {"name": "reflect", "T": 5.0, "scale": "code", "distill_weight": 1.0}
    assert method["train"]["ce_weight"] == 0.0  # student_gold_rate 0


@pytest.mark.slow
def test_digits_run_with_the_shift_scale_evaluator(tmp_path):
    evaluate = "evaluate={shift_scale: {translations: [[1, 0], [0, -1]], scales: [0.75]}}"
    cfg = load_config(None, ["methods=[reflect]", "train.epochs=2", "teacher.train.epochs=2", "seeds=[0]",
                             f"out={tmp_path}", "tensorboard=false", evaluate])[0]  # fmt: skip
    run_dir = RunDir(tmp_path)
    teacher = run_teacher(cfg, run_dir, quiet=True, echo=lambda s: None)
    result = run_method(cfg, "reflect", 0, {"teacher": teacher}, run_dir, quiet=True, echo=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "reflect/seed0/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss/distill"]) for r in rows) and "loss/ce" not in rows[0]
    columns = result["networks"]["student"]
    keys = {"shift_scale/dx1_dy0", "shift_scale/dx0_dy-1", "shift_scale/scale0.75", "shift_scale/mean"}
    assert keys <= set(columns) and all(0.0 <= columns[k] <= 100.0 for k in keys)
    parts = [columns[k] for k in sorted(keys - {"shift_scale/mean"})]
    assert columns["shift_scale/mean"] == pytest.approx(sum(parts) / 3)
