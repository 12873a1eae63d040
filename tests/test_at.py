"""Attention transfer against RepDistiller's formula written out in float64 (loops, adaptive average
pooling by its index rule), the invariances of normalised attention maps, resizing, several stage
pairs, gradients and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

import relkd.losses as L
from relkd import configs
from relkd.losses.at import ATLoss, attention_map, attention_transfer


def ref_attention(f: torch.Tensor, p: float = 2.0) -> list[list[float]]:
    """Per sample: the channel mean of |A|^p at every position (row-major), divided by its L2 norm."""
    b, c, h, w = f.shape
    maps = []
    for i in range(b):
        q = [sum(abs(float(f[i, k, y, x])) ** p for k in range(c)) / c for y in range(h) for x in range(w)]
        norm = math.sqrt(sum(v * v for v in q))
        maps.append([v / max(norm, 1e-12) for v in q])
    return maps


def ref_adaptive_pool(f: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Adaptive average pooling: output cell (i, j) averages rows floor(i H / h) .. ceil((i + 1) H / h)."""
    b, c, h, w = f.shape
    out = torch.zeros(b, c, out_h, out_w, dtype=torch.float64)
    for i in range(out_h):
        r0, r1 = (i * h) // out_h, -((-(i + 1) * h) // out_h)
        for j in range(out_w):
            c0, c1 = (j * w) // out_w, -((-(j + 1) * w) // out_w)
            out[:, :, i, j] = f[:, :, r0:r1, c0:c1].double().mean(dim=(2, 3))
    return out


def ref_repdistiller(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> float:
    """RepDistiller's ``Attention``: pool the larger square map to the smaller one's size, then the
    mean over B * HW of the squared difference of the normalised maps (p = 2), summed over pairs."""
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        s, t = s.double(), t.double()
        if s.shape[2] > t.shape[2]:
            s = ref_adaptive_pool(s, t.shape[2], t.shape[2])
        elif s.shape[2] < t.shape[2]:
            t = ref_adaptive_pool(t, s.shape[2], s.shape[2])
        qs, qt = ref_attention(s), ref_attention(t)
        sq = [(a - b) ** 2 for rs, rt in zip(qs, qt, strict=True) for a, b in zip(rs, rt, strict=True)]
        total += sum(sq) / len(sq)
    return total


def ref_paper(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> float:
    """The paper's form: half the batch mean of the (unsquared) L2 distance of the maps, summed."""
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        qs, qt = ref_attention(s.double()), ref_attention(t.double())
        dist = [
            math.sqrt(sum((a - b) ** 2 for a, b in zip(rs, rt, strict=True)))
            for rs, rt in zip(qs, qt, strict=True)
        ]
        total += 0.5 * sum(dist) / len(dist)
    return total


def maps(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------- attention maps
def test_attention_map_has_unit_norm():
    q = attention_map(maps(5, 3, 4, 6))
    assert q.shape == (5, 24)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(5, dtype=torch.float64), rtol=1e-12, atol=0)


def test_attention_map_of_zero_features_is_zero():
    assert torch.equal(attention_map(torch.zeros(2, 3, 2, 2)), torch.zeros(2, 4))


def test_value_on_a_2x2x3x3_pair():
    s = torch.arange(36, dtype=torch.float64).reshape(2, 2, 3, 3) / 10 - 1.5
    t = torch.cos(torch.arange(36, dtype=torch.float64)).reshape(2, 2, 3, 3)
    expected = ref_repdistiller([s], [t])
    assert expected > 0
    torch.testing.assert_close(attention_transfer(s, t), torch.tensor(expected, dtype=torch.float64))


def test_invariant_to_positive_scaling_of_either_map():
    s, t = maps(4, 3, 5, 5, seed=1), maps(4, 6, 5, 5, seed=2)
    base = attention_transfer(s, t)
    for a, b in [(7.0, 1.0), (1.0, 0.01), (3.0, 250.0)]:
        torch.testing.assert_close(attention_transfer(a * s, b * t), base, rtol=1e-10, atol=1e-14)


def test_zero_exactly_when_the_attention_maps_are_proportional():
    t = maps(3, 4, 4, 4, seed=3)
    # The student's channel mean of squares is 5 times the teacher's: same normalised map.
    s = torch.cat([t * math.sqrt(5.0), -t * math.sqrt(5.0)], dim=1)
    assert float(attention_transfer(s, t)) < 1e-28
    other = maps(3, 4, 4, 4, seed=4)
    assert float(attention_transfer(other, t)) > 1e-4


# ------------------------------------------------------------------------------- shapes
def test_different_channel_counts():
    s, t = maps(6, 3, 4, 4, seed=5), maps(6, 11, 4, 4, seed=6)
    expected = ref_repdistiller([s], [t])
    torch.testing.assert_close(attention_transfer(s, t), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("hs,ht", [(8, 4), (4, 8), (6, 4), (5, 3)], ids=["s2x", "t2x", "s6t4", "s5t3"])
def test_larger_map_is_average_pooled_to_the_smaller(hs, ht):
    s, t = maps(3, 2, hs, hs, seed=7), maps(3, 5, ht, ht, seed=8)
    expected = ref_repdistiller([s], [t])
    torch.testing.assert_close(attention_transfer(s, t), torch.tensor(expected, dtype=torch.float64))


def test_rectangular_maps_are_pooled_per_dimension():
    s, t = maps(2, 3, 6, 2, seed=9), maps(2, 4, 3, 4, seed=10)
    size = (3, 2)
    expected = ref_repdistiller([ref_adaptive_pool(s, *size)], [ref_adaptive_pool(t, *size)])
    torch.testing.assert_close(attention_transfer(s, t), torch.tensor(expected, dtype=torch.float64))


def test_lists_of_stage_pairs_sum_the_pairs():
    student = [maps(4, 2, 8, 8, seed=11), maps(4, 4, 4, 4, seed=12), maps(4, 8, 2, 2, seed=13)]
    teacher = [maps(4, 4, 8, 8, seed=14), maps(4, 8, 2, 2, seed=15), maps(4, 16, 4, 4, seed=16)]
    expected = ref_repdistiller(student, teacher)
    got = attention_transfer(student, teacher)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(
        got, sum(attention_transfer(s, t) for s, t in zip(student, teacher, strict=True))
    )


def test_built_loss_equals_repdistillers_attention_loss_in_float32():
    loss = L.build("at")
    student = [maps(8, 4, 8, 8, seed=17, dtype=torch.float32), maps(8, 8, 4, 4, seed=18, dtype=torch.float32)]
    teacher = [
        maps(8, 16, 8, 8, seed=19, dtype=torch.float32),
        maps(8, 32, 2, 2, seed=20, dtype=torch.float32),
    ]
    value = loss(student, teacher)
    assert value.dtype == torch.float32
    assert abs(float(value) - ref_repdistiller(student, teacher)) < 1e-6
    single = loss(student[0], teacher[0])
    assert abs(float(single) - ref_repdistiller(student[:1], teacher[:1])) < 1e-6


def test_distill_reads_the_three_stages():
    loss = ATLoss()
    student = {f"stage{i}": maps(3, i, 4, 4, seed=20 + i) for i in (1, 2, 3)}
    teacher = {f"stage{i}": maps(3, 2 * i, 4, 4, seed=30 + i) for i in (1, 2, 3)}
    expected = ref_repdistiller(list(student.values()), list(teacher.values()))
    torch.testing.assert_close(loss.distill(student, teacher), torch.tensor(expected, dtype=torch.float64))


def test_paper_form():
    student, teacher = (
        [maps(5, 3, 4, 4, seed=40), maps(5, 2, 2, 2, seed=41)],
        [
            maps(5, 6, 4, 4, seed=42),
            maps(5, 4, 2, 2, seed=43),
        ],
    )
    expected = ref_paper(student, teacher)
    torch.testing.assert_close(
        attention_transfer(student, teacher, form="paper"), torch.tensor(expected, dtype=torch.float64)
    )
    torch.testing.assert_close(
        ATLoss(form="paper")(student, teacher), torch.tensor(expected, dtype=torch.float64)
    )


def test_paper_form_has_a_zero_gradient_at_a_perfect_match():
    t = maps(2, 3, 3, 3, seed=44)
    s = (2 * t).requires_grad_()
    attention_transfer(s, t, form="paper").backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_batch_of_one_has_a_defined_value():
    s, t = maps(1, 2, 3, 3, seed=45), maps(1, 4, 3, 3, seed=46)
    torch.testing.assert_close(attention_transfer(s, t), torch.tensor(ref_repdistiller([s], [t])).double())


# ------------------------------------------------------------------------------- gradients
def test_teacher_gets_no_gradient_and_student_gradient_is_exact():
    s = maps(3, 2, 4, 4, seed=47).requires_grad_()
    t = maps(3, 5, 2, 2, seed=48).requires_grad_()
    attention_transfer(s, t).backward()
    assert t.grad is None and s.grad is not None and float(s.grad.abs().sum()) > 0
    assert torch.autograd.gradcheck(
        lambda x: attention_transfer(x, t.detach()), (s.detach().requires_grad_(),)
    )
    assert torch.autograd.gradcheck(
        lambda x: attention_transfer(x, t.detach(), form="paper"), (s.detach().requires_grad_(),)
    )


def test_bfloat16_features_are_compared_in_float32():
    s, t = maps(4, 3, 4, 4, seed=49, dtype=torch.float32), maps(4, 6, 4, 4, seed=50, dtype=torch.float32)
    value = attention_transfer(s.bfloat16(), t.bfloat16())
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, attention_transfer(s.bfloat16().float(), t.bfloat16().float()))


# ------------------------------------------------------------------------------- bad input
def test_bad_input_raises():
    s, t = maps(4, 2, 3, 3), maps(4, 2, 3, 3)
    with pytest.raises(ValueError, match="same batch size, got 4 and 3"):
        attention_transfer(s, t[:3])
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        attention_transfer(s.flatten(2), t.flatten(2))
    with pytest.raises(ValueError, match="as many student as teacher"):
        attention_transfer([s, s], [t])
    with pytest.raises(TypeError, match="a tensor for the student and a list for the teacher"):
        attention_transfer(s, [t])
    with pytest.raises(ValueError, match="at least one pair"):
        attention_transfer([], [])
    with pytest.raises(ValueError, match="form must be one of"):
        ATLoss(form="squared")
    with pytest.raises(ValueError, match="p must be positive"):
        attention_transfer(s, t, p=0)


# ------------------------------------------------------------------------------- pinned defaults
def test_defaults():
    loss = L.build("at")
    assert isinstance(loss, ATLoss)
    assert loss.p == 2.0 and loss.form == "code"
    assert ATLoss.taps == ("stage1", "stage2", "stage3")


def test_method_config():
    method = yaml.safe_load(configs.method_path("at").read_text())
    assert method["losses"] == {"at": {"weight": 1000.0, "p": 2}}
    assert "ce_weight" not in method.get("train", {}) and "kd" not in method["losses"]
