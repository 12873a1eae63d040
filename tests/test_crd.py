"""CRD against the NCE objective written out by hand in float64, the fixed normaliser, both banks."""

from __future__ import annotations

import math

import pytest
import torch

import relkd.losses as L
from relkd.losses.contrast import bank_scores
from relkd.losses.functional import crd

N, DS, DT, FEAT, K, B = 30, 6, 8, 5, 7, 9
T, EPS = 0.07, 1e-7
TARGETS = torch.arange(N) % 3


def make_loss(**kw) -> L.CRDLoss:
    torch.manual_seed(0)
    kw = {"feat_dim": FEAT, "num_negatives": K, "targets": TARGETS, **kw}
    return L.CRDLoss(DS, DT, N, **kw).double()


def batch(b: int = B, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return dict(
        student_feat=torch.randn(b, DS, generator=g).to(dtype).requires_grad_(),
        teacher_feat=torch.randn(b, DT, generator=g).to(dtype).requires_grad_(),
        index=torch.randperm(N, generator=g)[:b],
    )


def fixed_negatives(b: int = B, seed: int = 2, high: int = N) -> torch.Tensor:
    return torch.randint(0, high, (b, K), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------- CRD's objective, written out by hand
def unit(v: torch.Tensor) -> torch.Tensor:
    return v / math.sqrt(float((v * v).sum()))


def ref_embed(f, linear) -> list[torch.Tensor]:
    return [unit(linear.weight @ row + linear.bias) for row in f]


def ref_rows(anchors, positives, bank, negatives) -> list[list[float]]:
    """exp(s / T) for [positive, negatives] per anchor (CRD's ``out_v``, before dividing by Z)."""
    return [
        [math.exp(float(a @ p) / T)] + [math.exp(float(a @ bank[n]) / T) for n in neg]
        for a, p, neg in zip(anchors, positives, negatives.tolist(), strict=True)
    ]


def ref_nce(rows: list[list[float]], z: float) -> float:
    """RepDistiller's ContrastLoss: -(sum log D1 + sum log D0) / B with P = out / Z, Pn = 1 / N."""
    m_pn = K / N
    total = 0.0
    for row in rows:
        p = [x / z for x in row]
        total += math.log(p[0] / (p[0] + m_pn + EPS))
        total += sum(math.log(m_pn / (x + m_pn + EPS)) for x in p[1:])
    return -total / len(rows)


def ref_z(rows: list[list[float]]) -> float:
    return sum(map(sum, rows)) / sum(map(len, rows)) * N


@torch.no_grad()
def ref_crd(loss, bank_s, bank_t, inputs, negatives, z=None, queue=False):
    es = ref_embed(inputs["student_feat"], loss.embed_s.linear)
    et = ref_embed(inputs["teacher_feat"], loss.embed_t.linear)
    idx = inputs["index"].tolist()
    pos_s = et if queue else [bank_t[i] for i in idx]
    pos_t = es if queue else [bank_s[i] for i in idx]
    rows_s = ref_rows(es, pos_s, bank_t, negatives)
    rows_t = ref_rows(et, pos_t, bank_s, negatives)
    z_s, z_t = (ref_z(rows_s), ref_z(rows_t)) if z is None else z
    return ref_nce(rows_s, z_s) + ref_nce(rows_t, z_t), (z_s, z_t)


def banks(loss):
    return loss.student_bank.memory.clone(), loss.teacher_bank.memory.clone()


# ---------------------------------------------------------------------------------------------- tests
def test_first_step_matches_crd_and_sets_the_normaliser():
    loss = make_loss()
    inputs, neg = batch(), fixed_negatives()
    bank_s, bank_t = banks(loss)
    got = loss(**inputs, negatives=neg)
    expected, z = ref_crd(loss, bank_s, bank_t, inputs, neg)
    assert math.isclose(got.item(), expected, rel_tol=1e-10)
    torch.testing.assert_close(loss.normalizer, torch.tensor(z, dtype=torch.float64), rtol=1e-12, atol=0)


def test_later_steps_keep_the_first_normaliser():
    loss = make_loss()
    loss(**batch(seed=1), negatives=fixed_negatives(seed=2))
    z = tuple(loss.normalizer.tolist())
    inputs, neg = batch(seed=3), fixed_negatives(seed=4)
    bank_s, bank_t = banks(loss)
    expected, _ = ref_crd(loss, bank_s, bank_t, inputs, neg, z=z)
    assert math.isclose(loss(**inputs, negatives=neg).item(), expected, rel_tol=1e-10)
    assert tuple(loss.normalizer.tolist()) == z


def test_functional_form_matches_the_method_written_out():
    loss = make_loss()
    inputs, neg = batch(), fixed_negatives()
    bank_s, bank_t = banks(loss)
    s, t = loss.embed_s(inputs["student_feat"]), loss.embed_t(inputs["teacher_feat"])
    idx = inputs["index"]
    got = crd(s, t, bank_s[idx], bank_t[idx], bank_s, bank_t, neg, num_data=N)
    expected, _ = ref_crd(loss, bank_s, bank_t, inputs, neg)
    assert math.isclose(got.item(), expected, rel_tol=1e-10)


def test_banks_move_with_momentum_0_5():
    loss = make_loss()
    inputs = batch()
    bank_s, bank_t = banks(loss)
    loss(**inputs)
    with torch.no_grad():
        es = ref_embed(inputs["student_feat"], loss.embed_s.linear)
        et = ref_embed(inputs["teacher_feat"], loss.embed_t.linear)
    for b, i in enumerate(inputs["index"].tolist()):
        bank_s[i], bank_t[i] = unit(0.5 * bank_s[i] + 0.5 * es[b]), unit(0.5 * bank_t[i] + 0.5 * et[b])
    torch.testing.assert_close(loss.student_bank.memory, bank_s, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss.teacher_bank.memory, bank_t, rtol=1e-12, atol=1e-14)


def test_one_product_and_gather_equals_gathering_bank_rows():
    g = torch.Generator().manual_seed(3)
    anchor = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    bank = torch.randn(50, 6, generator=g, dtype=torch.float64)
    neg = torch.randint(0, 50, (4, 11), generator=g)
    expected = torch.einsum("abd,bkd->abk", anchor, bank[neg])
    torch.testing.assert_close(bank_scores(anchor, bank, neg), expected, rtol=1e-13, atol=0)


def test_gradients_reach_student_and_projections_but_not_the_teacher():
    loss = make_loss()
    inputs = batch()
    loss(**inputs).backward()
    assert inputs["student_feat"].grad is not None and inputs["student_feat"].grad.abs().sum() > 0
    assert inputs["teacher_feat"].grad is None
    for name, p in loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {n.split(".")[0] for n, _ in loss.named_parameters()} == {"embed_s", "embed_t"}


def test_queue_bank_matches_crd_with_current_positives():
    loss = make_loss(bank="queue", queue_size=12, negatives="uniform")
    inputs, neg = batch(), fixed_negatives(high=12)
    queue_s, queue_t = banks(loss)
    got = loss(**inputs, negatives=neg)
    expected, _ = ref_crd(loss, queue_s, queue_t, inputs, neg, queue=True)
    assert math.isclose(got.item(), expected, rel_tol=1e-10)
    with torch.no_grad():
        es = torch.stack(ref_embed(inputs["student_feat"], loss.embed_s.linear))
    torch.testing.assert_close(loss.student_bank.memory[:B], es)
    assert torch.equal(loss.student_bank.memory[B:], queue_s[B:])
    assert int(loss.student_bank.ptr) == B


@pytest.mark.parametrize("bank", ["full", "queue"])
def test_state_dict_round_trip_resumes_exactly(bank):
    law = "other_classes" if bank == "full" else "uniform"
    loss = make_loss(bank=bank, queue_size=12, negatives=law)
    loss(**batch(seed=1))
    fresh = make_loss(bank=bank, queue_size=12, negatives=law)
    torch.manual_seed(123)
    fresh.student_bank.memory.uniform_()
    fresh.load_state_dict(loss.state_dict())
    for key, value in loss.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert (fresh.normalizer > 0).all()
    torch.manual_seed(5)
    a = loss(**batch(seed=3))
    torch.manual_seed(5)
    b = fresh(**batch(seed=3))
    assert torch.equal(a, b)


def test_default_negatives_are_distinct_entries_of_other_classes():
    loss = make_loss()
    index = torch.arange(N)
    negatives = loss.sampler(index, 20)  # every class leaves exactly 20 entries
    assert negatives.device == index.device
    assert not (TARGETS[negatives] == TARGETS[index].unsqueeze(1)).any()
    assert all(
        sorted(row) == [j for j in range(N) if TARGETS[j] != TARGETS[i]]
        for i, row in enumerate(negatives.tolist())
    )


def test_uniform_negatives_may_share_the_class_and_repeat():
    loss = make_loss(negatives="uniform")
    index = torch.zeros(50, dtype=torch.long)
    torch.manual_seed(4)
    negatives = loss.sampler(index, 40)
    assert (TARGETS[negatives] == 0).any()
    assert any(len(set(row)) < 40 for row in negatives.tolist())


def test_the_law_defaults_to_other_classes_with_labels_and_uniform_without():
    assert make_loss().negatives == "other_classes"
    assert make_loss(targets=None).negatives == "uniform"
    assert make_loss(targets=torch.zeros(N, dtype=torch.long)).negatives == "uniform"  # no labels
    assert make_loss(bank="queue").negatives == "uniform"
    assert not make_loss(targets=None).sampler.by_class and make_loss(targets=None).sampler.replacement


def test_negative_law_errors_say_what_to_do():
    with pytest.raises(ValueError, match="needs the labels of the training set as targets"):
        make_loss(targets=None, negatives="other_classes")
    with pytest.raises(ValueError, match="negatives='uniform'"):
        make_loss(bank="queue", negatives="other_classes")
    with pytest.raises(ValueError, match="negatives must be one of"):
        make_loss(negatives="hard")


@pytest.mark.parametrize("b", [1, 2])
def test_tiny_batches_are_finite(b):
    loss = make_loss()
    inputs = batch(b=b)
    out = loss(**inputs)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(inputs["student_feat"].grad).all()


def test_half_inputs_compute_in_float32():
    torch.manual_seed(0)
    loss = L.CRDLoss(DS, DT, N, feat_dim=FEAT, num_negatives=K, targets=TARGETS)
    out = loss(**batch(dtype=torch.float16))
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_eval_mode_changes_no_state():
    loss = make_loss().eval()
    loss(**batch())
    assert (loss.normalizer < 0).all()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    loss(**batch(seed=4))
    assert all(torch.equal(before[k], v) for k, v in loss.state_dict().items())


def test_distill_and_registry_use_the_engine_names():
    kw = dict(student_dim=DS, teacher_dim=DT, num_data=N, targets=torch.arange(N) % 2)
    torch.manual_seed(0)
    direct_loss = L.build("crd", **kw)
    torch.manual_seed(0)
    loss = L.build("crd", **kw)
    assert loss.taps == ("penultimate",) and loss.batch_keys == ("index",)
    inputs = batch(dtype=torch.float32)
    student, teacher = {"penultimate": inputs["student_feat"]}, {"penultimate": inputs["teacher_feat"]}
    torch.manual_seed(1)
    direct = direct_loss(inputs["student_feat"], inputs["teacher_feat"], inputs["index"])
    torch.manual_seed(1)
    assert torch.equal(loss.distill(student, teacher, {"index": inputs["index"]}), direct)
    with pytest.raises(KeyError, match="batch\\['index'\\]"):
        loss.distill(student, teacher)


def test_wrong_feature_width_is_named():
    inputs = batch()
    inputs["student_feat"] = torch.randn(B, DS + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"expected features with {DS} values per sample"):
        make_loss()(**inputs)


@pytest.mark.parametrize("num_data", [10, 1000])
def test_bank_scores_both_forms_exact(num_data):
    """Scoring the whole bank (B*K >= N) and gathering the rows (B*K < N) give a_b . v_n exactly."""
    from relkd.losses.contrast import bank_scores

    g = torch.Generator().manual_seed(0)
    anchor = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    bank = torch.randn(num_data, 6, generator=g, dtype=torch.float64)
    negatives = torch.randint(0, num_data, (4, 5), generator=g)
    expected = torch.empty(2, 4, 5, dtype=torch.float64)
    for s in range(2):
        for b in range(4):
            for k in range(5):
                expected[s, b, k] = (anchor[s, b] * bank[negatives[b, k]]).sum()
    torch.testing.assert_close(bank_scores(anchor, bank, negatives), expected, rtol=1e-12, atol=1e-12)
