"""ArcFace against a written-out float64 formula (angles by acos, the margin and its fallback as the
authors write them, the cross-entropy by log-sum-exp), its gradients, unlabelled rows, the module's
classifier and the pinned defaults."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import relkd.losses as L
from relkd.losses import functional as F

K, D = 4, 5


def reference(x, w, y, s, m, easy=False):
    """Mean ArcFace loss over the rows with y >= 0, one row and one class at a time."""
    total, rows = 0.0, 0
    for i in range(x.shape[0]):
        if y[i] < 0:
            continue
        f = x[i] / x[i].norm()
        logits = []
        for j in range(w.shape[0]):
            c = float(f @ (w[j] / w[j].norm()))
            if j == y[i]:
                theta = math.acos(max(-1.0, min(1.0, c)))
                if easy:
                    c = math.cos(theta + m) if c > 0 else c
                else:
                    c = math.cos(theta + m) if theta + m < math.pi else c - m * math.sin(m)
            logits.append(s * c)
        top = max(logits)
        log_sum = top + math.log(sum(math.exp(z - top) for z in logits))
        total += log_sum - logits[int(y[i])]
        rows += 1
    return total / max(rows, 1)


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(K, D, generator=g, dtype=torch.float64)
    x = torch.randn(9, D, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1, -1, 2, 3])
    # Row 0 points almost opposite its class (theta + m > pi for m = 0.5): the fallback branch.
    x[0] = -w[0] + 0.01 * torch.randn(D, generator=g, dtype=torch.float64)
    return x, w, y


@pytest.mark.parametrize(
    "s,m,easy", [(16.0, 0.1, False), (16.0, 0.5, False), (8.0, 0.5, True), (30.0, 0.3, True)]
)
def test_matches_reference(case, s, m, easy):
    x, w, y = case
    value = F.arcface(x, w, y, scale=s, margin=m, easy_margin=easy)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(reference(x, w, y, s, m, easy), rel=1e-10)


def test_both_branches_of_the_margin_are_exercised(case):
    x, w, y = case
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    target_cos = cos[torch.arange(len(y))[y >= 0], y[y >= 0]]
    assert (target_cos < math.cos(math.pi - 0.5)).any() and (target_cos > math.cos(math.pi - 0.5)).any()


def test_zero_margin_is_cross_entropy_of_scaled_cosines(case):
    x, w, y = case
    s = 16.0
    expected, rows = 0.0, 0
    for i in range(x.shape[0]):
        if y[i] < 0:
            continue
        z = [s * float(x[i] @ w[j]) / float(x[i].norm() * w[j].norm()) for j in range(K)]
        expected += math.log(sum(math.exp(v) for v in z)) - z[int(y[i])]
        rows += 1
    value = F.arcface(x, w, y, scale=s, margin=0.0)
    assert value.item() == pytest.approx(expected / rows, rel=1e-10)


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(K, D, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, -1, 1])
    assert torch.autograd.gradcheck(lambda a, b: F.arcface(a, b, y, scale=16.0, margin=0.3), (x, w))


def test_unlabelled_rows_are_left_out(case):
    x, w, y = case
    keep = y >= 0
    torch.testing.assert_close(F.arcface(x, w, y), F.arcface(x[keep], w, y[keep]), rtol=1e-12, atol=0)
    x = x.clone().requires_grad_()
    value = F.arcface(x, w, torch.full((x.shape[0],), -1))
    value.backward()
    assert value.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_gradient_is_finite_on_the_class_direction():
    w = torch.eye(K, D, dtype=torch.float64)
    x = (3.0 * w[:2]).clone().requires_grad_()  # cos(theta) = 1 exactly
    F.arcface(x, w, torch.tensor([0, 1])).backward()
    assert torch.isfinite(x.grad).all()


def test_module_owns_a_unit_row_classifier_and_matches_reference(case):
    x, _, y = case
    torch.manual_seed(0)
    loss = L.build("arcface", student_dim=D, num_classes=K).double()
    assert isinstance(loss.weight, torch.nn.Parameter) and loss.weight.shape == (K, D)
    torch.testing.assert_close(loss.weight.norm(dim=1), torch.ones(K, dtype=torch.float64))
    with torch.no_grad():
        loss.weight.mul_(torch.arange(1.0, K + 1, dtype=torch.float64)[:, None])  # norms do not matter
    torch.testing.assert_close(loss.normalized_weight().norm(dim=1), torch.ones(K, dtype=torch.float64))
    w = loss.weight.detach()
    assert loss(x, y).item() == pytest.approx(reference(x, w, y, 16.0, 0.1), rel=1e-10)
    expected_cos = torch.tensor(
        [[float(x[i] @ w[j] / (x[i].norm() * w[j].norm())) for j in range(K)] for i in range(3)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(loss.cosine(x[:3]), expected_cos, rtol=1e-12, atol=1e-12)


def test_distill_reads_the_student_and_the_labels_only(case):
    x, _, y = case
    loss = L.build("arcface", student_dim=D, num_classes=K).double()
    assert loss.needs_teacher is False and loss.batch_keys == ("target",)
    s = x.clone().requires_grad_()
    t = torch.randn(x.shape[0], 3, dtype=torch.float64, requires_grad=True)
    value = loss.distill({"penultimate": s}, {"penultimate": t}, {"target": y})
    value.backward()
    assert t.grad is None and s.grad.abs().sum() > 0 and loss.weight.grad.abs().sum() > 0
    assert loss.student_step({"penultimate": x}, {"target": y}).item() == pytest.approx(
        value.item(), rel=1e-12
    )
    with pytest.raises(KeyError, match="target"):
        loss.distill({"penultimate": s}, None, {})


def test_num_classes_from_the_training_labels():
    loss = L.build("arcface", student_dim=D, targets=torch.tensor([0, 5, 2, 2]))
    assert loss.num_classes == 6 and loss.weight.shape == (6, D)
    with pytest.raises(ValueError, match="num_classes"):
        L.build("arcface", student_dim=D)
    with pytest.raises(ValueError, match="at least 2 classes"):
        L.build("arcface", student_dim=D, num_classes=1)


def test_bad_inputs_raise_naming_the_shapes(case):
    x, w, y = case
    with pytest.raises(ValueError, match=r"width 5.*\(9, 3\)"):
        F.arcface(x[:, :3], w, y)
    with pytest.raises(ValueError, match="one target per embedding"):
        F.arcface(x, w, y[:4])
    with pytest.raises(ValueError, match="margin"):
        L.build("arcface", student_dim=D, num_classes=K, margin=-0.1)


def test_cosines_stay_float32_under_autocast(case):
    x, w, y = case
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = F.arcface(x.to(torch.bfloat16), w.float(), y)
    assert value.dtype == torch.float32
    expected = F.arcface(x.to(torch.bfloat16).float(), w.float(), y)
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)


def test_pinned_defaults():
    # LCE's configs/res50_arcface.yaml (CLA_S 16, CLA_M 0.1) and ArcFaceLoss(easy_margin=False).
    for fn in (F.arcface, L.ArcFaceLoss):
        params = inspect.signature(fn).parameters
        assert params["scale"].default == 16.0
        assert params["margin"].default == 0.1
        assert params["easy_margin"].default is False
