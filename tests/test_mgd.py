"""MGD: the tubes' layout, the student loss and the tubes' objective against float64 formulas written out
here, the stable-excitation target, the teacher left bit-identical by tube training, gradients, the
two-stage protocol and bad input."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

import relkd.losses as L
import relkd.losses._inputs as loss_inputs
from relkd.losses.mgd import MGDLoss, mgd, mgd_pretrain, stable_target

B, C, FS, FT = 6, 5, 7, 9  # batch, classes, student and teacher embedding widths


# ------------------------------------------------------------------------------------ references
def kl_T(t: torch.Tensor, s: torch.Tensor, T: float) -> float:
    """T^2 / B * sum_b KL(softmax(t_b / T) || softmax(s_b / T)), written out row by row."""
    total = 0.0
    for tb, sb in zip(t.tolist(), s.tolist(), strict=True):
        zt = sum(math.exp(v / T) for v in tb)
        zs = sum(math.exp(v / T) for v in sb)
        for a, b in zip(tb, sb, strict=True):
            p, q = math.exp(a / T) / zt, math.exp(b / T) / zs
            total += p * math.log(p / q)
    return T * T * total / len(t)


def ce_labelled(logits: torch.Tensor, target: list[int]) -> float:
    rows = [(row, y) for row, y in zip(logits.tolist(), target, strict=True) if y >= 0]
    if not rows:
        return 0.0
    return sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in rows) / len(rows)


def mlp(x: torch.Tensor, seq: nn.Sequential) -> torch.Tensor:
    """linear, ReLU, linear, by hand."""
    return torch.relu(x @ seq[0].weight.T + seq[0].bias) @ seq[2].weight.T + seq[2].bias


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, C, generator=g, dtype=torch.float64)
    zt = 3 * torch.randn(B, C, generator=g, dtype=torch.float64)
    fs = torch.randn(B, FS, generator=g, dtype=torch.float64)
    ft = torch.randn(B, FT, generator=g, dtype=torch.float64)
    return zs, zt, fs, ft


def built(**kw) -> MGDLoss:
    torch.manual_seed(0)
    return MGDLoss(student_dim=FS, teacher_dim=FT, num_classes=C, **kw).double()


def codes(loss: MGDLoss, fs: torch.Tensor, ft: torch.Tensor):
    with torch.no_grad():
        s = [mlp(fs, loss.student_tubes.high.encoder), mlp(fs, loss.student_tubes.low.encoder)]
        t = [mlp(ft, loss.teacher_tubes.high.encoder), mlp(ft, loss.teacher_tubes.low.encoder)]
        dec = [mlp(t[0], loss.teacher_tubes.high.decoder), mlp(t[1], loss.teacher_tubes.low.decoder)]
    return s, t, dec


def feats(z: torch.Tensor, f: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"penultimate": f, "logits": z}


# ---------------------------------------------------------------------------------------- tubes
def test_tube_layers_and_shapes():
    loss = built()
    for tubes, dim, decoders in ((loss.student_tubes, FS, False), (loss.teacher_tubes, FT, True)):
        for tube, code in ((tubes.high, 64), (tubes.low, 256)):
            first, act, last = tube.encoder
            assert (first.in_features, first.out_features, last.in_features, last.out_features) == (
                dim,
                dim,
                dim,
                code,
            )
            assert isinstance(act, nn.ReLU)
            assert tube.encode(torch.zeros(B, dim, dtype=torch.float64)).shape == (B, code)
            if decoders:
                first, act, last = tube.decoder
                assert (first.in_features, first.out_features, last.in_features, last.out_features) == (
                    code,
                    dim,
                    dim,
                    C,
                )
                assert isinstance(act, nn.ReLU)
                assert tube.decode(torch.zeros(B, code, dtype=torch.float64)).shape == (B, C)
            else:
                assert tube.decoder is None
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in loss.modules())


def test_pinned_defaults():
    params = inspect.signature(MGDLoss).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    assert defaults == {
        "num_classes": None,
        "teacher_channels": None,
        "T": 4.0,
        "div_weight": 1.0,
        "high_dim": 64,
        "low_dim": 256,
        "high_T": 2.0,
        "low_T": 8.0,
        "stable": False,
    }
    assert MGDLoss.taps == ("penultimate", "logits") and MGDLoss.pretrain is True
    assert isinstance(L.build("mgd", student_dim=3, teacher_dim=3, num_classes=2), MGDLoss)


def test_classes_come_from_the_teachers_logits_tap():
    loss = MGDLoss(student_dim=FS, teacher_dim=FT, teacher_channels=[FT, 11])
    assert loss.teacher_tubes.low.decoder[2].out_features == 11
    with pytest.raises(ValueError, match="give num_classes"):
        MGDLoss(student_dim=FS, teacher_dim=FT)


# ---------------------------------------------------------------------------------- student step
def test_kl_on_encoder_outputs_matches_the_formula():
    g = torch.Generator().manual_seed(1)
    s = [
        torch.randn(B, 64, generator=g, dtype=torch.float64),
        torch.randn(B, 256, generator=g, dtype=torch.float64),
    ]
    t = [
        torch.randn(B, 64, generator=g, dtype=torch.float64),
        torch.randn(B, 256, generator=g, dtype=torch.float64),
    ]
    zs, zt, *_ = data()
    expected = kl_T(t[0], s[0], 2.0) + kl_T(t[1], s[1], 8.0)
    torch.testing.assert_close(mgd(zs, zt, s, t, div_weight=0.0), torch.tensor(expected, dtype=torch.float64))
    expected += 0.7 * kl_T(zt, zs, 4.0)
    torch.testing.assert_close(mgd(zs, zt, s, t, div_weight=0.7), torch.tensor(expected, dtype=torch.float64))


def test_module_loss_reads_the_tubes_encoders():
    loss = built()
    loss.freeze_heads()
    zs, zt, fs, ft = data()
    s, t, _ = codes(loss, fs, ft)
    expected = kl_T(zt, zs, 4.0) + kl_T(t[0], s[0], 2.0) + kl_T(t[1], s[1], 8.0)
    got = loss.distill(feats(zs, fs), feats(zt, ft))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_stable_target_is_the_mean_of_the_three_logits():
    z = torch.tensor([[3.0, 0.0, -3.0]])
    a = torch.tensor([[0.0, 6.0, 0.0]])
    d = torch.tensor([[0.0, 0.0, 9.0]])
    assert stable_target(z, a, d).tolist() == [[1.0, 2.0, 2.0]]
    with pytest.raises(ValueError, match=r"one shape \[B, C\]"):
        stable_target(z, a, torch.zeros(1, 4))


def test_stable_excitation_distils_the_mean_target():
    loss = built(stable=True)
    loss.freeze_heads()
    zs, zt, fs, ft = data()
    s, t, dec = codes(loss, fs, ft)
    target = (zt + dec[0] + dec[1]) / 3
    expected = kl_T(target, zs, 4.0) + kl_T(t[0], s[0], 2.0) + kl_T(t[1], s[1], 8.0)
    got = loss.distill(feats(zs, fs), feats(zt, ft))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_gradcheck_on_the_student_side():
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g).double()
    t = [
        torch.randn(3, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 6, generator=g, dtype=torch.float64),
    ]
    s = [
        torch.randn(3, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 6, generator=g, dtype=torch.float64),
    ]

    def fn(z, a, d):
        return mgd(z, zt, [a, d], t)

    assert torch.autograd.gradcheck(fn, (zs.requires_grad_(), *(x.requires_grad_() for x in s)))


def test_teacher_gets_no_gradient_in_the_student_step():
    loss = built(stable=True)
    loss.freeze_heads()
    zs, zt, fs, ft = (x.requires_grad_() for x in data())
    loss.distill(feats(zs, fs), feats(zt, ft)).backward()
    assert zt.grad is None and ft.grad is None
    assert all(p.grad is None for p in loss.teacher_tubes.parameters())
    assert zs.grad.abs().sum() > 0 and fs.grad.abs().sum() > 0
    encoders = [*loss.student_tubes.high.encoder.parameters(), *loss.student_tubes.low.encoder.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoders)


# ------------------------------------------------------------------------------------- tube stage
def test_pretrain_objective_matches_the_formula():
    loss = built()
    _, zt, _, ft = data()
    target = [0, 3, -1, 4, -1, 1]
    _, _, dec = codes(loss, ft[:, :FS], ft)
    expected = sum(ce_labelled(d, target) + kl_T(zt, d, tau) for d, tau in zip(dec, (2.0, 8.0), strict=True))
    got = loss.pretrain_step(feats(zt, ft), {"target": torch.tensor(target)})
    torch.testing.assert_close(got.detach(), torch.tensor(expected, dtype=torch.float64))
    direct = mgd_pretrain(zt, dec, torch.tensor(target))
    torch.testing.assert_close(direct, torch.tensor(expected, dtype=torch.float64))


def test_unlabelled_rows_leave_only_the_kl():
    loss = built()
    _, zt, _, ft = data()
    _, _, dec = codes(loss, ft[:, :FS], ft)
    expected = kl_T(zt, dec[0], 2.0) + kl_T(zt, dec[1], 8.0)
    got = loss.pretrain_step(feats(zt, ft), {"target": torch.full((B,), -1)})
    torch.testing.assert_close(got.detach(), torch.tensor(expected, dtype=torch.float64))


def test_tube_training_leaves_the_teacher_bit_identical():
    torch.manual_seed(3)
    body = nn.Sequential(nn.Linear(4, FT), nn.BatchNorm1d(FT), nn.ReLU()).double()
    classifier = nn.Linear(FT, C).double()
    teacher = nn.Sequential(body, classifier).eval()  # frozen as the engine keeps it, but not detached
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss = built()
    students = {k: v.clone() for k, v in loss.student_tubes.state_dict().items()}
    tubes = {k: v.clone() for k, v in loss.teacher_tubes.state_dict().items()}
    # every parameter in the optimiser: only the tubes may move
    params = [*loss.parameters(), *teacher.parameters()]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        x = torch.randn(B, 4, generator=g, dtype=torch.float64)
        f = body(x)
        value = loss.pretrain_step(
            feats(classifier(f), f), {"target": torch.randint(0, C, (B,), generator=g)}
        )
        opt.zero_grad()
        value.backward()
        opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(torch.equal(v, students[k]) for k, v in loss.student_tubes.state_dict().items())
    assert not all(torch.equal(v, tubes[k]) for k, v in loss.teacher_tubes.state_dict().items())


def test_freezing_protocol_and_resume_state():
    loss = built()
    loss.freeze_heads()
    assert loss.heads_frozen and not any(p.requires_grad for p in loss.teacher_tubes.parameters())
    assert all(p.requires_grad for p in loss.student_tubes.parameters())
    _, zt, _, ft = data()
    with pytest.raises(RuntimeError, match="pretrain before calling freeze_heads"):
        loss.pretrain_step(feats(zt, ft), {"target": torch.zeros(B, dtype=torch.long)})
    again = built()
    again.load_state_dict(loss.state_dict())
    assert again.heads_frozen


def test_distilling_unfrozen_tubes_freezes_them_with_a_warning(monkeypatch):
    monkeypatch.setattr(loss_inputs, "_warned", set())
    loss = built()
    zs, zt, fs, ft = data()
    with pytest.warns(UserWarning, match="freeze_heads"):
        loss(zs, zt, fs, ft)
    assert loss.heads_frozen


# ------------------------------------------------------------------------------------- bad input
def test_pretraining_needs_labels():
    _, zt, _, ft = data()
    with pytest.raises(KeyError, match=r"batch\['target'\]"):
        built().pretrain_step(feats(zt, ft), {})
    with pytest.raises(ValueError, match=r"target \[B\] for B = 6, got shape \(5,\)"):
        built().pretrain_step(feats(zt, ft), {"target": torch.zeros(5, dtype=torch.long)})


def test_mismatched_batches_raise():
    loss = built()
    loss.freeze_heads()
    zs, zt, fs, ft = data()
    with pytest.raises(ValueError, match="same batch size, got 6 and 4"):
        loss(zs, zt, fs, ft[:4])
    with pytest.raises(ValueError, match="expected features with 7 values per sample, got 9"):
        loss(zs, zt, ft, ft)
