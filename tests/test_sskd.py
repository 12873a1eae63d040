"""SSKD: the rotated views and their batch, the 3N x N similarity matrix, the error filter, each KL term
and the teacher head's objective against float64 formulas written out here, gradients, the two-stage
protocol and bad input."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import relkd.losses as L
import relkd.losses._inputs as loss_inputs
from relkd.losses.sskd import (
    SSKDLoss,
    error_filter,
    rotate_views,
    rotation_batch,
    rotation_similarity,
    rotation_sources,
    sskd,
    sskd_pretrain,
)

N, C, D = 3, 5, 6  # source images, classes, embedding width


# ------------------------------------------------------------------------------------ references
def softmax(x: torch.Tensor, T: float) -> torch.Tensor:
    e = torch.exp((x - x.max()) / T)
    return e / e.sum()


def kl(t: torch.Tensor, s: torch.Tensor, T: float) -> float:
    """KL(softmax(t / T) || softmax(s / T)) of one row."""
    p, q = softmax(t, T), softmax(s, T)
    return sum(float(p[c]) * math.log(float(p[c]) / float(q[c])) for c in range(len(p)))


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))


def rank_of(row: torch.Tensor, target: int) -> int:
    return sum(1 for v in row.tolist() if v > float(row[target]))


def kept_rows(scores: torch.Tensor, targets: list[int], ratio: float) -> set[int]:
    """Every correct or unlabelled row, plus the floor(ratio * wrong) wrong rows of smallest rank."""
    ranks = {r: rank_of(scores[r], t) for r, t in enumerate(targets) if t >= 0}
    wrong = sorted((rank, r) for r, rank in ranks.items() if rank > 0)
    keep = set(range(len(targets))) - {r for _, r in wrong}
    return keep | {r for _, r in wrong[: math.floor(ratio * len(wrong))]}


def head(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    first, last = module.net[0], module.net[2]
    return torch.relu(x @ first.weight.T + first.bias) @ last.weight.T + last.bias


def similarity(e: torch.Tensor) -> torch.Tensor:
    """A[(i, k), j] = cos(view k of image i, view 0 of image j), rows ordered (i, k = 1, 2, 3)."""
    n = e.shape[0] // 4
    rows = [[cos(e[4 * i + k], e[4 * j]) for j in range(n)] for i in range(n) for k in (1, 2, 3)]
    return torch.tensor(rows, dtype=torch.float64)


def reference(zs, zt, es, et, labels, w=(0.9, 2.7, 10.0), T=(4.0, 4.0, 0.5), ratios=(1.0, 0.75)):
    n = zs.shape[0] // 4
    normal = [4 * i for i in range(n)]
    rotated = [4 * i + k for i in range(n) for k in (1, 2, 3)]
    kd = T[0] ** 2 * sum(kl(zt[r], zs[r], T[0]) for r in normal) / n
    keep_tf = kept_rows(zt[rotated], [int(labels[r // 4]) for r in rotated], ratios[0])
    tf = T[1] ** 2 * sum(kl(zt[rotated[r]], zs[rotated[r]], T[1]) for r in keep_tf) / max(len(keep_tf), 1)
    a_s, a_t = similarity(es), similarity(et)
    keep_ss = kept_rows(a_t, [r // 3 for r in range(3 * n)], ratios[1])
    ss = T[2] ** 2 * sum(kl(a_t[r], a_s[r], T[2]) for r in keep_ss) / max(len(keep_ss), 1)
    return w[0] * kd + w[1] * tf + w[2] * ss


def inputs(seed: int = 0, n: int = N, d: int = D):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(4 * n, C, generator=g, dtype=torch.float64)
    zt = 3 * torch.randn(4 * n, C, generator=g, dtype=torch.float64)
    es = torch.randn(4 * n, d, generator=g, dtype=torch.float64)
    et = torch.randn(4 * n, d, generator=g, dtype=torch.float64)
    return zs, zt, es, et


def built(student_dim: int = D, teacher_dim: int = D) -> SSKDLoss:
    torch.manual_seed(0)
    return SSKDLoss(student_dim=student_dim, teacher_dim=teacher_dim).double()


# ---------------------------------------------------------------------------------------- views
def test_rotation_layout_on_a_hand_made_image():
    image = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    batch = torch.stack([image, 10 * image]).unsqueeze(1)  # [2, 1, 2, 2]
    views = rotate_views(batch)
    # np.rot90's direction: k = 1 turns [[a, b], [c, d]] into [[b, d], [a, c]]
    expected = [[[1, 2], [3, 4]], [[2, 4], [1, 3]], [[4, 3], [2, 1]], [[3, 1], [4, 2]]]
    assert views.shape == (8, 1, 2, 2)
    for k in range(4):
        assert views[k, 0].tolist() == expected[k]  # image 0, view k: rows 0..3
        assert views[4 + k, 0].tolist() == (10 * torch.tensor(expected[k], dtype=torch.float32)).tolist()


def test_non_square_images_are_refused():
    with pytest.raises(ValueError, match="2x3 image is 3x2"):
        rotate_views(torch.zeros(4, 1, 2, 3))
    with pytest.raises(ValueError, match=r"\[N, \.\.\., H, W\]"):
        rotate_views(torch.zeros(4, 5))


def test_rotation_batch_hides_rotated_rows_from_the_cross_entropy():
    batch = {
        "input": torch.zeros(2, 1, 3, 3),
        "target": torch.tensor([3, -1]),
        "index": torch.tensor([10, 11]),
    }
    out = rotation_batch(batch)
    assert out["input"].shape == (8, 1, 3, 3)
    assert out["target"].tolist() == [3, -1, -1, -1, -1, -1, -1, -1]
    assert out["view_target"].tolist() == [3, 3, 3, 3, -1, -1, -1, -1]
    assert out["index"].tolist() == [10] * 4 + [11] * 4
    assert batch["target"].tolist() == [3, -1]  # the loader's batch is left as it was


# ------------------------------------------------------------------------------------ relations
def test_similarity_matrix_shape_values_and_positives():
    *_, e = inputs()
    a = rotation_similarity(e)
    assert a.shape == (3 * N, N)
    torch.testing.assert_close(a, similarity(e), rtol=1e-12, atol=1e-14)
    assert rotation_sources(N).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_positive_column_is_the_source_image():
    # every view of image i embeds to the same direction, orthogonal to the other images'
    e = (
        torch.eye(4, dtype=torch.float64)[:N].repeat_interleave(4, dim=0)
        * torch.arange(1.0, 4 * N + 1)[:, None]
    )
    a = rotation_similarity(e)
    assert a.argmax(1).tolist() == rotation_sources(N).tolist()
    torch.testing.assert_close(a.max(1).values, torch.ones(3 * N, dtype=torch.float64))


# --------------------------------------------------------------------------------------- filter
FILTER_SCORES = torch.tensor(
    [
        [5.0, 1.0, 2.0, 3.0],  # target 0: rank 0 (correct)
        [1.0, 4.0, 3.0, 0.0],  # target 2: rank 1
        [4.0, 3.0, 2.0, 1.0],  # target 3: rank 3
        [0.0, 9.0, 1.0, 2.0],  # target 1: rank 0 (correct)
        [1.0, 2.0, 3.0, 0.0],  # target 0: rank 2
        [0.0, 5.0, 1.0, 2.0],  # target 3: rank 1
        [1.0, 2.0, 3.0, 4.0],  # unlabelled: kept
    ]
)
FILTER_TARGETS = torch.tensor([0, 2, 3, 1, 0, 3, -1])


@pytest.mark.parametrize(
    "ratio, kept",
    [
        (1.0, [0, 1, 2, 3, 4, 5, 6]),
        (0.75, [0, 1, 3, 4, 5, 6]),  # floor(3) wrong rows: ranks 1, 1, 2
        (0.5, [0, 1, 3, 5, 6]),  # floor(2): the two of rank 1
        (0.25, [0, 1, 3, 6]),  # floor(1): the earlier of the two of rank 1
        (0.0, [0, 3, 6]),
    ],
)
def test_filter_keeps_correct_rows_plus_floor_r_wrong(ratio, kept):
    mask = error_filter(FILTER_SCORES, FILTER_TARGETS, ratio)
    assert mask.nonzero().flatten().tolist() == kept
    assert int(mask.sum()) == 2 + 1 + math.floor(ratio * 4)  # correct + unlabelled + floor(r * wrong)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75, 1.0])
def test_filter_matches_the_reference_on_random_scores(ratio):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(40, 6, generator=g)
    targets = torch.randint(-1, 6, (40,), generator=g)
    mask = error_filter(scores, targets, ratio)
    assert set(mask.nonzero().flatten().tolist()) == kept_rows(scores, targets.tolist(), ratio)


def test_filter_ties_favour_the_target():
    mask = error_filter(torch.tensor([[2.0, 2.0, 1.0]]), torch.tensor([0]), 0.0)
    assert mask.tolist() == [True]


def test_filter_bad_input():
    with pytest.raises(ValueError, match=r"scores \[R, K\] and target \[R\], got \(3, 2\) and \(4,\)"):
        error_filter(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="ratio must be in"):
        error_filter(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), 1.5)


# -------------------------------------------------------------------------------------- the loss
def test_loss_matches_the_written_out_formula():
    zs, zt, es, et = inputs()
    labels = zt[0::4].argmax(1)  # a label the teacher gets right on the unrotated view
    labels[1] = (labels[1] + 1) % C
    expected = reference(zs, zt, es, et, labels.tolist())
    torch.testing.assert_close(sskd(zs, zt, es, et, labels), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize(
    "weights, ratios",
    [
        ({"kd_weight": 1.0, "tf_weight": 0.0, "ss_weight": 0.0}, (1.0, 0.75)),
        ({"kd_weight": 0.0, "tf_weight": 1.0, "ss_weight": 0.0}, (0.5, 0.75)),
        ({"kd_weight": 0.0, "tf_weight": 0.0, "ss_weight": 1.0}, (1.0, 0.4)),
    ],
)
def test_each_kl_against_its_formula(weights, ratios):
    zs, zt, es, et = inputs(seed=1, n=5)
    labels = torch.randint(0, C, (5,), generator=torch.Generator().manual_seed(4))
    w = (weights["kd_weight"], weights["tf_weight"], weights["ss_weight"])
    expected = reference(zs, zt, es, et, labels.tolist(), w=w, T=(3.0, 2.0, 0.7), ratios=ratios)
    got = sskd(
        zs,
        zt,
        es,
        et,
        labels,
        **weights,
        kd_T=3.0,
        tf_T=2.0,
        ss_T=0.7,
        tf_ratio=ratios[0],
        ss_ratio=ratios[1],
    )
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_unlabelled_rows_pass_the_logit_filter():
    zs, zt, es, et = inputs(seed=2)
    labels = torch.full((N,), -1)
    only_tf = {"kd_weight": 0.0, "tf_weight": 1.0, "ss_weight": 0.0, "tf_ratio": 0.0}
    expected = reference(zs, zt, es, et, labels.tolist(), w=(0.0, 1.0, 0.0), ratios=(0.0, 0.75))
    torch.testing.assert_close(
        sskd(zs, zt, es, et, labels, **only_tf), torch.tensor(expected, dtype=torch.float64)
    )
    torch.testing.assert_close(
        sskd(zs, zt, es, et, None, **only_tf), torch.tensor(expected, dtype=torch.float64)
    )


def test_identical_heads_and_features_give_zero_similarity_loss():
    loss = built()
    loss.freeze_heads()
    loss.student_head.load_state_dict(loss.teacher_head.state_dict())
    zs, zt, feat, _ = inputs()
    only_ss = SSKDLoss(student_dim=D, teacher_dim=D, kd_weight=0.0, tf_weight=0.0).double()
    only_ss.load_state_dict(loss.state_dict())
    with torch.no_grad():
        assert float(only_ss(zs, zt, feat, feat.clone())) == pytest.approx(0.0, abs=1e-12)
        assert float(loss(zt, zt, feat, feat.clone())) == pytest.approx(0.0, abs=1e-12)
        assert float(loss(zs, zt, feat, feat.clone())) > 0.0


def test_module_applies_the_heads_then_the_formula():
    loss = built(student_dim=D, teacher_dim=4)
    loss.freeze_heads()
    zs, zt, fs, _ = inputs()
    ft = torch.randn(4 * N, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    batch = {"view_target": labels.repeat_interleave(4), "target": torch.zeros(4 * N, dtype=torch.long)}
    got = loss.distill({"penultimate": fs, "logits": zs}, {"penultimate": ft, "logits": zt}, batch)
    with torch.no_grad():
        es, et = head(fs, loss.student_head), head(ft, loss.teacher_head)
    expected = reference(zs, zt, es, et, labels.tolist())
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_gradcheck_on_the_student_side():
    zs, zt, es, et = inputs(seed=5, n=2, d=3)
    labels = torch.tensor([1, 0])

    def fn(z, e):
        return sskd(z, zt, e, et, labels, ss_ratio=0.5)

    assert torch.autograd.gradcheck(fn, (zs.requires_grad_(), es.requires_grad_()))


def test_teacher_gets_no_gradient_in_the_student_step():
    loss = built()
    loss.freeze_heads()
    zs, zt, fs, ft = (x.requires_grad_() for x in inputs())
    value = loss.distill({"penultimate": fs, "logits": zs}, {"penultimate": ft, "logits": zt})
    value.backward()
    assert zt.grad is None and ft.grad is None
    assert all(p.grad is None for p in loss.teacher_head.parameters())
    assert zs.grad.abs().sum() > 0 and fs.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.student_head.parameters())


def test_one_image_has_no_relation_to_distil():
    zs, zt, es, et = inputs(n=1)
    assert float(sskd(zs, zt, es, et, torch.tensor([0]), kd_weight=0.0, tf_weight=0.0)) == 0.0
    assert torch.isfinite(sskd(zs, zt, es, et, torch.tensor([0])))


# ------------------------------------------------------------------------------------ pretraining
def test_pretrain_objective_is_cross_entropy_to_the_source_image():
    *_, e = inputs()
    a = similarity(e)
    expected = sum(
        -math.log(math.exp(a[r, r // 3]) / sum(math.exp(v) for v in a[r].tolist())) for r in range(3 * N)
    )
    torch.testing.assert_close(sskd_pretrain(e), torch.tensor(expected / (3 * N), dtype=torch.float64))


def test_pretrain_step_trains_only_the_teacher_head():
    loss = built()
    *_, ft = inputs()
    ft.requires_grad_()
    value = loss.pretrain_step({"penultimate": ft, "logits": torch.zeros(4 * N, C)}, {})
    expected = sskd_pretrain(head(ft.detach(), loss.teacher_head).detach())
    torch.testing.assert_close(value.detach(), expected)
    value.backward()
    assert ft.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.teacher_head.parameters())
    assert all(p.grad is None for p in loss.student_head.parameters())


def test_pretraining_the_head_lowers_its_objective():
    loss = built()
    g = torch.Generator().manual_seed(6)
    images = torch.randn(8, D, generator=g, dtype=torch.float64)
    # a rotation moves the teacher's embedding a little: the head has to find the source image
    feats = (images[:, None, :] + 0.3 * torch.randn(8, 4, D, generator=g, dtype=torch.float64)).flatten(0, 1)
    opt = torch.optim.SGD(loss.teacher_head.parameters(), lr=0.5, momentum=0.9)
    first = None
    for _ in range(30):
        value = loss.pretrain_step({"penultimate": feats})
        first = float(value.detach()) if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    assert float(loss.pretrain_step({"penultimate": feats}).detach()) < 0.8 * first


def test_freezing_protocol_and_resume_state():
    loss = built()
    loss.freeze_heads()
    assert loss.heads_frozen and not any(p.requires_grad for p in loss.teacher_head.parameters())
    assert all(p.requires_grad for p in loss.student_head.parameters())
    with pytest.raises(RuntimeError, match="pretrain before calling freeze_heads"):
        loss.pretrain_step({"penultimate": torch.zeros(8, D, dtype=torch.float64)})
    again = built()
    again.load_state_dict(loss.state_dict())
    assert again.heads_frozen


def test_distilling_unfrozen_heads_freezes_them_with_a_warning(monkeypatch):
    monkeypatch.setattr(loss_inputs, "_warned", set())
    loss = built()
    zs, zt, fs, ft = inputs()
    with pytest.warns(UserWarning, match="freeze_heads"):
        loss(zs, zt, fs, ft)
    assert loss.heads_frozen


# ------------------------------------------------------------------------------------- contract
def test_pinned_defaults():
    params = inspect.signature(SSKDLoss).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    assert defaults == {
        "kd_weight": 0.9,
        "tf_weight": 2.7,
        "ss_weight": 10.0,
        "kd_T": 4.0,
        "tf_T": 4.0,
        "ss_T": 0.5,
        "tf_ratio": 1.0,
        "ss_ratio": 0.75,
    }
    assert SSKDLoss.taps == ("penultimate", "logits") and SSKDLoss.pretrain is True
    assert isinstance(L.build("sskd", student_dim=4, teacher_dim=4), SSKDLoss)


def test_heads_are_the_authors_mlp():
    loss = SSKDLoss(student_dim=6, teacher_dim=9)
    for module, dim in ((loss.student_head, 6), (loss.teacher_head, 9)):
        first, act, last = module.net
        assert (first.in_features, first.out_features, last.in_features, last.out_features) == (dim,) * 4
        assert isinstance(act, torch.nn.ReLU)


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((10, C), (10, C), (10, D), (10, D)), "4 views per image"),
        (((8, C), (12, C), (8, D), (12, D)), "same batch size, got 8 and 12"),
        (((8, C), (8, C), (12, D), (12, D)), "same 8 views, got 12 embeddings"),
    ],
)
def test_bad_shapes_raise(shapes, match):
    with pytest.raises(ValueError, match=match):
        sskd(*(torch.randn(*s) for s in shapes))


def test_labels_of_the_wrong_shape_raise():
    zs, zt, es, et = inputs()
    with pytest.raises(ValueError, match=r"labels \[N\] for the N = 3 source images, got shape \(12,\)"):
        sskd(zs, zt, es, et, torch.zeros(12, dtype=torch.long))


def test_a_batch_without_rotated_views_is_refused():
    loss = built()
    loss.freeze_heads()
    zs, zt, fs, ft = inputs()
    with pytest.raises(KeyError, match="rotate4"):
        loss.distill(
            {"penultimate": fs, "logits": zs}, {"penultimate": ft, "logits": zt}, {"target": zs[:, 0]}
        )
