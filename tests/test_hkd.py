"""HKD against the method written out by hand in float64, plus gradients, state, and edge cases."""

from __future__ import annotations

import math

import pytest
import torch

import relkd.losses as L
from relkd.losses.functional import hkd

N, C, DS, DT, FEAT, K, KNN, B = 40, 4, 6, 9, 5, 7, 4, 10
T = 0.07


def make_loss(**kw) -> L.HKDLoss:
    torch.manual_seed(0)
    targets = torch.arange(N) % C
    kw = {"feat_dim": FEAT, "k": KNN, "num_negatives": K, **kw}
    loss = L.HKDLoss(DS, DT, targets, **kw).double()
    for conv in (loss.gnn_s.convs[0], loss.gnn_t.convs[0]):
        torch.nn.init.normal_(conv.bias, std=0.1)
    return loss


def batch(b: int = B, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return dict(
        student_feat=torch.randn(b, DS, generator=g).to(dtype).requires_grad_(),
        teacher_feat=torch.randn(b, DT, generator=g).to(dtype).requires_grad_(),
        student_logits=(3 * torch.randn(b, C, generator=g)).to(dtype).requires_grad_(),
        teacher_logits=(3 * torch.randn(b, C, generator=g)).to(dtype),
        index=torch.randperm(N, generator=g)[:b],
    )


# ------------------------------------------------------------------ the method, written out by hand
def unit(v: torch.Tensor) -> torch.Tensor:
    return v / math.sqrt(float((v * v).sum()))


@torch.no_grad()
def ref_embed(f: torch.Tensor, linear: torch.nn.Linear) -> list[torch.Tensor]:
    return [unit(linear.weight @ row + linear.bias) for row in f.detach()]


def ref_neighbours(logits: torch.Tensor, k: int) -> list[list[int]]:
    """The node itself, then the k - 1 others with the smallest cosine distance of the softmax."""
    p = [torch.exp(z) / torch.exp(z).sum() for z in logits.detach()]
    out = []
    for i, pi in enumerate(p):
        dist = {j: 1 - float(pi @ pj) / math.sqrt(float(pi @ pi) * float(pj @ pj)) for j, pj in enumerate(p)}
        others = sorted((j for j in dist if j != i), key=dist.get)
        out.append([i] + others[: k - 1])
    return out


def ref_tag(e: list[torch.Tensor], nbrs: list[list[int]], conv) -> list[torch.Tensor]:
    w0, w1, bias = conv.lins[0].weight, conv.lins[1].weight, conv.bias
    return [unit(w0 @ e[i] + w1 @ (sum(e[j] for j in nb) / len(nb)) + bias) for i, nb in enumerate(nbrs)]


def ref_info_nce(anchor, positive, negatives: list[torch.Tensor]) -> torch.Tensor:
    pos = math.exp(float(anchor @ positive) / T)
    neg = sum(math.exp(float(anchor @ v) / T) for v in negatives)
    return -math.log(pos / (pos + neg))


@torch.no_grad()
def ref_hkd(loss, bank_s, bank_t, inputs, negatives, negatives_from="own", graph=True) -> float:
    es = ref_embed(inputs["student_feat"], loss.embed_s.linear)
    et = ref_embed(inputs["teacher_feat"], loss.embed_t.linear)
    own = negatives_from == "own"
    neg_bank_s, neg_bank_t = (bank_s, bank_t) if own else (bank_t, bank_s)
    idx, neg = inputs["index"].tolist(), negatives.tolist()
    terms = []
    for b, i in enumerate(idx):
        terms.append(ref_info_nce(es[b], bank_t[i], [neg_bank_s[n] for n in neg[b]]))
        terms.append(ref_info_nce(et[b], bank_s[i], [neg_bank_t[n] for n in neg[b]]))
    if graph:
        gs = ref_tag(es, ref_neighbours(inputs["student_logits"], KNN), loss.gnn_s.convs[0])
        gt = ref_tag(et, ref_neighbours(inputs["teacher_logits"], KNN), loss.gnn_t.convs[0])
        for b, i in enumerate(idx):
            pos_s = unit(0.75 * bank_t[i] + 0.25 * gt[b])
            pos_t = unit(0.75 * bank_s[i] + 0.25 * gs[b])
            terms.append(ref_info_nce(gs[b], pos_s, [neg_bank_s[n] for n in neg[b]]))
            terms.append(ref_info_nce(gt[b], pos_t, [neg_bank_t[n] for n in neg[b]]))
    return sum(terms) / len(idx)


def fixed_negatives(b: int = B, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, N, (b, K), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("negatives_from", ["own", "other"])
def test_matches_the_method_written_out(negatives_from):
    loss = make_loss(negatives_from=negatives_from)
    inputs, neg = batch(), fixed_negatives()
    bank_s, bank_t = loss.student_bank.memory.clone(), loss.teacher_bank.memory.clone()
    got = loss(**inputs, negatives=neg)
    expected = ref_hkd(loss, bank_s, bank_t, inputs, neg, negatives_from)
    assert got.dtype == torch.float64
    assert math.isclose(got.item(), expected, rel_tol=1e-10)


def test_second_step_reads_the_updated_banks():
    loss = make_loss()
    loss(**batch(seed=1), negatives=fixed_negatives(seed=2))
    inputs, neg = batch(seed=3), fixed_negatives(seed=4)
    bank_s, bank_t = loss.student_bank.memory.clone(), loss.teacher_bank.memory.clone()
    expected = ref_hkd(loss, bank_s, bank_t, inputs, neg)
    assert math.isclose(loss(**inputs, negatives=neg).item(), expected, rel_tol=1e-10)


def test_banks_move_with_momentum_0_9_towards_the_individual_embeddings():
    loss = make_loss()
    inputs = batch()
    before_s, before_t = loss.student_bank.memory.clone(), loss.teacher_bank.memory.clone()
    loss(**inputs, negatives=fixed_negatives())
    es = ref_embed(inputs["student_feat"], loss.embed_s.linear)
    et = ref_embed(inputs["teacher_feat"], loss.embed_t.linear)
    expected_s, expected_t = before_s.clone(), before_t.clone()
    for b, i in enumerate(inputs["index"].tolist()):
        expected_s[i] = unit(0.9 * before_s[i] + 0.1 * es[b])
        expected_t[i] = unit(0.9 * before_t[i] + 0.1 * et[b])
    torch.testing.assert_close(loss.student_bank.memory, expected_s, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss.teacher_bank.memory, expected_t, rtol=1e-12, atol=1e-14)


def test_functional_form_matches_the_method_written_out():
    """The functional form is HKD's individual terms (a batch smaller than k has no graph terms)."""
    loss = make_loss()
    inputs, neg = batch(b=3), fixed_negatives(b=3)
    bank_s, bank_t = loss.student_bank.memory.clone(), loss.teacher_bank.memory.clone()
    s = loss.embed_s(inputs["student_feat"])
    t = loss.embed_t(inputs["teacher_feat"])
    got = hkd(s, t, bank_s, bank_t, inputs["index"], neg)
    expected = ref_hkd(loss, bank_s, bank_t, inputs, neg, graph=False)
    assert math.isclose(got.item(), expected, rel_tol=1e-10)


def test_gradients_reach_student_and_every_trainable_part_but_not_the_teacher():
    loss = make_loss()
    inputs = batch()
    loss(**inputs).backward()
    assert inputs["student_feat"].grad is not None and inputs["student_feat"].grad.abs().sum() > 0
    assert inputs["teacher_feat"].grad is None
    assert inputs["student_logits"].grad is None  # the graph is built from detached logits
    for name, p in loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    names = {n.split(".")[0] for n, _ in loss.named_parameters()}
    assert names == {"embed_s", "embed_t", "gnn_s", "gnn_t"}


@pytest.mark.parametrize("b", [1, KNN - 1])
def test_small_batches_skip_the_graph_terms(b):
    loss = make_loss()
    inputs, neg = batch(b=b), fixed_negatives(b=b)
    bank_s, bank_t = loss.student_bank.memory.clone(), loss.teacher_bank.memory.clone()
    got = loss(**inputs, negatives=neg)
    got.backward()
    assert torch.isfinite(got)
    assert math.isclose(got.item(), ref_hkd(loss, bank_s, bank_t, inputs, neg, graph=False), rel_tol=1e-10)
    assert all(p.grad is None for p in loss.gnn_s.parameters())
    assert not torch.equal(loss.student_bank.memory, bank_s)  # banks still update


def test_sampled_negatives_come_from_other_classes():
    loss = make_loss()
    index = torch.arange(N)
    negatives = loss.sampler(index, 200)
    targets = torch.arange(N) % C
    assert negatives.device == index.device
    assert not (targets[negatives] == targets[index].unsqueeze(1)).any()


def test_sampled_negatives_are_distinct_as_the_authors_loader_draws_them():
    loss = make_loss()
    index = torch.arange(N)
    negatives = loss.sampler(index, 30)  # each class of 4 leaves 30 of the 40 entries
    targets = torch.arange(N) % C
    assert not (targets[negatives] == targets[index].unsqueeze(1)).any()
    assert all(len(set(row)) == 30 for row in negatives.tolist())


def test_state_dict_round_trip_resumes_exactly():
    loss = make_loss()
    loss(**batch(seed=1))
    fresh = make_loss()
    torch.manual_seed(123)
    fresh.student_bank.memory.uniform_()  # make sure the load, not the init, decides
    fresh.load_state_dict(loss.state_dict())
    assert torch.equal(fresh.student_bank.memory, loss.student_bank.memory)
    assert torch.equal(fresh.teacher_bank.memory, loss.teacher_bank.memory)
    torch.manual_seed(5)
    a = loss(**batch(seed=3))
    torch.manual_seed(5)
    b = fresh(**batch(seed=3))
    assert torch.equal(a, b)


def test_half_inputs_compute_in_float32():
    torch.manual_seed(0)
    loss = L.HKDLoss(DS, DT, torch.arange(N) % C, feat_dim=FEAT, k=KNN, num_negatives=K)
    inputs = batch(dtype=torch.float16)
    out = loss(**inputs)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_eval_mode_changes_no_state():
    loss = make_loss().eval()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    loss(**batch())
    assert all(torch.equal(before[k], v) for k, v in loss.state_dict().items())


def test_distill_reads_both_taps_and_the_index():
    inputs = batch()
    direct_loss, loss = make_loss(), make_loss()
    student = {"penultimate": inputs["student_feat"], "logits": inputs["student_logits"]}
    teacher = {"penultimate": inputs["teacher_feat"], "logits": inputs["teacher_logits"]}
    torch.manual_seed(9)
    direct = direct_loss(**inputs)
    torch.manual_seed(9)
    torch.testing.assert_close(loss.distill(student, teacher, {"index": inputs["index"]}), direct)
    with pytest.raises(KeyError, match="batch\\['index'\\]"):
        loss.distill(student, teacher, {})


def test_builds_from_the_registry_with_the_engine_argument_names():
    loss = L.build("hkd", student_dim=DS, teacher_dim=DT, targets=torch.arange(N) % C)
    assert isinstance(loss, L.HKDLoss) and loss.taps == ("penultimate", "logits")
    assert loss.batch_keys == ("index",)
    assert loss.student_bank.memory.shape == (N, 128)


def test_mismatched_batch_sizes_are_named():
    inputs = batch()
    inputs["teacher_feat"] = inputs["teacher_feat"][:-1]
    with pytest.raises(ValueError, match="same batch size"):
        make_loss()(**inputs)


def test_unknown_negative_bank_is_rejected():
    with pytest.raises(ValueError, match="negatives_from"):
        make_loss(negatives_from="teacher")
