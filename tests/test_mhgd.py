"""MHGD: distillation and head-pretraining objectives against float64 formulas written out from known
singular vectors, the two-stage protocol (pretrain, freeze, distil), gradients, and edge cases."""

from __future__ import annotations

import importlib

import pytest
import torch
from svd_cases import known_features, layers

import relkd.graphs.svd as svd
import relkd.losses as L
import relkd.losses._inputs as inputs
from relkd.losses.mhgd import MHGDLoss, mhgd, mhgd_pretrain

# The module itself: ``relkd.losses.mhgd`` as an attribute is the re-exported function of that name.
mhgd_module = importlib.import_module("relkd.losses.mhgd")

CHANNELS = [4, 6, 8]
# (channels, H, W, singular values); the last layer has HW < C. Four distinct values: the student
# offers four candidates.
TEACHER = [(4, 3, 5, [5.0, 3.0, 2.0, 1.0]), (6, 2, 4, [4.0, 2.5, 1.5, 0.7]), (8, 1, 5, [3.0, 2.0, 1.5, 1.0])]
STUDENT = [(4, 3, 5, [4.0, 2.0, 1.2, 0.5]), (6, 2, 4, [6.0, 3.0, 2.0, 1.0]), (8, 1, 5, [2.0, 1.5, 0.9, 0.4])]


def teacher_vector(v: torch.Tensor) -> torch.Tensor:
    """Leading vector ``[B, C]`` with its largest-magnitude entry positive."""
    t = v[..., 0]
    return t * torch.sign(t.gather(-1, t.abs().argmax(-1, keepdim=True)))


def student_vector(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """For each sample, the candidate among the top 4 with the largest |cos| to ``t``, sign-corrected."""
    out = []
    for b in range(v.shape[0]):
        cos = [float(v[b, :, i] @ t[b]) for i in range(4)]
        best = max(range(4), key=lambda i: abs(cos[i]))
        out.append(v[b, :, best] * (1.0 if cos[best] >= 0 else -1.0))
    return torch.stack(out)


def randomize(loss: MHGDLoss, seed: int) -> MHGDLoss:
    """Random batch-norm statistics and affine parameters, so the formula's every term matters."""
    g = torch.Generator().manual_seed(seed)
    loss.double()
    with torch.no_grad():
        for m in loss.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return loss


def linear_bn(x, block, batch: bool):
    y = x @ block.linear.weight.T
    bn = block.bn
    if batch:
        mean, var = y.mean(0), y.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return (y - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias


def attention(head, front, back, batch: bool):
    b, h, w = front.shape[0], head.num_heads, head.width
    k = linear_bn(back, head.key, batch).reshape(b, w, h)
    q = linear_bn(front, head.query, batch).reshape(b, w, h)
    return torch.einsum("idh,jdh->hij", k, q)


def expected_distill(loss, vs, vt, reduction="sum"):
    total = 0.0
    for head, sf, sb, tf, tb in zip(loss.heads, vs, vs[1:], vt, vt[1:], strict=False):
        p_s = torch.softmax(torch.tanh(attention(head, sf, sb, False)), -1)
        p_t = torch.softmax(torch.tanh(attention(head, tf, tb, False)), -1)
        kl = (p_s * (p_s.log() - p_t.log())).sum()
        total = total + (kl if reduction == "sum" else kl / (p_s.shape[0] * p_s.shape[1]))
    return total


def expected_pretrain(loss, vt, head_decay: float = 5e-4):
    """The heads' objective plus the authors' ``5e-4 * sum(v^2)`` over every head variable."""
    total = 0.0
    for p in loss.heads.parameters():
        for v in p.detach().flatten().tolist():
            total += head_decay * v * v
    for head, front, back in zip(loss.heads, vt, vt[1:], strict=False):
        attn = torch.softmax(attention(head, front, back, True), -1)
        f = torch.relu(linear_bn(front, head.embed, True))
        mixed = torch.einsum("hij,jd->ihd", attn, f).reshape(front.shape[0], -1)
        guess = mixed @ head.out.weight.T + head.out.bias
        guess = guess / guess.norm(dim=-1, keepdim=True)
        total = total + (1 - (guess * back).sum(-1)).mean()
    return total


def features(batch=5, seeds=(0, 1)):
    s_layers, t_layers = layers(STUDENT, batch, seeds[0]), layers(TEACHER, batch, seeds[1])
    vt = [teacher_vector(v) for _, v in t_layers]
    vs = [student_vector(v, t) for (_, v), t in zip(s_layers, vt, strict=True)]
    return [m for m, _ in s_layers], [m for m, _ in t_layers], vs, vt


# ------------------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_distillation_matches_the_closed_form(reduction):
    s, t, vs, vt = features()
    loss = randomize(MHGDLoss(teacher_channels=CHANNELS, reduction=reduction), seed=2)
    loss.freeze_heads()
    expected = expected_distill(loss, vs, vt, reduction)
    assert expected > 0
    torch.testing.assert_close(loss(s, t), expected, rtol=1e-9, atol=0)
    fn = mhgd(s, t, loss.heads, reduction=reduction)
    torch.testing.assert_close(fn, expected, rtol=1e-9, atol=0)


def test_pretraining_objective_matches_the_closed_form_and_updates_running_stats():
    _, t, _, vt = features(seeds=(3, 4))
    loss = randomize(MHGDLoss(teacher_channels=CHANNELS, drop_heads=False), seed=5)
    expected = expected_pretrain(loss, vt)
    before = loss.heads[0].key.bn.running_mean.clone()
    torch.testing.assert_close(loss.pretrain_loss(t), expected, rtol=1e-9, atol=0)
    assert not torch.equal(loss.heads[0].key.bn.running_mean, before)


def test_the_head_penalty_is_a_weight_decay_of_1e_3():
    _, t, _, _ = features(seeds=(3, 4))
    loss = randomize(MHGDLoss(teacher_channels=CHANNELS, drop_heads=False), seed=5).eval()
    loss.pretrain_loss(t).backward()
    with_penalty = [p.grad.clone() for p in loss.heads.parameters()]
    loss.zero_grad()
    mhgd_pretrain(t, loss.heads, drop_heads=False, batch_stats=False).backward()
    for p, g in zip(loss.heads.parameters(), with_penalty, strict=True):
        base = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g - base, 1e-3 * p.detach(), rtol=1e-9, atol=1e-15)
    free = randomize(MHGDLoss(teacher_channels=CHANNELS, drop_heads=False, head_decay=0.0), seed=5).eval()
    torch.testing.assert_close(free.pretrain_loss(t), mhgd_pretrain(t, free.heads, False, batch_stats=False))


def test_a_single_head_is_never_dropped():
    _, t, _, _ = features(seeds=(6, 7))
    heads = randomize(MHGDLoss(teacher_channels=CHANNELS, num_heads=1), seed=8).heads
    torch.manual_seed(0)
    dropped = mhgd_pretrain(t, heads, drop_heads=True, batch_stats=False)
    torch.testing.assert_close(dropped, mhgd_pretrain(t, heads, drop_heads=False, batch_stats=False))


def test_head_dropping_changes_the_estimate_but_stays_finite():
    _, t, _, _ = features(seeds=(6, 7))
    heads = randomize(MHGDLoss(teacher_channels=CHANNELS), seed=8).heads
    torch.manual_seed(0)
    dropped = mhgd_pretrain(t, heads, drop_heads=True, batch_stats=False)
    assert torch.isfinite(dropped)
    assert not torch.allclose(dropped, mhgd_pretrain(t, heads, drop_heads=False, batch_stats=False))


def test_student_sign_flips_leave_the_loss_unchanged(monkeypatch):
    s, t, _, _ = features(seeds=(9, 10))
    loss = randomize(MHGDLoss(teacher_channels=CHANNELS), seed=11)
    loss.freeze_heads()
    reference = loss(s, t)
    g = torch.Generator().manual_seed(12)
    plain = svd.truncated_svd

    def flipped(x, k, **kw):
        values, vectors = plain(x, k, **kw)
        signs = torch.randint(0, 2, (vectors.shape[0], 1, vectors.shape[-1]), generator=g) * 2 - 1
        return values, vectors * signs.to(vectors.dtype)

    monkeypatch.setattr(svd, "truncated_svd", flipped)
    monkeypatch.setattr(mhgd_module, "truncated_svd", flipped)
    for _ in range(3):
        torch.testing.assert_close(loss(s, t), reference, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------ two-stage protocol
def test_pretraining_reduces_its_objective():
    torch.manual_seed(13)
    _, t, _, _ = features(batch=8, seeds=(14, 15))
    t = [x.float() for x in t]
    loss = MHGDLoss(teacher_channels=CHANNELS, drop_heads=False)
    opt = torch.optim.Adam(loss.heads.parameters(), lr=1e-2)
    first = None
    for _ in range(8):
        opt.zero_grad()
        value = loss.pretrain_step(dict(zip(loss.taps, t, strict=True)))
        first = value.item() if first is None else first
        value.backward()
        opt.step()
    assert value.item() < 0.5 * first


def test_gradients_pretrain_reaches_every_head_then_distillation_only_student_and_connectors():
    g = torch.Generator().manual_seed(16)
    s = [torch.randn(6, c, 3, 3, generator=g, requires_grad=True) for c in (3, 6, 8)]
    t = [torch.randn(6, c, 3, 3, generator=g, requires_grad=True) for c in CHANNELS]
    loss = MHGDLoss(student_channels=[3, 6, 8], teacher_channels=CHANNELS)
    assert MHGDLoss.pretrain is True and isinstance(loss.heads, torch.nn.ModuleList)
    loss.pretrain_loss(t).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.heads.parameters())
    assert all(x.grad is None for x in t)
    loss.heads.zero_grad(set_to_none=True)
    loss.freeze_heads()
    loss(s, t).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)
    assert all(p.grad is None for p in loss.heads.parameters())
    assert all(p.grad is not None for p in loss.connectors[0].parameters())
    trainable = {id(p) for p in loss.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in loss.connectors.parameters()}


def test_distilling_unfrozen_heads_freezes_them_with_a_warning(monkeypatch):
    monkeypatch.setattr(inputs, "_warned", set())
    s, t, _, _ = features(seeds=(17, 18))
    loss = MHGDLoss(teacher_channels=CHANNELS).double()
    with pytest.warns(UserWarning, match="freeze_heads"):
        loss(s, t)
    assert loss.heads_frozen and not any(p.requires_grad for p in loss.heads.parameters())
    with pytest.raises(RuntimeError, match="frozen"):
        loss.pretrain_loss(t)


def test_lazy_heads_and_frozen_state_survive_a_state_dict_round_trip():
    _, t, _, _ = features(seeds=(19, 20))
    loss = MHGDLoss()
    assert len(loss.heads) == 0
    loss.double().pretrain_loss(t)
    assert [(h.front_dim, h.back_dim) for h in loss.heads] == [(4, 6), (6, 8)]
    loss.freeze_heads()
    other = MHGDLoss(teacher_channels=CHANNELS).double()
    other.load_state_dict(loss.state_dict())
    assert other.heads_frozen
    assert torch.equal(other.heads[1].out.bias, loss.heads[1].out.bias)
    assert isinstance(L.build("mhgd", num_heads=2), MHGDLoss)


def test_gradcheck_on_a_well_separated_case():
    s, t, _, _ = features(batch=3, seeds=(21, 22))
    loss = randomize(MHGDLoss(teacher_channels=CHANNELS, num_heads=2), seed=23)
    loss.freeze_heads()
    inputs_ = tuple(x.detach().requires_grad_() for x in s)
    assert torch.autograd.gradcheck(lambda *s: loss(list(s), t), inputs_, fast_mode=True)


# ---------------------------------------------------------------------------------- edge cases
def test_batch_of_one_distils_nothing_and_pretrains_on_running_statistics(monkeypatch):
    monkeypatch.setattr(inputs, "_warned", set())
    g = torch.Generator().manual_seed(24)
    s = [torch.randn(1, c, 3, 3, generator=g, requires_grad=True) for c in CHANNELS]
    t = [torch.randn(1, c, 3, 3, generator=g) for c in CHANNELS]
    loss = MHGDLoss(teacher_channels=CHANNELS)
    before = loss.heads[0].key.bn.running_mean.clone()
    pre = loss.pretrain_loss(t)
    pre.backward()
    assert torch.isfinite(pre) and torch.equal(loss.heads[0].key.bn.running_mean, before)
    loss.freeze_heads()
    with pytest.warns(UserWarning, match="no relation"):
        value = loss(s, t)
    value.backward()
    assert value == 0 and all(torch.isfinite(x.grad).all() for x in s)


@pytest.mark.parametrize("case", ["repeated", "float16"])
def test_repeated_singular_values_and_float16_give_finite_bounded_gradients(case):
    g = torch.Generator().manual_seed(25)
    if case == "repeated":
        spec = [(4, 3, 5, [2.0, 2.0, 2.0, 1.0]), (6, 2, 4, [3.0, 3.0, 1.0]), (8, 1, 5, [1.0] * 5)]
        s = [known_features(4, *layer, g)[0] for layer in spec]
        t = [known_features(4, *layer, g)[0] for layer in spec]
    else:
        s = [torch.randn(4, c, 3, 3, generator=g).half() for c in CHANNELS]
        t = [torch.randn(4, c, 3, 3, generator=g).half() for c in CHANNELS]
    s = [x.detach().requires_grad_() for x in s]
    loss = MHGDLoss(teacher_channels=CHANNELS).to(s[0].dtype if case == "repeated" else torch.float32)
    pre = loss.pretrain_loss(t)
    pre.backward()
    assert torch.isfinite(pre)
    assert all(torch.isfinite(p.grad).all() for p in loss.heads.parameters())
    loss.freeze_heads()
    value = loss(s, t)
    value.backward()
    assert torch.isfinite(value) and value.dtype != torch.float16
    for x in s:
        assert x.grad.dtype == x.dtype and torch.isfinite(x.grad).all() and x.grad.abs().max() < 1e3


def test_mismatched_heads_or_channels_say_what_to_do():
    g = torch.Generator().manual_seed(26)
    t = [torch.randn(3, c, 2, 2, generator=g) for c in CHANNELS]
    with pytest.raises(ValueError, match="teacher's channels"):
        MHGDLoss(teacher_channels=[4, 6, 9]).pretrain_loss(t)
    s = [torch.randn(3, c, 2, 2, generator=g) for c in (5, 6, 8)]
    loss = MHGDLoss(teacher_channels=CHANNELS)
    loss.freeze_heads()
    with pytest.raises(ValueError, match="student_channels"):
        loss(s, t)
    with pytest.raises(ValueError, match="head_decay"):
        MHGDLoss(head_decay=-1.0)


def _rank_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    s, t, _, _ = features(batch=6, seeds=(27, 28))
    torch.manual_seed(0)
    loss = MHGDLoss(teacher_channels=CHANNELS).double()
    loss.freeze_heads()
    rows = slice(rank * 3, rank * 3 + 3)
    shard = [x[rows].clone().requires_grad_() for x in s]
    value = loss(shard, [x[rows] for x in t])
    value.backward()
    torch.save((value.detach(), [x.grad for x in shard]), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_relate_the_global_batch(tmp_path):
    """Each rank's loss is the single-process loss of the whole batch; its shard's gradient is W times
    the single-process gradient on those rows (the convention of relkd.distributed)."""
    torch.multiprocessing.spawn(
        _rank_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=True
    )
    s, t, _, _ = features(batch=6, seeds=(27, 28))
    torch.manual_seed(0)
    loss = MHGDLoss(teacher_channels=CHANNELS).double()
    loss.freeze_heads()
    s = [x.clone().requires_grad_() for x in s]
    expected = loss(s, t)
    expected.backward()
    for rank in range(2):
        value, grads = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(value, expected.detach(), rtol=1e-10, atol=0)
        for g, x in zip(grads, s, strict=True):
            torch.testing.assert_close(g, 2 * x.grad[rank * 3 : rank * 3 + 3], rtol=1e-8, atol=1e-12)
