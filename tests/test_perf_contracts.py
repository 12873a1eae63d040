"""What the fast paths promise: in-place banks with valid gradients, hand-written backward passes equal
to finite differences, one value for every path (tensors, shared graphs, compiled), chunk counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import relkd
import relkd.graphs.angles as angles
import relkd.losses as L
from relkd.graphs import RelationGraph
from relkd.losses import functional as F
from relkd.losses.contrast import contrast_loss

RELATIONAL = {
    "rkd_distance": F.rkd_distance,
    "sp": F.similarity_preserving,
    "cc": F.correlation_congruence,
    "pkt": F.pkt,
}


def _pair(b: int = 9, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, d, generator=g, dtype=torch.float64),
        torch.randn(b, d + 2, generator=g, dtype=torch.float64),
    )


# ------------------------------------------------------------------------------------ memory banks
def _allocations(fn) -> list[int]:
    """Bytes of every CPU tensor allocation ``fn()`` makes (the profiler's allocation records)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.events() if e.cpu_memory_usage > 0]
    return [e.cpu_memory_usage for e in events]


def test_a_crd_training_step_allocates_no_copy_of_a_bank():
    b, n, k, dim = 64, 50_000, 16_384, 128
    torch.manual_seed(0)
    loss = L.build("crd", student_dim=32, teacher_dim=32, num_data=n, num_negatives=k, feat_dim=dim)
    g = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(b, 32, generator=g, requires_grad=True), torch.randn(b, 32, generator=g)
    index = torch.randperm(n, generator=g)[:b]
    negatives = torch.randint(0, n, (b, k), generator=g)
    loss(fs, ft, index, negatives).backward()  # the first step sets Z
    banks = [loss.student_bank.memory, loss.teacher_bank.memory]
    addresses = [m.data_ptr() for m in banks]

    def step() -> None:
        loss(fs, ft, index, negatives).backward()

    sizes = _allocations(step)
    bank_bytes = n * dim * 4
    assert sizes and max(sizes) < bank_bytes, f"an allocation of {max(sizes)} bytes, a bank is {bank_bytes}"
    assert [loss.student_bank.memory, loss.teacher_bank.memory] == banks
    assert [m.data_ptr() for m in banks] == addresses


@pytest.mark.parametrize("bank", ["full", "queue"])
def test_crd_gradient_is_the_gradient_against_the_banks_before_the_update(bank):
    torch.manual_seed(0)
    loss = L.build(
        "crd", student_dim=6, teacher_dim=6, num_data=40, num_negatives=7, feat_dim=5, bank=bank,
        queue_size=24, negatives="uniform",
    ).double()  # fmt: skip
    g = torch.Generator().manual_seed(2)
    fs = torch.randn(8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(8, 6, generator=g, dtype=torch.float64)
    index = torch.randperm(40, generator=g)[:8]
    negatives = torch.randint(0, 24, (8, 7), generator=g)
    loss(fs, ft, index, negatives)  # sets Z and moves the banks once
    frozen = [loss.student_bank.memory.clone(), loss.teacher_bank.memory.clone()]
    # Expected: the same step in eval mode (no update), gradient by plain autograd afterwards.
    loss.eval()
    (expected,) = torch.autograd.grad(loss(fs, ft, index, negatives), fs)
    loss.train()
    value = loss(fs, ft, index, negatives)
    assert not torch.equal(loss.student_bank.memory, frozen[0])  # updated in place before the backward
    (grad,) = torch.autograd.grad(value, fs)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("objective", ["nce", "info_nce"])
@pytest.mark.parametrize("entries", [6, 400])  # B * K < N: gathered rows; else one product with the bank
def test_contrast_loss_backward_matches_finite_differences(objective, entries):
    g = torch.Generator().manual_seed(3)
    anchor = torch.nn.functional.normalize(torch.randn(2, 4, 3, generator=g, dtype=torch.float64), dim=-1)
    anchor = (anchor if objective == "info_nce" else anchor[0]).requires_grad_()
    positive = torch.randn(anchor.shape, generator=g, dtype=torch.float64)
    bank = torch.randn(entries, 3, generator=g, dtype=torch.float64)
    negatives = torch.randint(0, entries, (4, 5), generator=g)
    z = torch.tensor(2.5, dtype=torch.float64)

    def fn(a: torch.Tensor) -> torch.Tensor:
        return contrast_loss(a, positive, bank, negatives, objective, 0.5, z, entries)

    assert torch.autograd.gradcheck(fn, (anchor,))


def test_hkd_gradient_matches_autograd_through_the_scores():
    from relkd.losses.contrast import contrast_scores, info_nce

    g = torch.Generator().manual_seed(4)
    anchors = torch.randn(2, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    positives, bank = torch.randn(2, 6, 4, generator=g, dtype=torch.float64), torch.randn(30, 4, generator=g)
    bank = bank.double()
    negatives = torch.randint(0, 30, (6, 9), generator=g)
    (grad,) = torch.autograd.grad(
        contrast_loss(anchors, positives, bank, negatives, "info_nce", 0.07), anchors
    )
    scores = contrast_scores(anchors, positives, bank, negatives)
    (expected,) = torch.autograd.grad(sum(info_nce(x, 0.07) for x in scores), anchors)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- relational fast paths
@pytest.mark.parametrize("name", RELATIONAL)
def test_tensors_and_shared_graphs_give_the_same_value_and_gradient(name):
    fn = RELATIONAL[name]
    s, t = _pair()
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    v1 = fn(s1, t)  # flat features: products inside the loss's node
    v2 = fn(RelationGraph(s2), RelationGraph(t))  # graphs: the cached Gram matrix
    v1.backward()
    v2.backward()
    torch.testing.assert_close(v1, v2, rtol=1e-12, atol=0)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-10, atol=1e-15)


def test_released_graphs_keep_the_pending_backward():
    s, t = _pair()
    x = s.clone().requires_grad_()
    gs, gt = RelationGraph(x), RelationGraph(t)
    total = F.pkt(gs, gt) + F.rkd_distance(gs, gt)
    gs.release()
    gt.release()
    assert not gs._cache and not gt._cache
    total.backward()
    y = s.clone().requires_grad_()
    (F.pkt(y, t) + F.rkd_distance(y, t)).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("name", RELATIONAL)
@pytest.mark.parametrize("width", [3, 70])  # below and above the width where the backward symmetrises
def test_fused_backward_matches_finite_differences(name, width):
    s, t = _pair(b=6, d=width, seed=5)
    assert torch.autograd.gradcheck(lambda x: RELATIONAL[name](x, t), (s.requires_grad_(),))


def test_cc_with_a_zero_row_uses_unit_factors_for_the_others():
    # K_ij = e_i e_j sum_p a_p cos_ij^p with e_i = exp(-gamma) for a unit row and 1 for a zero row.
    s, t = _pair(b=5, d=4, seed=6)
    s[2] = 0.0
    gamma, order = 0.4, 2

    def kernel(x: torch.Tensor) -> torch.Tensor:
        norms = x.norm(dim=1)
        f = torch.where(norms[:, None] > 0, x / norms.clamp_min(1e-300)[:, None], 0.0)
        cos = f @ f.T
        cos.fill_diagonal_(0.0)
        cos += torch.diag((norms > 0).double())
        e = torch.ones(len(x), dtype=torch.float64)
        e[norms > 0] = math.exp(-gamma)
        poly = sum((2 * gamma) ** p / math.factorial(p) * cos**p for p in range(order + 1))
        return e[:, None] * e[None, :] * poly

    expected = ((kernel(s) - kernel(t)) ** 2).mean()
    torch.testing.assert_close(F.correlation_congruence(s, t, gamma, order), expected, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------ chunks
def test_angle_chunks_follow_the_memory_budget():
    cpu = angles.CHUNK_BUDGET_BYTES["cpu"]
    # four float32 blocks of N x N per anchor
    assert angles.default_chunk(1024, "cpu") == max(1, cpu // (4 * 1024 * 1024 * 4))
    assert angles.default_chunk(256, "cpu") == cpu // (4 * 256 * 256 * 4)
    assert angles.default_chunk(256, "cpu", torch.float64) == cpu // (4 * 256 * 256 * 8)
    assert angles.default_chunk(1024, "cuda") == angles.CHUNK_BUDGET_DEFAULT // (4 * 1024 * 1024 * 4)
    assert angles.default_chunk(1024, "cuda") >= 50  # a handful of chunks on a GPU: 1024 / 64 = 16
    assert angles.default_chunk(8, "cpu") == 8 and angles.default_chunk(1024, "cpu", budget=1) == 1


def test_the_angle_pass_runs_one_body_per_chunk(monkeypatch):
    calls = []
    body = angles._chunk_grad_eager
    monkeypatch.setattr(angles, "_chunk_grad_eager", lambda *a: calls.append(a[1].shape[0]) or body(*a))
    s, t = _pair(b=20, d=4, seed=7)
    budget = 4 * 20 * 20 * 8 * 6  # six float64 anchors
    monkeypatch.setitem(angles.CHUNK_BUDGET_BYTES, "cpu", budget)
    F.rkd_angle(s.requires_grad_(), t).backward()
    assert calls == [6, 6, 6, 2]


# ------------------------------------------------------------------------------------------ compile
def test_compile_keeps_a_module_and_its_state_dict_keys():
    loss = L.build("crd", student_dim=4, teacher_dim=4, num_data=10, num_negatives=3, feat_dim=3)
    keys = list(loss.state_dict())
    assert relkd.compile(loss) is loss
    assert list(loss.state_dict()) == keys


@pytest.mark.slow
@pytest.mark.parametrize("name", RELATIONAL)
def test_compiled_equals_eager(name):
    s, t = _pair(b=12, d=6, seed=8)
    values = []
    for fn in (RELATIONAL[name], relkd.compile(RELATIONAL[name])):
        x = s.clone().requires_grad_()
        value = fn(x, t)
        value.backward()
        values.append((value.detach(), x.grad))
    torch.testing.assert_close(values[1][0], values[0][0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(values[1][1], values[0][1], rtol=1e-8, atol=1e-13)


@pytest.mark.slow
def test_compiled_crd_step_equals_eager_and_moves_the_banks_alike():
    torch.manual_seed(0)
    make = dict(student_dim=6, teacher_dim=6, num_data=40, num_negatives=7, feat_dim=5)
    eager, compiled = L.build("crd", **make).double(), L.build("crd", **make).double()
    compiled.load_state_dict(eager.state_dict())
    relkd.compile(compiled)
    g = torch.Generator().manual_seed(9)
    fs, ft = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g).double()
    index = torch.randperm(40, generator=g)[:8]
    negatives = torch.randint(0, 40, (8, 7), generator=g)
    for _ in range(2):
        out = []
        for loss in (eager, compiled):
            x = fs.clone().requires_grad_()
            value = loss(x, ft, index, negatives)
            value.backward()
            out.append((value.detach(), x.grad))
        torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-8, atol=1e-13)
    torch.testing.assert_close(compiled.student_bank.memory, eager.student_bank.memory, rtol=1e-12, atol=0)


@pytest.mark.slow
def test_train_compile_gives_the_eager_run(tmp_path):
    """``train.compile: true`` compiles the step's networks and losses; the run's accuracy and final
    weights equal the eager run's to float tolerance (same seeds, same batches). Eleven engines in
    one process with a loss on the feature map: past dynamo's recompile limit of 8, compilation fell
    back in a way that lost that tap (KeyError 'feature_map') before each run reset the caches."""
    from relkd.cli import main

    common = [
        "methods=[kd, sp]", "seeds=[0, 1, 2, 3, 4]", "data.train_subset=40", "data.batch_size=16",
        "data.transfer_batch_size=64", "teacher.args={width: 8}", "student.args={width: 4}", "train.epochs=1",
        "teacher.train.epochs=1", "tensorboard=false", "probe_size=16", "check_teachers=false", "--quiet",
    ]  # fmt: skip
    from torch._dynamo.utils import counters

    assert main(["run", f"out={tmp_path / 'eager'}", *common]) == 0
    counters.clear()
    assert main(["run", f"out={tmp_path / 'compiled'}", *common, "train.compile=true"]) == 0
    assert counters["stats"]["unique_graphs"] > 0  # the compiled run did compile
    for method, seed in ((m, s) for m in ("kd", "sp") for s in range(5)):
        run = f"{method}/seed{seed}/final.pt"
        eager = torch.load(tmp_path / "eager" / run, weights_only=True)
        compiled = torch.load(tmp_path / "compiled" / run, weights_only=True)
        for key, value in eager["students"]["student"].items():
            torch.testing.assert_close(compiled["students"]["student"][key], value, rtol=1e-3, atol=1e-4)
