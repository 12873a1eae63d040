"""Teacher-free KD: the designed teacher against its closed form, the loss against a written-out float64
KL (both variants, every reduction), unlabelled rows, the legacy mean of ``kd`` used by Tf-KD_self,
gradients, bad input and the pinned defaults."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

import relkd.losses as L
from relkd import configs
from relkd.losses.kd import kd
from relkd.losses.tfkd import TfKDRegLoss, tfkd_reg, tfkd_target


def logits(b: int, k: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(b, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def designed(c: int, k: int, a: float) -> list[float]:
    return [a if j == c else (1 - a) / (k - 1) for j in range(k)]


def ref_target(c: int, k: int, a: float, T: float, variant: str) -> list[float]:
    """code: softmax of the probability vector over T; paper: p^d to the power 1/T, renormalised."""
    pd = designed(c, k, a)
    weights = [math.exp(v / T) for v in pd] if variant == "code" else [v ** (1 / T) for v in pd]
    total = sum(weights)
    return [w / total for w in weights]


def ref_log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def ref_tfkd(z: torch.Tensor, target: list[int], a: float, T: float, variant: str, reduction: str) -> float:
    b, k = z.shape
    total, rows = 0.0, 0
    for i in range(b):
        if target[i] < 0:
            continue
        rows += 1
        q = ref_target(target[i], k, a, T, variant)
        row = z[i].tolist() if variant == "code" else [v / T for v in z[i].tolist()]
        log_p = ref_log_softmax(row)
        total += sum(qj * (math.log(qj) - lp) for qj, lp in zip(q, log_p, strict=True) if qj > 0)
    if reduction == "sum":
        return total
    rows = max(rows, 1)
    return total / rows if reduction == "mean" else total / (rows * k)


# ------------------------------------------------------------------------------- the designed teacher
def test_code_target_is_nearly_uniform_for_100_classes_at_T_20():
    # By hand: exp(0.99 / 20) = 1.050745, exp(0.01 / 99 / 20) = 1.000005; the sum over classes is
    # 1.050745 + 99 * 1.000005 = 100.0512, so q = 0.010502 on the label and 0.009995 elsewhere.
    q = tfkd_target(torch.tensor([3]), 100, a=0.99, T=20.0, variant="code", dtype=torch.float64)[0]
    assert round(float(q[3]), 4) == 0.0105 and round(float(q[0]), 4) == 0.0100
    assert abs(float(q[3]) - 0.010502) < 1e-6 and abs(float(q[0]) - 0.009995) < 1e-6
    expected = ref_target(3, 100, 0.99, 20.0, "code")
    torch.testing.assert_close(q, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("k,a,T", [(10, 0.99, 20.0), (100, 0.9, 40.0), (5, 0.5, 1.0)])
def test_targets_equal_the_closed_forms(k, a, T):
    target = torch.tensor([0, k - 1, 2])
    for variant in ("code", "paper"):
        got = tfkd_target(target, k, a, T, variant, torch.float64)
        expected = torch.tensor([ref_target(int(c), k, a, T, variant) for c in target], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(got.sum(1), torch.ones(3, dtype=torch.float64))


def test_paper_target_at_T_1_is_the_designed_distribution():
    q = tfkd_target(torch.tensor([1]), 4, a=0.7, T=1.0, variant="paper", dtype=torch.float64)[0]
    torch.testing.assert_close(q, torch.tensor([0.1, 0.7, 0.1, 0.1], dtype=torch.float64))


# ------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("variant", ["code", "paper"])
@pytest.mark.parametrize("reduction", ["elementwise_mean", "mean", "sum"])
def test_loss_matches_the_written_out_kl(variant, reduction):
    z, target = logits(6, 7, seed=1), [0, 3, 6, 2, 2, 5]
    got = tfkd_reg(z, torch.tensor(target), a=0.9, T=4.0, variant=variant, reduction=reduction)
    expected = ref_tfkd(z, target, 0.9, 4.0, variant, reduction)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_elementwise_mean_is_the_sum_over_batch_times_classes():
    z, target = logits(5, 8, seed=2), torch.tensor([1, 0, 7, 3, 3])
    total = tfkd_reg(z, target, reduction="sum")
    torch.testing.assert_close(tfkd_reg(z, target), total / (5 * 8), rtol=1e-13, atol=0)
    torch.testing.assert_close(tfkd_reg(z, target, reduction="mean"), total / 5, rtol=1e-13, atol=0)


def test_variant_flag_switches_the_target_and_the_student_temperature():
    z, target = logits(4, 5, seed=3), torch.tensor([0, 1, 2, 3])
    code, paper = TfKDRegLoss(variant="code")(z, target), TfKDRegLoss(variant="paper")(z, target)
    torch.testing.assert_close(
        code,
        torch.tensor(
            ref_tfkd(z, target.tolist(), 0.99, 20.0, "code", "elementwise_mean"), dtype=torch.float64
        ),
    )
    torch.testing.assert_close(
        paper,
        torch.tensor(
            ref_tfkd(z, target.tolist(), 0.99, 20.0, "paper", "elementwise_mean"), dtype=torch.float64
        ),
    )
    assert abs(float(code) - float(paper)) > 1e-3


def test_unlabelled_rows_are_left_out():
    z, target = logits(4, 6, seed=4), torch.tensor([2, 0, 5, 1])
    extra = logits(3, 6, seed=5, scale=1e3)
    zz = torch.cat([z, extra]).requires_grad_()
    with_unlabelled = tfkd_reg(zz, torch.cat([target, torch.full((3,), -1)]))
    torch.testing.assert_close(with_unlabelled, tfkd_reg(z, target), rtol=1e-13, atol=0)
    with_unlabelled.backward()
    assert torch.equal(zz.grad[4:], torch.zeros(3, 6, dtype=torch.float64))
    assert float(zz.grad[:4].abs().sum()) > 0


def test_a_batch_without_labels_gives_zero():
    z = logits(3, 4, seed=6).requires_grad_()
    value = tfkd_reg(z, torch.full((3,), -1))
    value.backward()
    assert float(value.detach()) == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


def test_alpha_zero_leaves_cross_entropy_alone():
    # (1 - alpha) CE + alpha m L at alpha = 0 is CE, value and gradient, even for extreme logits.
    z, target = logits(4, 10, seed=7, scale=1e4), torch.tensor([0, 9, 4, 4])
    for variant in ("code", "paper"):
        x = z.clone().requires_grad_()
        ce = torch.nn.functional.cross_entropy(x, target)
        term = tfkd_reg(x, target, variant=variant)
        assert torch.isfinite(term)
        alpha, m = 0.0, 100.0
        ((1 - alpha) * ce + alpha * m * term).backward()
        y = z.clone().requires_grad_()
        torch.nn.functional.cross_entropy(y, target).backward()
        torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)


def test_gradient_and_no_teacher():
    z, target = logits(5, 4, seed=8).requires_grad_(), torch.tensor([0, 1, 2, 3, -1])
    for variant in ("code", "paper"):
        assert torch.autograd.gradcheck(lambda x, v=variant: tfkd_reg(x, target, variant=v), (z,))
    loss = L.build("tfkd_reg")
    teacher_logits = logits(5, 4, seed=9).requires_grad_()
    value = loss.distill({"logits": z}, {"logits": teacher_logits}, {"target": target})
    value.backward()
    assert teacher_logits.grad is None
    torch.testing.assert_close(loss.distill({"logits": z}, None, {"target": target}), value)


def test_float32_logits_under_bfloat16():
    z, target = logits(4, 5, seed=10).float(), torch.tensor([0, 1, 2, 3])
    value = tfkd_reg(z.bfloat16(), target)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, tfkd_reg(z.bfloat16().float(), target))


# ------------------------------------------------------------------------------- Tf-KD_self: kd's legacy mean
def ref_kd_elementwise(s: torch.Tensor, t: torch.Tensor, T: float) -> float:
    b, k = s.shape
    total = 0.0
    for i in range(b):
        log_ps = ref_log_softmax([v / T for v in s[i].tolist()])
        log_pt = ref_log_softmax([v / T for v in t[i].tolist()])
        total += sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_pt, log_ps, strict=True))
    return T * T * total / (b * k)


def test_kd_elementwise_mean_is_the_legacy_kldivloss_mean():
    s, t = logits(6, 9, seed=11), logits(6, 9, seed=12)
    got = kd(s, t, T=6.0, reduction="elementwise_mean")
    torch.testing.assert_close(
        got, torch.tensor(ref_kd_elementwise(s, t, 6.0), dtype=torch.float64), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(got, kd(s, t, T=6.0, reduction="sum") / (6 * 9), rtol=1e-13, atol=0)
    torch.testing.assert_close(L.build("kd", T=6.0, reduction="elementwise_mean")(s, t), got)
    with pytest.raises(ValueError, match="reduction must be one of"):
        kd(s, t, reduction="batchmean")


def test_kd_default_reduction_is_unchanged():
    s, t = logits(6, 9, seed=13), logits(6, 9, seed=14)
    assert L.build("kd").reduction == "mean"
    torch.testing.assert_close(kd(s, t, T=4.0), 9 * kd(s, t, T=4.0, reduction="elementwise_mean"))


# ------------------------------------------------------------------------------- bad input
def test_bad_input_raises():
    z = logits(4, 5)
    with pytest.raises(ValueError, match="variant must be one of"):
        TfKDRegLoss(variant="both")
    with pytest.raises(ValueError, match="reduction must be one of"):
        tfkd_reg(z, torch.zeros(4, dtype=torch.long), reduction="batchmean")
    with pytest.raises(ValueError, match="must be in"):
        TfKDRegLoss(a=1.5)
    with pytest.raises(ValueError, match="T must be positive"):
        TfKDRegLoss(T=0.0)
    with pytest.raises(ValueError, match="one target per row"):
        tfkd_reg(z, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        tfkd_reg(z[0], torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 classes"):
        tfkd_reg(z[:, :1], torch.zeros(4, dtype=torch.long))
    with pytest.raises(KeyError, match=r"batch\['target'\]"):
        TfKDRegLoss().distill({"logits": z}, None, {"index": torch.arange(4)})


# ------------------------------------------------------------------------------- pinned defaults
def test_defaults():
    loss = L.build("tfkd_reg")
    assert (loss.a, loss.T, loss.variant, loss.reduction) == (0.99, 20.0, "code", "elementwise_mean")
    assert TfKDRegLoss.taps == ("logits",) and TfKDRegLoss.batch_keys == ("target",)
    assert TfKDRegLoss.needs_teacher is False


def test_method_configs():
    reg = yaml.safe_load(configs.method_path("tfkd_reg").read_text())
    alpha, m = 0.1, 100.0
    assert reg["losses"] == {"tfkd_reg": {"weight": alpha * m, "T": 20.0, "a": 0.99, "variant": "code"}}
    assert reg["train"] == {"ce_weight": 1 - alpha}
    self_kd = yaml.safe_load(configs.method_path("tfkd_self").read_text())
    alpha, m = 0.95, 50.0
    assert self_kd["losses"] == {"kd": {"weight": alpha * m, "T": 6.0, "reduction": "elementwise_mean"}}
    assert self_kd["train"]["ce_weight"] == pytest.approx(1 - alpha)
