"""Agreement metrics against hand-computed cases, float64 numpy formulas and their invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relkd.graphs import RelationGraph
from relkd.graphs.agreement import (
    AGREEMENT_KEYS,
    agreement,
    distance_rank_correlation,
    knn_overlap,
    linear_cka,
)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(_randn(d, d, seed=seed))
    return q


def cka_features(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. Eq. 5, feature-space form: ||Yc^T Xc||^2 / (||Xc^T Xc|| ||Yc^T Yc||)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))


def knn_sets(x: np.ndarray, k: int) -> set[tuple[int, int]]:
    """Edges (j, i) with j among the k rows of highest cosine to row i (i itself excluded)."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = u @ u.T
    np.fill_diagonal(cos, -np.inf)
    return {(int(j), i) for i in range(len(x)) for j in np.argsort(-cos[i])[:k]}


def spearman_no_ties(a: np.ndarray, b: np.ndarray) -> float:
    """1 - 6 sum d^2 / (n (n^2 - 1)) on the ranks (exact when no value repeats)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    n = len(a)
    return 1.0 - 6.0 * float(((ra - rb) ** 2).sum()) / (n * (n * n - 1))


def upper(m: np.ndarray) -> np.ndarray:
    return m[np.triu_indices(len(m), 1)]


def distances(x: np.ndarray) -> np.ndarray:
    return np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))


# ----------------------------------------------------------------------------------- kNN overlap
def test_identical_graphs_agree_fully():
    x = _randn(30, 6)
    out = agreement(x, x.clone(), k=4)
    assert list(out) == list(AGREEMENT_KEYS)
    assert out["knn_overlap"] == 1.0
    assert out["cka"] == pytest.approx(1.0, abs=1e-12)
    assert out["distance_spearman"] == pytest.approx(1.0, abs=1e-12)


def test_knn_overlap_hand_computed_four_nodes():
    # Points on a line, nearest neighbour by distance (k=1), edges (neighbour, centre):
    # teacher 0, 1, 3, 7  -> 1->0, 0->1, 1->2, 2->3
    # student 0, 5, 6, 20 -> 1->0, 2->1, 1->2, 2->3
    # shared {1->0, 1->2, 2->3} = 3, union 5
    teacher = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    student = torch.tensor([[0.0], [5.0], [6.0], [20.0]])
    assert knn_overlap(student, teacher, k=1, relation="distance") == pytest.approx(3 / 5)


def test_knn_overlap_matches_set_jaccard():
    s, t = _randn(25, 5, seed=1), _randn(25, 9, seed=2)
    es, et = knn_sets(s.numpy(), 3), knn_sets(t.numpy(), 3)
    expected = len(es & et) / len(es | et)
    assert 0 < expected < 1
    assert knn_overlap(s, t, k=3) == pytest.approx(expected)


def test_knn_overlap_rejects_too_large_k():
    x = _randn(4, 3)
    with pytest.raises(ValueError, match="k=4"):
        knn_overlap(x, x, k=4)


# ------------------------------------------------------------------------------------------ CKA
def test_cka_matches_feature_space_formula_with_different_widths():
    x, y = _randn(40, 6, seed=3), _randn(40, 11, seed=4)
    y = y + 0.8 * x @ _randn(6, 11, seed=5)
    expected = cka_features(x.numpy(), y.numpy())
    assert 0.1 < expected < 0.99
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-10)


def test_cka_invariant_to_orthogonal_transform_isotropic_scaling_and_shift():
    x, y = _randn(40, 8, seed=6), _randn(40, 5, seed=7)
    moved = 3.7 * x @ _orthogonal(8, seed=8) + 2.0
    assert linear_cka(x, moved) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(moved, y) == pytest.approx(linear_cka(x, y), rel=1e-10)


def test_cka_not_invariant_to_anisotropic_scaling():
    x = _randn(40, 4, seed=9)
    stretched = x * torch.tensor([10.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert linear_cka(x, stretched) < 0.99


def test_cka_of_independent_features_is_small():
    # E[CKA] ~ sqrt(D_x D_y) / N = 8 / 1000 for independent Gaussian features.
    assert linear_cka(_randn(1000, 8, seed=10), _randn(1000, 8, seed=11)) < 0.05


def test_cka_symmetric_and_accepts_float32_graphs():
    x, y = _randn(30, 5, seed=12).float(), _randn(30, 7, seed=13).float()
    a = linear_cka(RelationGraph(x), RelationGraph(y))
    assert a == pytest.approx(linear_cka(y, x), rel=1e-6)
    assert a == pytest.approx(cka_features(x.double().numpy(), y.double().numpy()), rel=1e-4)


# ------------------------------------------------------------------------------------- Spearman
def test_spearman_is_one_for_a_nonlinear_monotone_transform_of_distances():
    # d' = sqrt(d) is again Euclidean (Schoenberg); embed it by classical MDS.
    t = _randn(20, 3, seed=14).numpy()
    d = distances(t)
    n = len(t)
    h = np.eye(n) - 1.0 / n
    w, v = np.linalg.eigh(-0.5 * h @ d @ h)
    s = v * np.sqrt(np.clip(w, 0.0, None))
    assert np.allclose(distances(s), np.sqrt(d), atol=1e-8)
    linear = np.corrcoef(upper(distances(s)), upper(d))[0, 1]
    assert linear < 0.999
    assert distance_rank_correlation(torch.from_numpy(s), torch.from_numpy(t)) == pytest.approx(
        1.0, abs=1e-12
    )


def test_spearman_reversed_order_is_minus_one():
    # Distances (d01, d02, d12): teacher (1, 3, 2), student (3, 0.94, 2.62): ranks exactly reversed.
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    s = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.5, 0.8]])
    ds, dt = upper(distances(s.numpy())), upper(distances(t.numpy()))
    assert np.argsort(ds).tolist() == np.argsort(-dt).tolist()
    assert distance_rank_correlation(s, t) == pytest.approx(-1.0)


def test_spearman_matches_rank_formula():
    s, t = _randn(15, 4, seed=15), _randn(15, 6, seed=16)
    expected = spearman_no_ties(upper(distances(s.numpy())), upper(distances(t.numpy())))
    assert distance_rank_correlation(s, t) == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------------ agreement
def test_agreement_equals_the_single_metrics():
    s, t = _randn(32, 6, seed=17), _randn(32, 10, seed=18)
    out = agreement(s, t, k=4, relation="distance")
    assert out["knn_overlap"] == pytest.approx(knn_overlap(s, t, k=4, relation="distance"))
    assert out["cka"] == pytest.approx(linear_cka(s, t), rel=1e-12)
    assert out["distance_spearman"] == pytest.approx(distance_rank_correlation(s, t), abs=1e-12)


def test_agreement_ignores_gradients_and_flattens_feature_maps():
    s = _randn(12, 2, 3, 3, seed=19).requires_grad_()
    out = agreement(s, s.detach().reshape(12, -1) * 2.0, k=3)
    assert out["knn_overlap"] == 1.0 and out["cka"] == pytest.approx(1.0)


def test_agreement_rejects_mismatched_batches_and_batched_graphs():
    with pytest.raises(ValueError, match="same batch size, got 10 and 12"):
        agreement(_randn(10, 3), _randn(12, 3))
    with pytest.raises(ValueError, match="one graph"):
        agreement(RelationGraph(_randn(2, 10, 3)), _randn(10, 3))


def test_a_collapsed_network_has_an_undefined_rank_correlation_and_no_warning():
    """Every probe image mapped to one embedding: no distance order, so Spearman's rho is NaN, said
    without SciPy's ConstantInputWarning in the run's output."""
    import math
    import warnings

    teacher = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    collapsed = torch.ones(12, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = agreement(collapsed, teacher)
    assert math.isnan(result["distance_spearman"])
