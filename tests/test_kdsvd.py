"""KD-SVD and the SVD graph math: closed forms on features with known singular vectors, the bounded
SVD backward (ties, gradcheck, agreement with the full SVD), sign invariance, gradients, edge cases."""

from __future__ import annotations

import pytest
import torch
from svd_cases import known_features, layers, orthonormal

import relkd.graphs.svd as svd
import relkd.losses as L
from relkd.graphs.svd import (
    align_vectors,
    canonical_sign,
    feature_matrix,
    rbf_correlation,
    truncated_svd,
)
from relkd.losses.kdsvd import KDSVDLoss, kd_svd

# (channels, H, W, singular values) per layer; the last layer has HW < C (the X X^T branch).
TEACHER = [(4, 3, 5, [5.0, 3.0, 2.0, 1.0]), (6, 2, 4, [4.0, 2.5, 1.5, 0.7]), (5, 1, 3, [3.0, 2.0, 1.0])]
STUDENT = [(4, 3, 5, [4.0, 2.0, 1.2, 0.5]), (6, 2, 4, [6.0, 3.0, 2.0, 1.0]), (5, 1, 3, [2.0, 1.5, 0.4])]


def largest_entry_positive(v: torch.Tensor) -> torch.Tensor:
    idx = v.abs().argmax(dim=-2, keepdim=True)
    return v * torch.sign(torch.gather(v, -2, idx))


def expected_kd_svd(
    s_layers, t_layers, k: int, sigma: float = 8.0, reduction: str = "sum", extra_candidates: int = 3
):
    """The loss written out from the known singular vectors, with loops over samples and vectors: the
    student offers its top ``k + extra_candidates`` vectors (all it has when it has fewer)."""
    vecs_s, vecs_t = [], []
    for (_, v_s), (_, v_t), spec in zip(s_layers, t_layers, TEACHER, strict=True):
        weights = torch.tensor(spec[3][:k], dtype=torch.float64)
        weights = weights / weights.norm()
        lay_s, lay_t = [], []
        for b in range(v_t.shape[0]):
            cols_s, cols_t = [], []
            for j in range(k):
                t = largest_entry_positive(v_t[b, :, j : j + 1])[:, 0]
                cands = [v_s[b, :, i] for i in range(min(k + extra_candidates, v_s.shape[-1]))]
                cos = [float(c @ t) for c in cands]
                best = max(range(len(cands)), key=lambda i: abs(cos[i]))
                cols_s.append(cands[best] * (1.0 if cos[best] >= 0 else -1.0) * weights[j])
                cols_t.append(t * weights[j])
            lay_s.append(cols_s)
            lay_t.append(cols_t)
        vecs_s.append(lay_s)
        vecs_t.append(lay_t)
    total = torch.zeros((), dtype=torch.float64)
    for layer in range(len(vecs_s) - 1):
        sq, count = 0.0, 0
        for b in range(len(vecs_s[layer])):
            for j in range(k):
                fs, bs = vecs_s[layer][b][j], vecs_s[layer + 1][b][j]
                ft, bt = vecs_t[layer][b][j], vecs_t[layer + 1][b][j]
                g_s = torch.exp(-((fs[:, None] - bs[None, :]) ** 2) / sigma)
                g_t = torch.exp(-((ft[:, None] - bt[None, :]) ** 2) / sigma)
                sq = sq + ((g_s - g_t) ** 2).sum()
                count += g_s.numel()
        total = total + (sq if reduction == "sum" else sq / count)
    return total


# ------------------------------------------------------------------------------- graph math
def test_feature_matrix_rows_are_positions_and_columns_channels():
    f = torch.arange(2 * 3 * 2 * 5, dtype=torch.float64).reshape(2, 3, 2, 5)
    x = feature_matrix(f)
    assert x.shape == (2, 10, 3)
    for b, c, h, w in [(0, 0, 0, 0), (1, 2, 1, 4), (0, 1, 1, 2)]:
        assert x[b, h * 5 + w, c] == f[b, c, h, w]
    assert feature_matrix(torch.ones(4, 7)).shape == (4, 1, 7)


@pytest.mark.parametrize("hw,c", [(15, 4), (3, 5)], ids=["tall", "wide"])
def test_truncated_svd_recovers_known_singular_pairs(hw, c):
    g = torch.Generator().manual_seed(0)
    s_true = [3.0, 2.0, 1.0]
    maps, v_true = known_features(3, c, 1, hw, s_true, g)
    s, v = truncated_svd(feature_matrix(maps), 2)
    torch.testing.assert_close(s, torch.tensor([s_true[:2]] * 3, dtype=torch.float64))
    cos = (v * v_true[..., :2]).sum(-2)
    torch.testing.assert_close(cos.abs(), torch.ones(3, 2, dtype=torch.float64))


def test_truncated_svd_clips_k_to_the_rank_bound_and_zeroes_null_vectors():
    x = torch.zeros(2, 3, 5, dtype=torch.float64)
    x[:, 0, 1] = 2.0
    s, v = truncated_svd(x, 10)
    assert s.shape == (2, 3) and v.shape == (2, 5, 3)
    torch.testing.assert_close(s[:, 0], torch.full((2,), 2.0, dtype=torch.float64))
    assert (s[:, 1:] == 0).all() and (v[..., 1:] == 0).all()


def sign_free(s: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A scalar that depends on the vectors only through sign-free quantities."""
    return (s * torch.arange(1, s.shape[-1] + 1)).sum() + ((v * w).sum(-2) ** 2).sum() + v.pow(4).sum()


@pytest.mark.parametrize("n,c", [(9, 5), (4, 7)], ids=["tall", "wide"])
def test_truncated_svd_gradient_matches_the_full_svd_on_separated_spectra(n, c):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, n, c, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, 2, generator=g, dtype=torch.float64)
    sign_free(*truncated_svd(x, 2, eps=1e-9), w).backward()
    ours, x.grad = x.grad, None
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    sign_free(s[..., :2], vh.mT[..., :2], w).backward()
    torch.testing.assert_close(ours, x.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("n,c", [(8, 5), (4, 7)], ids=["tall", "wide"])
def test_truncated_svd_gradcheck_default_eps(n, c):
    g = torch.Generator().manual_seed(2)
    maps, _ = known_features(2, c, 1, n, [4.0, 3.0, 2.0, 1.0], g)
    x = feature_matrix(maps).detach().requires_grad_()

    def fn(x):
        s, v = truncated_svd(x, 2)
        return s, canonical_sign(v)

    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("gap", [0.0, 1e-9, 1.5e-4], ids=["tie", "near_tie", "worst_gap"])
@pytest.mark.parametrize("n,c", [(8, 5), (3, 6)], ids=["tall", "wide"])
def test_truncated_svd_gradient_is_finite_and_bounded_on_repeated_singular_values(gap, n, c):
    g = torch.Generator().manual_seed(3)
    maps, _ = known_features(2, c, 1, n, [3.0, 3.0 + gap, 1.0], g)
    x = feature_matrix(maps).detach().requires_grad_()
    w = torch.randn(c, 2, generator=g, dtype=torch.float64)
    s, v = truncated_svd(x, 2)
    ((v * w).sum() + s.sum()).backward()
    # Every 1/(l_j - l_i) is replaced by at most 1 / (2 eps l_max) (eps = 1e-4, l_max = 9; gap 1.5e-4
    # puts l_2 - l_1 at eps l_max, the worst case); dL/dX = X (M + M^T) with |M| <= |P| and P a
    # sum of three such terms in |w| plus the eigenvalue term (ds/dl = 1/(2s) <= 1/6).
    bound = 2 * 3.0 * (3 * w.norm() / (2 * 1e-4 * 9.0) + 1.0)
    assert torch.isfinite(x.grad).all()
    assert x.grad[0].norm() <= bound and x.grad[1].norm() <= bound


def test_canonical_sign_makes_the_largest_entry_positive_whatever_the_input_sign():
    v = torch.tensor([[[0.1, -0.6], [-0.9, 0.3], [0.2, 0.7]]], dtype=torch.float64)
    out = canonical_sign(v)
    torch.testing.assert_close(out, torch.tensor([[[-0.1, -0.6], [0.9, 0.3], [-0.2, 0.7]]]).double())
    torch.testing.assert_close(canonical_sign(-v), out)


def test_align_vectors_picks_the_largest_abs_cosine_with_sign_correction():
    e = torch.eye(3, dtype=torch.float64)
    teacher = e[:, :1].unsqueeze(0)
    cands = torch.stack([0.6 * e[:, 0] + 0.8 * e[:, 1], -0.8 * e[:, 0] + 0.6 * e[:, 1]], -1)
    out = align_vectors(cands.unsqueeze(0), teacher)
    torch.testing.assert_close(out[0, :, 0], 0.8 * e[:, 0] - 0.6 * e[:, 1])
    g = torch.Generator().manual_seed(4)
    s = torch.linalg.qr(torch.randn(5, 6, 3, generator=g, dtype=torch.float64))[0]
    t = torch.linalg.qr(torch.randn(5, 6, 2, generator=g, dtype=torch.float64))[0]
    flips = torch.randint(0, 2, (5, 1, 3), generator=g).double() * 2 - 1
    torch.testing.assert_close(align_vectors(s * flips, t), align_vectors(s, t))


def test_rbf_correlation_closed_form():
    front = torch.tensor([[[0.0], [1.0]]], dtype=torch.float64)
    back = torch.tensor([[[2.0], [0.0], [-1.0]]], dtype=torch.float64)
    out = rbf_correlation(front, back, sigma=8.0)
    d = torch.tensor([[-2.0, 0.0, 1.0], [-1.0, 1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(out, torch.exp(-(d**2) / 8).reshape(1, 1, 2, 3))


# ------------------------------------------------------------------------------------- KD-SVD
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_kd_svd_matches_the_closed_form(k, reduction):
    s_layers, t_layers = layers(STUDENT, 3, seed=5), layers(TEACHER, 3, seed=6)
    out = kd_svd([m for m, _ in s_layers], [m for m, _ in t_layers], k=k, reduction=reduction)
    expected = expected_kd_svd(s_layers, t_layers, k, reduction=reduction)
    assert expected > 0
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("extra", [1, 3], ids=["paper_k+1", "authors_cifar_k+3"])
def test_kd_svd_matches_the_closed_form_for_either_candidate_count(extra):
    s_layers, t_layers = layers(STUDENT, 4, seed=30), layers(TEACHER, 4, seed=31)
    s, t = [m for m, _ in s_layers], [m for m, _ in t_layers]
    out = kd_svd(s, t, extra_candidates=extra)
    torch.testing.assert_close(
        out, expected_kd_svd(s_layers, t_layers, 1, extra_candidates=extra), rtol=1e-9, atol=0
    )
    expected = expected_kd_svd(s_layers, t_layers, 1, extra_candidates=extra)
    torch.testing.assert_close(KDSVDLoss(extra_candidates=extra)(s, t), expected, rtol=1e-9, atol=0)


def permuted_pair(batch: int, seed: int):
    """Teacher and student maps of two layers whose singular vectors are the same four directions, the
    teacher's leading one being the student's fourth."""
    g = torch.Generator().manual_seed(seed)
    s_maps, t_maps = [], []
    for c, h, w in [(4, 3, 5), (6, 2, 4)]:
        s_layer, t_layer = [], []
        for _ in range(batch):
            q, u = orthonormal(c, 4, g), orthonormal(h * w, 4, g)
            values = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
            t_layer.append((u @ values @ q.T).T.reshape(c, h, w))
            s_layer.append((u @ values @ q[:, [1, 2, 3, 0]].T).T.reshape(c, h, w))
        s_maps.append(torch.stack(s_layer))
        t_maps.append(torch.stack(t_layer))
    return s_maps, t_maps


def test_four_candidates_find_the_teachers_vector_in_fourth_place_two_do_not():
    s, t = permuted_pair(3, seed=32)
    assert float(kd_svd(s, t)) < 1e-20  # aligned to the teacher's own vectors: equal graphs
    assert float(kd_svd(s, t, extra_candidates=1)) > 1e-4


def test_module_and_functional_agree_and_registry_builds_it():
    s_layers, t_layers = layers(STUDENT, 2, seed=7), layers(TEACHER, 2, seed=8)
    s, t = [m for m, _ in s_layers], [m for m, _ in t_layers]
    loss = L.build("kd_svd", sigma=4.0)
    assert isinstance(loss, KDSVDLoss) and loss.taps == ("stage1", "stage2", "stage3")
    expected = expected_kd_svd(s_layers, t_layers, 1, sigma=4.0)  # written out, not the code under test
    torch.testing.assert_close(loss(s, t), expected, rtol=1e-9, atol=0)
    feats_s, feats_t = dict(zip(loss.taps, s, strict=True)), dict(zip(loss.taps, t, strict=True))
    torch.testing.assert_close(loss.distill(feats_s, feats_t, {}), expected, rtol=1e-9, atol=0)


def test_random_sign_flips_of_every_singular_vector_leave_the_loss_unchanged(monkeypatch):
    s, t = ([m for m, _ in layers(spec, 3, seed)] for spec, seed in ((STUDENT, 9), (TEACHER, 10)))
    reference = kd_svd(s, t, k=2)
    g = torch.Generator().manual_seed(11)
    plain = svd.truncated_svd

    def flipped(x, k, **kw):
        values, vectors = plain(x, k, **kw)
        signs = torch.randint(0, 2, (vectors.shape[0], 1, vectors.shape[-1]), generator=g) * 2 - 1
        return values, vectors * signs.to(vectors.dtype)

    monkeypatch.setattr(svd, "truncated_svd", flipped)
    for _ in range(3):
        torch.testing.assert_close(kd_svd(s, t, k=2), reference, rtol=1e-12, atol=0)


def test_gradients_reach_the_student_and_connectors_never_the_teacher():
    g = torch.Generator().manual_seed(12)
    s = [torch.randn(4, c, 4, 4, generator=g, requires_grad=True) for c in (3, 8, 16)]
    t = [torch.randn(4, c, 4, 4, generator=g, requires_grad=True) for c in (6, 8, 16)]
    loss = KDSVDLoss(student_channels=[3, 8, 16], teacher_channels=[6, 8, 16])
    assert len(list(loss.parameters())) == 3
    loss(s, t).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.connectors[0].parameters())


def test_gradcheck_on_a_well_separated_case():
    s_layers, t_layers = layers(STUDENT, 2, seed=13), layers(TEACHER, 2, seed=14)
    s = tuple(m.detach().requires_grad_() for m, _ in s_layers)
    t = [m for m, _ in t_layers]
    assert torch.autograd.gradcheck(lambda *s: kd_svd(list(s), t, k=2), s, fast_mode=True)


@pytest.mark.parametrize("case", ["batch_of_one", "repeated", "float16", "zero_map"])
def test_edge_cases_give_finite_losses_and_bounded_gradients(case):
    g = torch.Generator().manual_seed(15)
    spec = [(4, 3, 5, [2.0, 2.0, 1.0]), (6, 2, 4, [3.0, 3.0, 3.0, 1.0]), (5, 1, 3, [1.0, 1.0, 1.0])]
    if case == "repeated":
        s = [known_features(3, *layer, g)[0] for layer in spec]
        t = [known_features(3, *layer, g)[0] for layer in spec]
    else:
        batch = 1 if case == "batch_of_one" else 3
        s = [torch.randn(batch, c, h, w, generator=g) for c, h, w, _ in spec]
        t = [torch.randn(batch, c, h, w, generator=g) for c, h, w, _ in spec]
    if case == "float16":
        s, t = [x.half() for x in s], [x.half() for x in t]
    if case == "zero_map":
        s[1] = torch.zeros_like(s[1])
    s = [x.detach().requires_grad_() for x in s]
    loss = kd_svd(s, t)
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype != torch.float16
    for x in s:
        assert x.grad.dtype == x.dtype and torch.isfinite(x.grad).all() and x.grad.abs().max() < 1e3
    if case == "float16":
        expected = kd_svd([x.float() for x in s], [x.float() for x in t])
        torch.testing.assert_close(loss, expected)


def test_bad_inputs_say_what_to_do():
    s = [torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2)]
    with pytest.raises(ValueError, match="student_channels"):
        kd_svd(s, [torch.randn(2, 4, 3, 3), torch.randn(2, 6, 2, 2)])
    with pytest.raises(ValueError, match="same batch size, got 2 and 3"):
        kd_svd(s, [torch.randn(3, 4, 3, 3), torch.randn(3, 8, 2, 2)])
    with pytest.raises(ValueError, match="at least 2"):
        kd_svd(s[:1], s[:1])
    with pytest.raises(TypeError, match="single tensor"):
        KDSVDLoss()(s[0], s[0])
    with pytest.raises(ValueError, match="k must be >= 1"):
        KDSVDLoss(k=0)
    with pytest.raises(ValueError, match="extra_candidates must be >= 0"):
        KDSVDLoss(extra_candidates=-1)
