"""relkd.analysis against float64 references written out here, hand-computed cases and invariances."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import relkd.analysis as A
from relkd.graphs import RelationGraph
from relkd.graphs.agreement import cka

torch.set_num_threads(1)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(_randn(d, d, seed=seed))
    return q


# ------------------------------------------------------------------------------ numpy references
def ref_kernel(x: np.ndarray, kernel: str, threshold: float = 1.0) -> np.ndarray:
    """Linear Gram matrix, or Kornblith et al.'s RBF: exp(-d^2 / (2 t^2 median(d^2)))."""
    x = x.reshape(len(x), -1)
    if kernel == "linear":
        return x @ x.T
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-sq / (2 * threshold**2 * np.median(sq)))


def ref_hsic_biased(k: np.ndarray, l: np.ndarray) -> float:
    """tr(K H L H) / (n - 1)^2."""
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def ref_hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (JMLR 2012), Eq. 5, with the diagonals of K and L set to 0."""
    n = len(k)
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    term = np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    term -= 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return float(term) / (n * (n - 3))


def ref_cka(x, y, kernel="linear", debiased=False) -> float:
    k, l = ref_kernel(np.asarray(x), kernel), ref_kernel(np.asarray(y), kernel)
    h = ref_hsic_unbiased if debiased else ref_hsic_biased
    return h(k, l) / math.sqrt(h(k, k) * h(l, l))


def ref_rsa(x: np.ndarray, y: np.ndarray) -> float:
    """Reflect's second_order_rep_sim, loop by loop."""

    def cos(u, v):
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    n = len(x)
    sx = np.array([[cos(x[i], x[j]) for j in range(n)] for i in range(n)])
    sy = np.array([[cos(y[i], y[j]) for j in range(n)] for i in range(n)])
    return float(np.mean([cos(sx[i], sy[i]) for i in range(n)]))


# ------------------------------------------------------------------------------------------ CKA
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matches_the_textbook_hsic(kernel, debiased):
    x, y = _randn(30, 6, seed=1), _randn(30, 9, seed=2)
    y = y + 0.7 * x @ _randn(6, 9, seed=3)
    expected = ref_cka(x.numpy(), y.numpy(), kernel, debiased)
    assert 0.05 < abs(expected) < 0.99
    assert cka(x, y, kernel, debiased=debiased) == pytest.approx(expected, rel=1e-9)
    assert A.cka is cka


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_a_representation_with_itself_is_one(kernel, debiased):
    x = _randn(25, 7, seed=4)
    assert cka(x, x, kernel, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
    assert cka(RelationGraph(x), x.clone(), kernel, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling(kernel, debiased):
    x, y = _randn(30, 8, seed=5), _randn(30, 5, seed=6)
    moved = 4.2 * x @ _orthogonal(8, seed=7)
    assert cka(x, moved, kernel, debiased=debiased) == pytest.approx(1.0, abs=1e-10)
    assert cka(moved, y, kernel, debiased=debiased) == pytest.approx(
        cka(x, y, kernel, debiased=debiased), rel=1e-9, abs=1e-12
    )


def test_debiased_cka_of_independent_noise_is_near_zero_where_the_biased_one_is_not():
    # D >> N: the biased estimate of two independent high-dimensional samples is close to 1
    # (both centred Gram matrices are close to D H); the unbiased HSIC removes that.
    x, noise = _randn(60, 500, seed=8), _randn(60, 500, seed=9)
    assert cka(x, noise) > 0.8
    assert abs(cka(x, noise, debiased=True)) < 0.05


def test_rbf_bandwidth_follows_the_threshold():
    x, y = _randn(20, 4, seed=10), _randn(20, 6, seed=11)
    k, l = ref_kernel(x.numpy(), "rbf", 0.5), ref_kernel(y.numpy(), "rbf", 0.5)
    expected = ref_hsic_biased(k, l) / math.sqrt(ref_hsic_biased(k, k) * ref_hsic_biased(l, l))
    assert cka(x, y, "rbf", threshold=0.5) == pytest.approx(expected, rel=1e-9)


def test_cka_bad_input():
    with pytest.raises(ValueError, match="unknown CKA kernel 'cosine'"):
        cka(_randn(5, 2), _randn(5, 2), "cosine")
    with pytest.raises(ValueError, match="at least 4 instances, got 3"):
        cka(_randn(3, 2), _randn(3, 2), debiased=True)
    with pytest.raises(ValueError, match="same batch size, got 5 and 6"):
        cka(_randn(5, 2), _randn(6, 2))


# ------------------------------------------------------------------------------- minibatch CKA
def test_minibatch_cka_on_one_batch_is_the_full_batch_debiased_cka():
    x, y = _randn(40, 6, seed=12), _randn(40, 3, seed=13)
    y = y + x[:, :3]
    mb = A.MinibatchCKA()
    mb.update(x, y)
    assert mb.compute().shape == (1, 1)
    assert float(mb.compute()[0, 0]) == pytest.approx(cka(x, y, debiased=True), rel=1e-10)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_streamed_minibatch_cka_equals_the_ratio_of_mean_unbiased_hsics(kernel):
    # Nguyen et al. (ICLR 2021), Eq. 3: mean HSIC_1 over batches, then the CKA ratio; the last batch
    # is smaller and counts as much as the others.
    x, y = _randn(70, 5, seed=14), _randn(70, 4, seed=15)
    y = y + 0.5 * x[:, :4]
    bounds = [(0, 25), (25, 50), (50, 70)]
    mb = A.MinibatchCKA(kernel)
    xy = xx = yy = 0.0
    for lo, hi in bounds:
        mb.update(x[lo:hi], y[lo:hi])
        k, l = ref_kernel(x[lo:hi].numpy(), kernel), ref_kernel(y[lo:hi].numpy(), kernel)
        xy += ref_hsic_unbiased(k, l)
        xx += ref_hsic_unbiased(k, k)
        yy += ref_hsic_unbiased(l, l)
    assert (mb.batches, mb.instances) == (3, 70)
    assert float(mb.compute()[0, 0]) == pytest.approx(xy / math.sqrt(xx * yy), rel=1e-9)


def test_minibatch_cka_fills_the_layer_matrix_and_skips_tiny_batches():
    a = [_randn(30, 4, seed=16), _randn(30, 6, seed=17)]
    b = [_randn(30, 5, seed=18), a[0] @ _orthogonal(4, seed=19), _randn(30, 2, seed=20)]
    mb = A.MinibatchCKA()
    mb.update(a, b)
    mb.update([t[:3] for t in a], [t[:3] for t in b])
    assert mb.skipped == 1 and mb.batches == 1
    m = mb.compute()
    assert m.shape == (2, 3)
    for i, j in itertools.product(range(2), range(3)):
        assert float(m[i, j]) == pytest.approx(cka(a[i], b[j], debiased=True), rel=1e-9, abs=1e-12)
    assert float(m[0, 1]) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="same instances, got sizes \\[29, 30\\]"):
        mb.update(a, [b[0][:29]])
    with pytest.raises(ValueError, match="no batch of at least 4"):
        A.MinibatchCKA().compute()


class _TwoLayer(nn.Module):
    def __init__(self, seed: int, width: int = 6) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(4, width), nn.ReLU())
        self.fc = nn.Linear(width, 3)
        self.default_taps = {"stage1": "body", "penultimate": "fc:input"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _batches(n: int = 60, size: int = 20, seed: int = 21) -> list[dict[str, torch.Tensor]]:
    x = _randn(n, 4, seed=seed).float()
    y = torch.arange(n) % 3
    return [{"input": x[i : i + size], "target": y[i : i + size]} for i in range(0, n, size)]


def test_layer_cka_of_two_networks_against_features_taken_by_hand():
    a, b = _TwoLayer(0), _TwoLayer(1, width=5)
    batches = _batches()
    result = A.layer_cka(a, b, batches, ["body", "logits"], ["stage1", "fc:input", "logits"])
    assert (result.taps_a, result.taps_b) == (["body", "logits"], ["stage1", "fc:input", "logits"])
    sums = np.zeros((3, 2, 3))
    for batch in batches:
        x = batch["input"]
        with torch.no_grad():
            fa = [torch.relu(a.body[0](x)), a(x)]
            hb = torch.relu(b.body[0](x))
            fb = [hb, hb, b(x)]
        ka = [ref_kernel(f.double().numpy(), "linear") for f in fa]
        kb = [ref_kernel(f.double().numpy(), "linear") for f in fb]
        for i, j in itertools.product(range(2), range(3)):
            sums[0, i, j] += ref_hsic_unbiased(ka[i], kb[j])
            sums[1, i, j] += ref_hsic_unbiased(ka[i], ka[i])
            sums[2, i, j] += ref_hsic_unbiased(kb[j], kb[j])
    expected = sums[0] / np.sqrt(sums[1] * sums[2])
    np.testing.assert_allclose(result.matrix.numpy(), expected, rtol=1e-4)
    assert (result.batches, result.instances) == (3, 60)


def test_layer_cka_of_a_network_with_itself_has_a_unit_diagonal_and_default_taps():
    a = _TwoLayer(0)
    assert A.layer_taps(a) == ["stage1", "penultimate", "logits"]
    result = A.layer_cka(a, a, _batches(), max_batches=2)
    assert result.instances == 40
    np.testing.assert_allclose(torch.diagonal(result.matrix).numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(result.matrix.numpy(), result.matrix.T.numpy(), atol=1e-9)
    assert a.training  # the mode is restored


# ------------------------------------------------------------------------------------------ RSA
def test_rsa_matches_reflects_second_order_similarity():
    x, y = _randn(15, 6, seed=22), _randn(15, 4, seed=23)
    expected = ref_rsa(x.numpy(), y.numpy())
    assert 0.1 < expected < 0.99
    assert A.rsa(x, y) == pytest.approx(expected, rel=1e-10)


def test_rsa_hand_case_three_points():
    # x: e1, e2, e1+e2 -> cosines [[1, 0, c], [0, 1, c], [c, c, 1]] with c = 1/sqrt(2);
    # y: three copies of one direction -> all ones. Row cosines: (1 + c) / (sqrt(1 + c^2) sqrt(3)),
    # the same for rows 0 and 1, and (2c + 1) / (sqrt(2c^2 + 1) sqrt(3)) for row 2.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    c = 1 / math.sqrt(2)
    r01 = (1 + c) / (math.sqrt(1 + c * c) * math.sqrt(3))
    r2 = (2 * c + 1) / (math.sqrt(2 * c * c + 1) * math.sqrt(3))
    np.testing.assert_allclose(A.second_order_similarity(x, y).numpy(), [r01, r01, r2], rtol=1e-12)
    assert A.rsa(x, y) == pytest.approx((2 * r01 + r2) / 3, rel=1e-12)


def test_rsa_is_one_for_itself_and_invariant_to_orthogonal_transform_and_scaling():
    x, y = _randn(20, 5, seed=24), _randn(20, 7, seed=25)
    moved = 0.3 * x @ _orthogonal(5, seed=26)
    assert A.rsa(x, x) == pytest.approx(1.0, abs=1e-12)
    assert A.rsa(x, moved) == pytest.approx(1.0, abs=1e-12)
    assert A.rsa(moved, y) == pytest.approx(A.rsa(x, y), rel=1e-10)
    # no centring: a shift changes the cosines
    assert A.rsa(x, x + 3.0) < 0.99


# ---------------------------------------------------------------------------------- predictions
def test_topk_agreement_kl_and_mistakes_by_hand():
    reference = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [0.0, 1.0, 3.0]])
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 0.0, 1.0], [0.0, 1.0, 2.0], [1.0, 2.0, 0.0]])
    # reference top-1: 0, 1, 2, 2; logits top-1: 0, 0, 2, 1; logits top-2: {0,1}, {0,2}, {2,1}, {1,0}
    assert A.topk_agreement(logits, reference) == pytest.approx(2 / 4)
    assert A.topk_agreement(logits, reference, k=2) == pytest.approx(2 / 4)
    assert A.topk_agreement(logits, reference, k=3) == 1.0
    p = torch.softmax(reference.double() / 2, 1).numpy()
    q = torch.softmax(logits.double() / 2, 1).numpy()
    expected = 4 * np.mean([sum(p[n, c] * math.log(p[n, c] / q[n, c]) for c in range(3)) for n in range(4)])
    assert A.prediction_kl(logits, reference, T=2.0) == pytest.approx(expected, rel=1e-12)
    assert A.prediction_kl(reference, reference) == pytest.approx(0.0, abs=1e-15)
    targets = torch.tensor([0, 2, 1, 2])
    # logits (a): right, wrong(0), wrong(2), wrong(1); reference (b): right, wrong(1), wrong(2), right
    table = A.mistakes(logits, reference, targets)
    assert table == A.Mistakes(
        both_correct=1, only_a_correct=0, only_b_correct=1, same_mistake=1, different_mistake=1
    )
    assert (table.common_mistakes, table.total) == (2, 4)
    assert table.fractions()["only_b_correct"] == 0.25
    assert A.mistakes(logits, reference, torch.tensor([0, -1, -1, 2])).total == 2
    assert A.error_rate(logits, targets) == 0.75
    with pytest.raises(ValueError, match=r"same shape, got \(4, 3\) and \(4, 2\)"):
        A.topk_agreement(logits, reference[:, :2])
    with pytest.raises(ValueError, match="k must be between 1 and the 3 classes, got 4"):
        A.topk_agreement(logits, reference, k=4)


def test_predict_concatenates_batches_in_eval_mode():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.9))
    batches = _batches()
    logits, targets = A.predict(model, batches)
    x = torch.cat([b["input"] for b in batches])
    with torch.no_grad():
        expected = model[0](x)
    torch.testing.assert_close(logits, expected)
    assert targets.tolist() == (torch.arange(60) % 3).tolist()
    assert model.training
    _, none = A.predict(model, [b["input"] for b in batches])
    assert (none == -1).all()


# -------------------------------------------------------------------------------- interpolation
def _error(model: nn.Module, batches) -> float:
    with torch.no_grad():
        model.eval()
        x = torch.cat([b["input"] for b in batches])
        y = torch.cat([b["target"] for b in batches])
        out = float((model(x).argmax(1) != y).double().mean())
        model.train()
    return out


def test_interpolation_reproduces_both_ends_and_blends_the_weights():
    a, b = _TwoLayer(2), _TwoLayer(3)
    batches = _batches()
    curve = A.interpolate(a, b, [0.5], batches)
    assert curve.lambdas == [0.0, 0.5, 1.0] and curve.bn == "none"
    assert curve.error[0] == pytest.approx(_error(a, batches), abs=1e-12)
    assert curve.error[-1] == pytest.approx(_error(b, batches), abs=1e-12)
    mid = copy.deepcopy(a)
    with torch.no_grad():
        for pm, pa, pb in zip(mid.parameters(), a.parameters(), b.parameters(), strict=True):
            pm.copy_(0.5 * pa + 0.5 * pb)
    assert curve.error[1] == pytest.approx(_error(mid, batches), abs=1e-12)
    x = torch.cat([t["input"] for t in batches])
    y = torch.cat([t["target"] for t in batches])
    with torch.no_grad():
        assert curve.loss[0] == pytest.approx(
            float(nn.functional.cross_entropy(a.eval()(x).double(), y)), rel=1e-9
        )
    state = A.interpolate_state(a.state_dict(), b.state_dict(), 0.25)
    torch.testing.assert_close(state["fc.bias"], 0.75 * a.fc.bias.detach() + 0.25 * b.fc.bias.detach())


def test_barrier_is_the_height_above_the_chord():
    curve = A.InterpolationCurve([0.0, 0.25, 0.5, 1.0], [0.1, 0.5, 0.4, 0.3], [1.0, 1.0, 1.0, 2.0])
    # chord at 0.25: 0.15 -> 0.35; at 0.5: 0.2 -> 0.2; loss chord at 0.25 is 1.25 -> -0.25, at 0.5 -> -0.5
    assert curve.barrier == pytest.approx(0.35)
    assert curve.loss_barrier == pytest.approx(0.0)


class _BNNet(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.fc1(x))))


def test_recompute_batchnorm_takes_the_mean_of_the_batch_statistics():
    net = _BNNet(4)
    batches = _batches()
    A.recompute_batchnorm(net, batches)
    with torch.no_grad():
        h = [net.fc1(b["input"]) for b in batches]
    torch.testing.assert_close(net.bn.running_mean, torch.stack([t.mean(0) for t in h]).mean(0))
    torch.testing.assert_close(net.bn.running_var, torch.stack([t.var(0) for t in h]).mean(0))
    assert net.bn.momentum == 0.1 and net.training
    A.recompute_batchnorm(net, batches, max_batches=1)
    torch.testing.assert_close(net.bn.running_mean, h[0].mean(0))


def test_interpolation_with_batchnorm_recomputes_or_interpolates_the_statistics():
    a, b = _BNNet(5), _BNNet(6)
    train, test = _batches(seed=30), _batches(seed=31)
    for net in (a, b):
        A.recompute_batchnorm(net, train)
    with pytest.raises(ValueError, match="pass bn_loader"):
        A.interpolate(a, b, [0.5], test)
    with pytest.raises(ValueError, match="bn must be one of"):
        A.interpolate(a, b, [0.5], test, bn="average")
    authors = A.interpolate(a, b, [0.5], test, bn="interpolate")
    assert authors.bn == "interpolate"
    assert authors.error[0] == pytest.approx(_error(a, test)) and authors.error[-1] == pytest.approx(
        _error(b, test)
    )
    ours = A.interpolate(a, b, [0.5], test, bn_loader=train)
    # the ends already carry the statistics of `train`, so recomputing them changes nothing there
    assert ours.bn == "recompute"
    assert ours.error[0] == pytest.approx(_error(a, test)) and ours.error[-1] == pytest.approx(
        _error(b, test)
    )
    mid = copy.deepcopy(a)
    mid.load_state_dict(A.interpolate_state(a.state_dict(), b.state_dict(), 0.5))
    A.recompute_batchnorm(mid, train)
    assert ours.error[1] == pytest.approx(_error(mid, test))
    assert a.bn.num_batches_tracked.dtype == torch.long


def test_interpolation_refuses_two_architectures():
    with pytest.raises(ValueError, match=r"body.0.weight has shapes \(6, 4\) and \(5, 4\)"):
        A.interpolate(_TwoLayer(0), _TwoLayer(1, width=5), [0.5], _batches())
    with pytest.raises(ValueError, match="lambdas must lie in"):
        A.interpolate(_TwoLayer(0), _TwoLayer(1), [1.5], _batches())


# -------------------------------------------------------------------------------- block shuffle
def test_block_shuffle_with_the_image_size_is_the_identity():
    x = _randn(3, 2, 6, 6, seed=32)
    assert torch.equal(A.block_shuffle(x, 6, seed=5), x)
    assert A.block_sizes(6, 6) == [1, 2, 3, 6]


def test_block_shuffle_hand_case_two_by_two_blocks():
    # A 4x4 image has four 2x2 blocks, numbered row by row: 0 top-left, 1 top-right, 2 bottom-left,
    # 3 bottom-right. Output block j is input block perm[j].
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = A.block_shuffle(x, 2, perm=torch.tensor([3, 0, 2, 1]))
    expected = torch.tensor(
        [[10.0, 11.0, 0.0, 1.0], [14.0, 15.0, 4.0, 5.0], [8.0, 9.0, 2.0, 3.0], [12.0, 13.0, 6.0, 7.0]]
    )
    assert torch.equal(out[0, 0], expected)


def test_block_shuffle_moves_whole_pixels_and_one_permutation_for_all_images():
    x = _randn(4, 3, 4, 4, seed=33)
    out = A.block_shuffle(x, 1, seed=7)
    perm = A.block_permutation(16, 7)
    torch.testing.assert_close(out.flatten(2), x.flatten(2)[:, :, perm])
    assert not torch.equal(out, x)
    with pytest.raises(
        ValueError, match=r"block size 3 must divide the image size 4x4; valid sizes: \[1, 2, 4\]"
    ):
        A.block_shuffle(x, 3)
    with pytest.raises(ValueError, match="perm must be a permutation of the 4 blocks"):
        A.block_shuffle(x, 2, perm=torch.tensor([0, 0, 1, 2]))


def test_shuffle_robustness_at_full_size_is_the_accuracy():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = _randn(30, 1, 4, 4, seed=34).float()
    batches = [
        {"input": x[:15], "target": torch.arange(15) % 3},
        {"input": x[15:], "target": torch.arange(15) % 3},
    ]
    curve = A.shuffle_robustness(model, batches)
    assert list(curve) == [1, 2, 4]
    assert curve[4] == pytest.approx(1 - _error(model, batches))
    shuffled = [{**b, "input": A.block_shuffle(b["input"], 2, seed=0)} for b in batches]
    assert curve[2] == pytest.approx(1 - _error(model, shuffled))


# ---------------------------------------------------------------------------------- criticality
def test_criticality_at_alpha_one_is_the_final_error_and_alpha_zero_resets_the_module():
    final, init = _TwoLayer(8), _TwoLayer(9)
    batches = _batches(seed=35)
    before = copy.deepcopy(final.state_dict())
    out = A.module_criticality(final, init, batches, eps=0.5, alphas=[0.0, 0.5, 1.0], sigmas=[0.1])
    assert list(out) == ["body", "fc"]
    for module, c in out.items():
        assert c.sigmas == [0.0, 0.1] and c.error.shape == (3, 2)
        assert float(c.error[2, 0]) == pytest.approx(_error(final, batches), abs=1e-12)
        reset = copy.deepcopy(final)
        getattr(reset, module).load_state_dict(getattr(init, module).state_dict())
        assert float(c.error[0, 0]) == pytest.approx(_error(reset, batches), abs=1e-12)
    for key, value in final.state_dict().items():
        assert torch.equal(value, before[key])  # the network is left as it was
    again = A.module_criticality(
        final, init.state_dict(), batches, eps=0.5, alphas=[0.0, 0.5, 1.0], sigmas=[0.1]
    )
    assert torch.equal(again["fc"].error, out["fc"].error)  # seeded noise


def test_criticality_measure_and_rewind_alpha_from_the_grid():
    error = torch.tensor([[0.9, 0.9, 0.9], [0.05, 0.2, 0.9], [0.0, 0.04, 0.1]], dtype=torch.float64)
    c = A.ModuleCriticality("m", [0.0, 0.5, 1.0], [0.0, 0.1, 0.5], error, distance=2.0, eps=0.1)
    # feasible with sigma > 0: (alpha 1, sigma 0.1) -> 1 * 4 / 0.01 = 400, (1, 0.5) -> 4 / 0.25 = 16
    assert c.rewind_alpha == 0.5
    assert c.criticality == pytest.approx(16.0)
    strict = A.ModuleCriticality("m", [0.0, 0.5, 1.0], [0.0, 0.1, 0.5], error, distance=2.0, eps=0.01)
    assert strict.rewind_alpha == 1.0 and math.isinf(strict.criticality)
    assert strict.as_dict()["criticality"] is None
    assert A.ModuleCriticality("m", [1.0], [0.0], torch.tensor([[0.5]]), 1.0, 0.1).rewind_alpha is None


def test_criticality_bad_input():
    with pytest.raises(ValueError, match="fraction in \\[0, 1\\], got 5"):
        A.module_criticality(_TwoLayer(0), _TwoLayer(1), _batches(), eps=5)
    with pytest.raises(ValueError, match="lacks parameters of the model: \\['fc.weight'"):
        A.module_criticality(
            _TwoLayer(0), {"body.0.weight": torch.zeros(6, 4), "body.0.bias": torch.zeros(6)}, _batches(), 0.1
        )


# ----------------------------------------------------------------------------- parameter distance
def test_parameter_distance_by_hand():
    a = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[0].weight += torch.tensor([[3.0, 0.0], [0.0, 0.0]])
        b[0].bias += torch.tensor([0.0, 4.0])
        b[2].bias -= 12.0
        b[1].running_mean += 100.0  # a buffer, not a parameter
    out = A.parameter_distance(a, b)
    assert out == pytest.approx({"0": 5.0, "1": 0.0, "2": 12.0, "total": 13.0})
    assert A.parameter_distance(a, b.state_dict(), modules=["2", "0"]) == pytest.approx({"2": 12.0, "0": 5.0})
    assert A.module_parameters(a) == {
        "0": ["0.weight", "0.bias"],
        "1": ["1.weight", "1.bias"],
        "2": ["2.weight", "2.bias"],
    }
    with pytest.raises(ValueError, match=r"expected 0.bias of shape \(2,\) on both sides, got nothing"):
        A.parameter_distance(a, {"0.weight": a[0].weight})
    with pytest.raises(KeyError, match="no module 'fc'"):
        A.parameter_distance(a, b, modules=["fc"])


# ------------------------------------------------------------------------------------- figures
def test_figures_draw_the_numbers():
    from relkd.viz.analysis import criticality_map, layer_cka_heatmaps, metric_table, mistakes_bars

    a = A.LayerCKA(torch.tensor([[0.9, 0.2], [0.4, 0.7], [0.1, 0.5]]), ["s1", "s2", "pen"], ["x", "y"], 1, 10)
    b = A.LayerCKA(torch.tensor([[0.3, 0.6]]), ["pen"], ["x", "y"], 1, 10)
    fig = layer_cka_heatmaps({"kd": a, "rkd": b})
    ax_a, ax_b = fig.axes[:2]
    np.testing.assert_allclose(ax_a.images[0].get_array(), a.matrix.numpy())
    assert [t.get_text() for t in ax_a.texts] == ["0.90", "0.20", "0.40", "0.70", "0.10", "0.50"]
    assert [t.get_text() for t in ax_a.get_yticklabels()] == ["s1", "s2", "pen"]
    assert (ax_a.get_title(), ax_b.get_title()) == ("kd", "rkd")
    assert ax_a.images[0].get_clim() == (0.0, 1.0)

    fig = metric_table({"kd": {"rsa": 0.5, "kl": 2.0}, "rkd": {"rsa": 0.9, "kl": None}}, fmt=".1f")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["0.5", "2.0", "0.9", "–"]
    shade = np.asarray(ax.images[0].get_array())
    assert shade[0, 0] == 0.0 and shade[1, 0] == 1.0  # each column on its own range

    err = torch.tensor([[0.9, 0.9], [0.0, 0.5]], dtype=torch.float64)
    results = {
        "kd": {"fc": A.ModuleCriticality("fc", [0.0, 1.0], [0.0, 0.1], err, 1.0, 0.1)},
        "rkd": {"fc": A.ModuleCriticality("fc", [0.0, 1.0], [0.0, 0.1], err + 0.5, 1.0, 0.1)},
    }
    ax = criticality_map(results).axes[0]
    values = np.ma.filled(ax.images[0].get_array(), np.nan)
    assert values[0, 0] == 1.0 and np.isnan(values[1, 0])
    assert [t.get_text() for t in ax.texts] == ["1.0", "–"]

    table = A.Mistakes(
        both_correct=6, only_a_correct=1, only_b_correct=1, same_mistake=2, different_mistake=0
    )
    ax_all, ax_wrong = mistakes_bars({"kd": table}).axes[:2]
    assert [p.get_width() for p in ax_all.patches] == pytest.approx([60.0, 10.0, 10.0, 20.0, 0.0])
    assert [p.get_width() for p in ax_wrong.patches] == pytest.approx([10.0, 10.0, 20.0, 0.0])
