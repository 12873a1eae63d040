"""The foundation losses against independent float64 formulas, module/functional agreement, gradients,
and the invariances their math promises."""

from __future__ import annotations

import pytest
import reference as ref
import torch

import relkd.losses as L
from relkd.graphs import RelationGraph
from relkd.losses import functional as F

B, DS, DT = 12, 7, 10
RTOL = 1e-10


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, DS, generator=g, dtype=torch.float64)
    t = torch.randn(B, DT, generator=g, dtype=torch.float64)
    return s, t


RELATIONAL = [
    ("rkd_distance", F.rkd_distance, ref.rkd_distance),
    ("rkd_angle", F.rkd_angle, ref.rkd_angle),
    ("sp", F.similarity_preserving, ref.sp),
    ("cc", F.correlation_congruence, ref.cc),
    ("pkt", F.pkt, ref.pkt),
]


@pytest.mark.parametrize("name,fn,expected", RELATIONAL, ids=[r[0] for r in RELATIONAL])
def test_matches_reference(pair, name, fn, expected):
    s, t = pair
    torch.testing.assert_close(fn(s, t), expected(s, t), rtol=RTOL, atol=0)


def test_kd_matches_reference():
    g = torch.Generator().manual_seed(1)
    s, t = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    for T in (1.0, 4.0):
        torch.testing.assert_close(F.kd(s, t, T=T), ref.kd(s, t, T=T), rtol=RTOL, atol=0)


def test_rkd_angle_chunking_is_exact(pair):
    s, t = pair
    full = F.rkd_angle(s, t, chunk=B)
    for chunk in (1, 5):
        torch.testing.assert_close(F.rkd_angle(s, t, chunk=chunk), full, rtol=1e-12, atol=0)


def test_feature_maps_are_flattened():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.randn(5, 4, 2, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(F.similarity_preserving(s, t), ref.sp(s.flatten(1), t.flatten(1)))


def test_modules_match_the_reference_formulas(pair):
    """Each module, at its defaults and with options, against the textbook float64 formulas of
    tests/reference.py (written independently of relkd): the weights and options reach the math."""
    s, t = pair
    cases = [
        (L.build("rkd"), 25.0 * ref.rkd_distance(s, t) + 50.0 * ref.rkd_angle(s, t)),
        (L.build("rkd", distance_weight=0.5, angle_weight=0.0), 0.5 * ref.rkd_distance(s, t)),
        (L.SPLoss(), ref.sp(s, t)),
        (L.CCLoss(gamma=0.2, order=3), ref.cc(s, t, gamma=0.2, order=3)),
        (L.PKTLoss(), ref.pkt(s, t)),
    ]
    for module, expected in cases:
        torch.testing.assert_close(module(s, t), expected, rtol=1e-10, atol=0)
    logits_s, logits_t = s[:, :5], t[:, :5]
    torch.testing.assert_close(L.KDLoss(T=2.0)(logits_s, logits_t), ref.kd(logits_s, logits_t, T=2.0))


def test_sum_reduction(pair):
    s, t = pair
    torch.testing.assert_close(F.pkt(s, t, reduction="sum"), F.pkt(s, t) * B**2)
    torch.testing.assert_close(F.rkd_angle(s, t, reduction="sum"), F.rkd_angle(s, t) * B**3)
    with pytest.raises(ValueError, match="reduction"):
        F.pkt(s, t, reduction="batchmean")


def test_graphs_are_accepted_and_shared(pair):
    s, t = pair
    gs, gt = RelationGraph(s), RelationGraph(t)
    total = F.rkd_distance(gs, gt) + F.rkd_angle(gs, gt) + F.similarity_preserving(gs, gt)
    expected = ref.rkd_distance(s, t) + ref.rkd_angle(s, t) + ref.sp(s, t)
    torch.testing.assert_close(total, expected, rtol=RTOL, atol=0)
    assert "gram" in gs._cache and "distance" in gs._cache


@pytest.mark.parametrize("name,fn,expected", RELATIONAL, ids=[r[0] for r in RELATIONAL])
def test_gradcheck(name, fn, expected):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: fn(x, t), (s,))


def test_gradcheck_kd():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: F.kd(x, t, T=3.0), (s,))


@pytest.mark.parametrize("name,fn,expected", RELATIONAL, ids=[r[0] for r in RELATIONAL])
def test_gradient_matches_reference(pair, name, fn, expected):
    s, t = pair
    s1 = s.clone().requires_grad_()
    s2 = s.clone().requires_grad_()
    fn(s1, t).backward()
    expected(s2, t).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("name,fn,expected", RELATIONAL, ids=[r[0] for r in RELATIONAL])
def test_teacher_gets_no_gradient(pair, name, fn, expected):
    s, t = pair
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    fn(s, t).backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("name,fn,expected", RELATIONAL, ids=[r[0] for r in RELATIONAL])
def test_zero_when_student_equals_teacher(pair, name, fn, expected):
    s, _ = pair
    assert abs(float(fn(s, s.clone()))) < 1e-12


def _rotation(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def test_rkd_invariant_to_rotation_translation_scaling(pair):
    s, t = pair
    moved = 3.7 * s @ _rotation(DS, 5) + torch.linspace(-2, 2, DS, dtype=torch.float64)
    for fn in (F.rkd_distance, F.rkd_angle):
        torch.testing.assert_close(fn(moved, t), fn(s, t), rtol=1e-9, atol=0)


def test_scalings_normalised_away(pair):
    s, t = pair
    # SP: a common scale cancels in the row normalisation of the Gram matrix.
    torch.testing.assert_close(F.similarity_preserving(5.0 * s, t), F.similarity_preserving(s, t))
    # CC and PKT work on unit vectors: any positive scale per sample cancels.
    per_sample = torch.linspace(0.1, 9.0, B, dtype=torch.float64)[:, None]
    for fn in (F.correlation_congruence, F.pkt):
        torch.testing.assert_close(fn(per_sample * s, t), fn(s, t), rtol=1e-10, atol=0)
    # All of them are invariant to a rotation of the embedding space.
    for fn in (F.similarity_preserving, F.correlation_congruence, F.pkt):
        torch.testing.assert_close(fn(s @ _rotation(DS, 6), t), fn(s, t), rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------------ CC chain
def test_cc_chain_matches_reference():
    g = torch.Generator().manual_seed(8)
    s, t = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(F.correlation_chain(s, t), ref.cc_chain(s, t), rtol=RTOL, atol=0)
    torch.testing.assert_close(F.correlation_chain(s, t, reduction="sum"), 5 * ref.cc_chain(s, t))
    assert abs(float(F.correlation_chain(s, s.clone()))) == 0.0


def test_cc_chain_gradients_reach_both_embeddings():
    g = torch.Generator().manual_seed(9)
    s = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(F.correlation_chain, (s, t))
    s1, t1 = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    ref.cc_chain(s1, t1).backward()
    F.correlation_chain(s, t).backward()
    torch.testing.assert_close(s.grad, s1.grad, rtol=1e-10, atol=0)
    torch.testing.assert_close(t.grad, t1.grad, rtol=1e-10, atol=0)


def test_cc_chain_module_embeds_both_sides_and_never_reaches_the_teacher(pair):
    s, t = (x.clone().requires_grad_() for x in pair)
    torch.manual_seed(0)
    loss = L.build("cc_chain", student_dim=DS, teacher_dim=DT, feat_dim=3).double()
    value = loss(s, t)
    with torch.no_grad():
        es = s @ loss.embed_s.weight.T + loss.embed_s.bias
        et = t @ loss.embed_t.weight.T + loss.embed_t.bias
    torch.testing.assert_close(value, ref.cc_chain(es, et), rtol=RTOL, atol=0)
    value.backward()
    assert t.grad is None and s.grad is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())


def test_cc_chain_edge_cases(monkeypatch):
    import relkd.losses._inputs as inputs

    monkeypatch.setattr(inputs, "_warned", set())
    s = torch.randn(1, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="no link"):
        value = F.correlation_chain(s, torch.randn(1, 4))
    value.backward()
    assert value == 0 and torch.equal(s.grad, torch.zeros_like(s))
    with pytest.raises(ValueError, match="same shape"):
        F.correlation_chain(torch.randn(3, 4), torch.randn(2, 4))
    loss = L.CCChainLoss(4, 6)
    with pytest.raises(ValueError, match="same batch size, got 3 and 2"):
        loss(torch.randn(3, 4), torch.randn(2, 6))
    with pytest.raises(ValueError, match="student features with 4 values per sample"):
        loss(torch.randn(3, 5), torch.randn(3, 6))


def test_registry():
    assert {"kd", "rkd", "sp", "cc", "cc_chain", "pkt"} <= set(L.available())
    assert isinstance(L.build("cc", gamma=0.1), L.CCLoss)
    with pytest.raises(KeyError, match="Did you mean 'rkd'"):
        L.build("rdk")


@pytest.mark.slow
def test_angle_at_b1024_forward_backward():
    g = torch.Generator().manual_seed(7)
    s = torch.randn(1024, 128, generator=g, requires_grad=True)
    t = torch.randn(1024, 64, generator=g)
    loss = F.rkd_angle(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
