"""Global relations under data parallelism: two gloo processes on the CPU against one process on the
concatenated batch.

The two ranks run every scenario once (a module fixture, to pay the process start-up once); each test
compares their results with the same computation done here, in one process, on the whole batch. The
gradient convention checked throughout: each rank's gradient on its own rows is ``W`` times the
single-process gradient for those rows, so the mean over ranks (DDP) is the single-process gradient.
"""

from __future__ import annotations

import math
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import relkd.losses as L
from relkd import distributed as D
from relkd._debug import set_debug
from relkd.graphs import RelationGraph
from relkd.losses import functional as LF
from relkd.memory import MemoryBank

W, B, N, C = 2, 8, 20, 3  # ranks, global batch, dataset size, classes
DS, DT, FEAT, K, KNN = 5, 7, 4, 6, 5  # KNN > B / W: the HKD graph terms exist only over the global batch
RELATIONAL = ("rkd", "sp", "cc", "pkt")
TOL = {"rtol": 1e-10, "atol": 1e-12}


# ----------------------------------------------------------------------------------------- the data
def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return dict(
        s=torch.randn(B, DS, generator=g, dtype=torch.float64),
        t=torch.randn(B, DT, generator=g, dtype=torch.float64),
        ls=3 * torch.randn(B, C, generator=g, dtype=torch.float64),
        lt=3 * torch.randn(B, C, generator=g, dtype=torch.float64),
        y=torch.randint(0, C, (B,), generator=g),
        index=torch.randperm(N, generator=g)[:B],
        negatives=torch.randint(0, N, (B, K), generator=g),
        queue_negatives=torch.randint(0, 12, (B, K), generator=g),
        targets=torch.arange(N) % C,
    )


def shard(r: int) -> slice:
    return slice(r * (B // W), (r + 1) * (B // W))


# -------------------------------------------- scenarios: run on each rank, and on the whole batch here
def relational_step(rows: slice) -> dict:
    d, out = data(), {}
    for name in RELATIONAL:
        x = d["s"][rows].clone().requires_grad_()
        loss = L.build(name)(x, d["t"][rows])
        loss.backward()
        out[name] = (loss.detach(), x.grad)
    x = d["s"][rows].clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g_s, g_t = D.global_graph(x), D.global_graph(d["t"][rows], detach=True)
        shared = LF.similarity_preserving(g_s, g_t) + LF.pkt(g_s, g_t)
    shared.backward()
    out["shared"] = (shared.detach(), x.grad, [str(w.message) for w in caught])
    return out


def compiled_step(rows: slice) -> tuple | str:
    """PKT traced by Dynamo as one graph (``fullgraph=True`` raises on a graph break), or the error."""
    d = data()
    x = d["s"][rows].clone().requires_grad_()
    try:
        loss = torch.compile(L.build("pkt"), backend="eager", fullgraph=True)(x, d["t"][rows])
    except Exception as e:  # reported by the test, so that the other scenarios still run
        return f"{type(e).__name__}: {e}"
    loss.backward()
    return loss.detach(), x.grad


def hkd_step(rows: slice) -> dict:
    d = data()
    torch.manual_seed(0)
    loss = L.HKDLoss(DS, DT, d["targets"], feat_dim=FEAT, k=KNN, num_negatives=K).double()
    x = d["s"][rows].clone().requires_grad_()
    value = loss(x, d["t"][rows], d["ls"][rows], d["lt"][rows], d["index"][rows], d["negatives"][rows])
    value.backward()
    return dict(
        loss=value.detach(),
        grad=x.grad,
        params={n: p.grad for n, p in loss.named_parameters()},
        banks=(loss.student_bank.memory, loss.teacher_bank.memory),
    )


def queue_step(rows: slice) -> dict:
    d = data()
    torch.manual_seed(0)
    crd = L.CRDLoss(DS, DT, N, feat_dim=FEAT, num_negatives=K, bank="queue", queue_size=12).double()
    crd(d["s"][rows], d["t"][rows], d["index"][rows], negatives=d["queue_negatives"][rows])
    return {k: v for k, v in crd.state_dict().items() if "bank" in k}


def training_step(rows: slice) -> dict:
    """One SGD step of a linear student on cross-entropy + RKD + CRD (trainable projections, banks)."""
    d = data()
    torch.manual_seed(0)
    student = nn.Linear(DS, C).double()
    # each rank starts from its own random projections and banks: broadcast_module makes them rank 0's
    torch.manual_seed(1 + D.rank())
    crd = L.CRDLoss(C, DT, N, feat_dim=FEAT, num_negatives=K).double()
    D.broadcast_module(crd)
    model = DistributedDataParallel(student) if D.is_distributed() else student
    optimizer = torch.optim.SGD([*model.parameters(), *crd.parameters()], lr=0.5)
    logits = model(d["s"][rows])
    loss = (
        F.cross_entropy(logits, d["y"][rows])
        + L.build("rkd")(logits, d["t"][rows])
        + crd(logits, d["t"][rows], d["index"][rows], negatives=d["negatives"][rows])
    )
    loss.backward()
    D.average_gradients(crd.parameters())
    optimizer.step()
    return {"student": student.state_dict(), "crd": crd.state_dict()}


def gather_mechanics() -> dict:
    r, sizes = D.rank(), (3, 2)
    x = (torch.arange(2.0 * sizes[r], dtype=torch.float64).reshape(-1, 2) + 10 * r).requires_grad_()
    out = D.all_gather(x, sizes)
    (weights() * out).sum().backward()
    errors = []
    for call in (lambda: D.all_gather(x, sizes=(1, 1)), lambda: D.all_gather(torch.zeros(2 + r, 3))):
        set_debug(True)
        try:
            call()
        except ValueError as e:
            errors.append(str(e))
        finally:
            set_debug(False)
    with D.global_relations(False):
        local = L.build("sp")(data()["s"][shard(r)], data()["t"][shard(r)])
        inside = D.global_relations_enabled()
    s, t = data()["s"][shard(r)], data()["t"][shard(r)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LF.pkt(RelationGraph(s), RelationGraph(t))
    try:
        LF.pkt(RelationGraph(s), t)
    except ValueError as e:
        errors.append(str(e))
    pieces = [torch.tensor([float(r), 2.0]), torch.full((2, 2), 2.0 * r, dtype=torch.float64)]
    D.all_reduce_mean_(pieces)
    return dict(
        out=out.detach(),
        grad=x.grad,
        errors=errors,
        mean=D.reduce_mean(torch.tensor([float(r), 2.0])),
        means_in_place=pieces,
        enabled=(D.global_relations_enabled(), inside),
        local=local,
        warnings=[str(w.message) for w in caught],
    )


def batchnorm_step(rows: slice) -> dict:
    """A BatchNorm layer converted to global statistics, on this rank's rows of a ``[B, 3, 2, 2]`` batch;
    the loss is the sum of every rank's ``sum(out * weight)`` over its rows."""
    g = torch.Generator().manual_seed(3)
    x_all = 2 + 3 * torch.randn(B, 3, 2, 2, generator=g, dtype=torch.float64)
    w_all = torch.randn(B, 3, 2, 2, generator=g, dtype=torch.float64)
    bn = nn.BatchNorm2d(3, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64))
        bn.bias.copy_(torch.tensor([0.1, 0.0, -0.2], dtype=torch.float64))
    if D.world_size() > 1:
        assert D.convert_global_batchnorm(bn) == 1
    x = x_all[rows].clone().requires_grad_()
    out = bn(x)
    (out * w_all[rows]).sum().backward()
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    with D.global_relations(False):
        local = bn(x_all[rows]).detach()
    return dict(
        out=out.detach(),
        grad=x.grad,
        params=(bn.weight.grad, bn.bias.grad),
        stats=stats,
        local=local,
        local_reference=F.batch_norm(x_all[rows], None, None, bn.weight.detach(), bn.bias.detach(), True),
    )


def kdsvd_step(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """KD-SVD's summed loss on this rank's rows: the value, and the gradient of the student's rows."""
    g = torch.Generator().manual_seed(4)
    s = [torch.randn(B, 3, 3, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    t = [torch.randn(B, 3, 3, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    mine = [x[rows].clone().requires_grad_() for x in s]
    loss = LF.kd_svd(mine, [x[rows] for x in t], reduction="sum")
    loss.backward()
    return loss.detach(), mine[0].grad


def assemble_batches() -> dict:
    """What :func:`relkd.train.parallel.assemble` makes of a sharded, a replicated and a mixed batch."""
    from relkd.train.parallel import assemble

    r, flag = D.rank(), "replicated"
    labelled = {"input": torch.arange(6.0).reshape(3, 2), "index": torch.tensor([7, 8, 9])}
    labelled[flag] = torch.ones(3, dtype=torch.bool)
    transfer = {"input": 10.0 * (r + 1) + torch.zeros(2, 2), "index": torch.tensor([2 * r, 2 * r + 1])}
    transfer[flag] = torch.zeros(2, dtype=torch.bool)
    mixed = {k: torch.cat([labelled[k], transfer[k]]) for k in labelled}
    return {
        name: assemble(batch)
        for name, batch in {"mixed": mixed, "sharded": transfer, "whole": labelled}.items()
    }


def tally_and_stop() -> dict:
    """A replicated step counted once; a NaN on rank 1 alone stops both ranks with one message."""
    from relkd.train.tally import EpochTally, NonFiniteLossError

    tally = EpochTally(["ce", "rkd"], torch.device("cpu"))
    logits = torch.eye(4)[[0, 1, 2, 3]]
    tally.add_accuracy(logits, torch.tensor([0, 1, 2, 0]), replicated=True)  # 3 of 4 right, once
    tally.add_accuracy(logits[:2], torch.tensor([0, 0]) + D.rank())  # rank r: 1 of 2 right
    messages = []
    for step in range(1, 5):
        bad = step >= 3 and D.rank() == 1
        tally.add(torch.tensor([1.0, float("nan") if bad else 0.5]), torch.tensor(1.5), step)
        try:
            tally.check(0, 10, "train", Path("/nonexistent/checkpoint.pt"))
        except NonFiniteLossError as e:
            messages.append((step, str(e)))
            break
    tally.reduce()
    return {"accuracy": tally.accuracy(), "labelled": float(tally.labelled), "messages": messages}


def engine_fault(folder: str) -> dict:
    """A two-rank run whose cross-entropy overflows on rank 1 alone at step 2: every rank must stop
    there with the same error instead of waiting for rank 1 in the next collective."""
    from relkd.config.schema import TrainConfig
    from relkd.train import Engine, NonFiniteLossError, TrainBatches, build_stages

    class Steps:
        def __init__(self, batches: list) -> None:
            self.batches = batches

        def __len__(self) -> int:
            return len(self.batches)

        def set_epoch(self, epoch: int) -> None:
            pass

        def __iter__(self):
            return iter(self.batches)

    g = torch.Generator().manual_seed(5 + D.rank())
    batches = [
        {"input": torch.randn(4, 6, generator=g), "target": torch.arange(4) % C, "index": torch.arange(4)}
        for _ in range(4)
    ]
    if D.rank() == 1:
        batches[1]["input"][0, 0] = float("inf")  # rank 1's loss is not finite at step 2
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, C))
    stages = build_stages(None, TrainConfig(epochs=1, optimizer={"name": "sgd", "lr": 0.1}), {})
    engine = Engine(
        {"student": student}, stages, TrainBatches(Steps(batches)), [batches[0]], Path(folder) / "run",
        probe=batches[0]["input"], quiet=True, tensorboard=False, log_agreement=False,
    )  # fmt: skip
    start = time.monotonic()
    try:
        engine.fit()
    except NonFiniteLossError as e:
        return {"error": str(e), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def weights() -> torch.Tensor:
    return torch.linspace(-1.0, 2.0, 10, dtype=torch.float64).reshape(5, 2)


SCENARIOS = {
    "relational": relational_step,
    "compiled": compiled_step,
    "hkd": hkd_step,
    "queue": queue_step,
    "training": training_step,
    "batchnorm": batchnorm_step,
    "kdsvd": kdsvd_step,
}


def _worker(r: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/init", rank=r, world_size=W, timeout=timedelta(seconds=60)
    )
    try:
        results = {name: fn(shard(r)) for name, fn in SCENARIOS.items()}
        results["mechanics"] = gather_mechanics()
        results["assemble"] = assemble_batches()
        results["tally"] = tally_and_stop()
        results["fault"] = engine_fault(folder)
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(folder) / f"rank{r}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("gloo")
    context = mp.start_processes(_worker, args=(str(folder),), nprocs=W, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the gloo processes did not finish in 180 s")
    return [torch.load(folder / f"rank{r}.pt") for r in range(W)]


def assert_close(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, **TOL)


# ------------------------------------------------------------------------------------------- tests
pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("name", RELATIONAL)
def test_global_loss_equals_the_loss_of_the_concatenated_batch(ranks, name):
    expected, _ = relational_step(slice(None))[name]
    for r in range(W):
        assert_close(ranks[r]["relational"][name][0], expected)


@pytest.mark.parametrize("name", RELATIONAL)
def test_each_rank_gets_world_size_times_the_gradient_of_its_rows(ranks, name):
    _, expected = relational_step(slice(None))[name]
    for r in range(W):
        assert_close(ranks[r]["relational"][name][1] / W, expected[shard(r)])


def test_compiled_loss_gathers_in_one_graph(ranks):
    loss, grad = relational_step(slice(None))["pkt"]
    for r in range(W):
        result = ranks[r]["compiled"]
        assert not isinstance(result, str), result
        assert_close(result[0], loss)
        assert_close(result[1] / W, grad[shard(r)])


def test_a_shared_global_graph_serves_several_losses_without_warning(ranks):
    loss, grad, _ = relational_step(slice(None))["shared"]
    for r in range(W):
        got_loss, got_grad, caught = ranks[r]["relational"]["shared"]
        assert_close(got_loss, loss)
        assert_close(got_grad / W, grad[shard(r)])
        assert caught == []


def test_a_graph_of_one_shard_warns(ranks):
    for r in range(W):
        assert any("one rank's shard" in m for m in ranks[r]["mechanics"]["warnings"])


def test_switching_global_relations_off_relates_the_shard_only(ranks):
    d = data()
    for r in range(W):
        assert ranks[r]["mechanics"]["enabled"] == (True, False)
        assert_close(ranks[r]["mechanics"]["local"], L.build("sp")(d["s"][shard(r)], d["t"][shard(r)]))


def test_ddp_step_gives_the_single_process_update(ranks):
    expected = training_step(slice(None))
    for r in range(W):
        for part in ("student", "crd"):
            assert ranks[r]["training"][part].keys() == expected[part].keys()
            for key, value in expected[part].items():
                assert_close(ranks[r]["training"][part][key], value)


def test_hkd_rank_losses_average_to_the_global_batch_loss(ranks):
    expected = hkd_step(slice(None))
    assert_close(sum(ranks[r]["hkd"]["loss"] for r in range(W)) / W, expected["loss"])
    for r in range(W):
        assert_close(ranks[r]["hkd"]["grad"] / W, expected["grad"][shard(r)])


def test_hkd_parameter_gradients_average_to_the_single_process_ones(ranks):
    expected = hkd_step(slice(None))["params"]
    assert set(expected) >= {"gnn_s.convs.0.bias", "embed_t.linear.weight"}
    for name, grad in expected.items():
        assert_close(sum(ranks[r]["hkd"]["params"][name] for r in range(W)) / W, grad)


@pytest.mark.parametrize("scenario", ["hkd", "queue", "training"])
def test_banks_are_identical_on_every_rank_and_equal_the_global_update(ranks, scenario):
    def banks(result: dict) -> list[torch.Tensor]:
        if scenario == "hkd":
            return list(result["banks"])
        state = result["crd"] if scenario == "training" else result
        return [v for k, v in state.items() if "bank" in k]

    expected = banks({"hkd": hkd_step, "queue": queue_step, "training": training_step}[scenario](slice(None)))
    assert expected
    for r in range(W):
        got = banks(ranks[r][scenario])
        for a, b in zip(got, banks(ranks[0][scenario]), strict=True):
            assert torch.equal(a, b)
        for a, b in zip(got, expected, strict=True):
            assert_close(a, b)


def test_uneven_shards_gather_in_rank_order_with_sizes(ranks):
    first = torch.arange(6.0, dtype=torch.float64).reshape(3, 2)
    second = torch.arange(4.0, dtype=torch.float64).reshape(2, 2) + 10
    rows = (slice(0, 3), slice(3, 5))
    for r in range(W):
        assert torch.equal(ranks[r]["mechanics"]["out"], torch.cat([first, second]))
        # every rank computes the same sum(w * out): its rows' gradient is W * w
        assert torch.equal(ranks[r]["mechanics"]["grad"], W * weights()[rows[r]])


def test_mismatched_sizes_are_named(ranks):
    for r in range(W):
        wrong_sizes, unequal, graph_and_tensor = ranks[r]["mechanics"]["errors"]
        assert "sizes[" in wrong_sizes and "[1, 1]" in wrong_sizes
        assert "[2, 3]" in unequal and "DistributedSampler" in unequal
        assert "4 nodes" in graph_and_tensor and "teacher graph 8" in graph_and_tensor


def test_means_over_ranks(ranks):
    for r in range(W):
        assert torch.equal(ranks[r]["mechanics"]["mean"], torch.tensor([0.5, 2.0]))
        first, second = ranks[r]["mechanics"]["means_in_place"]
        assert torch.equal(first, torch.tensor([0.5, 2.0]))
        assert torch.equal(second, torch.ones(2, 2, dtype=torch.float64))


def test_global_batchnorm_equals_batchnorm_on_the_concatenated_batch(ranks):
    g = torch.Generator().manual_seed(3)
    x_all = (2 + 3 * torch.randn(B, 3, 2, 2, generator=g, dtype=torch.float64)).requires_grad_()
    w_all = torch.randn(B, 3, 2, 2, generator=g, dtype=torch.float64)
    weight = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.1, 0.0, -0.2], dtype=torch.float64, requires_grad=True)
    # the textbook formula over all B * 2 * 2 values of each channel
    mean = x_all.mean(dim=(0, 2, 3))
    var = ((x_all - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    out = (x_all - mean.view(1, -1, 1, 1)) / torch.sqrt(var + 1e-5).view(1, -1, 1, 1)
    out = out * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    (out * w_all).sum().backward()
    n = B * 2 * 2
    running = (0.3 * mean.detach(), 0.7 + 0.3 * var.detach() * n / (n - 1))
    for r in range(W):
        got = ranks[r]["batchnorm"]
        assert_close(got["out"], out.detach()[shard(r)])
        assert_close(got["grad"], x_all.grad[shard(r)])  # the statistics' gradient summed over ranks
        assert_close(got["stats"][0], running[0])
        assert_close(got["stats"][1], running[1])
        assert got["stats"][2] == 1
        # global relations off (a replicated step): the shard's own statistics
        assert_close(got["local"], got["local_reference"])
    # parameters: DDP's sum over ranks of each rank's gradient is that of the whole loss
    for i, expected in enumerate((weight.grad, bias.grad)):
        assert_close(sum(ranks[r]["batchnorm"]["params"][i] for r in range(W)), expected)


def test_kdsvd_sum_is_over_the_global_batch(ranks):
    g = torch.Generator().manual_seed(4)
    s = [torch.randn(B, 3, 3, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    t = [torch.randn(B, 3, 3, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    first = s[0].clone().requires_grad_()
    loss = LF.kd_svd([first, s[1]], t, reduction="sum")
    loss.backward()
    # per-sample terms: the shard sums add up to the global sum; W x the shard's keeps the scale
    assert_close(sum(ranks[r]["kdsvd"][0] for r in range(W)) / W, loss.detach())
    for r in range(W):
        assert_close(ranks[r]["kdsvd"][1] / W, first.grad[shard(r)])


def test_assemble_gathers_the_sharded_part_of_a_mixed_batch(ranks):
    for r in range(W):
        got = ranks[r]["assemble"]
        mixed, replicated = got["mixed"]
        assert replicated and set(mixed) == {"input", "index"}
        assert mixed["index"].tolist() == [7, 8, 9, 0, 1, 2, 3]  # labelled, then rank 0's and 1's
        assert torch.equal(mixed["input"][3:], torch.tensor([[10.0] * 2] * 2 + [[20.0] * 2] * 2))
        sharded, replicated = got["sharded"]
        assert not replicated and sharded["index"].tolist() == [2 * r, 2 * r + 1]
        whole, replicated = got["whole"]
        assert replicated and whole["index"].tolist() == [7, 8, 9]


def test_a_replicated_step_counts_its_images_once(ranks):
    for r in range(W):
        # rank 0: 3 of 4 (replicated, once) + 1 of 2; rank 1: 1 of 2
        assert ranks[r]["tally"]["labelled"] == 8
        assert ranks[r]["tally"]["accuracy"] == pytest.approx(100 * 5 / 8)


def test_a_non_finite_term_on_one_rank_stops_every_rank_at_the_same_step(ranks):
    for r in range(W):
        [(step, message)] = ranks[r]["tally"]["messages"]
        assert step == 3
        assert "'rkd'" in message and "step 3" in message and "rank 1 of 2" in message


def test_a_run_with_a_fault_on_one_rank_ends_on_every_rank(ranks):
    for r in range(W):
        fault = ranks[r]["fault"]
        assert fault["error"] is not None, f"rank {r} finished the run"
        assert "'ce'" in fault["error"] and "at step 2" in fault["error"] and "rank 1 of 2" in fault["error"]
        assert fault["seconds"] < 30  # not the 60 s collective timeout


# ------------------------------------------------------------------ one process: identities, no-ops
def test_outside_a_process_group_everything_is_the_identity():
    x = torch.randn(4, 3, requires_grad=True)
    assert D.all_gather(x) is x
    assert (D.rank(), D.world_size(), D.is_distributed(), D.is_main_process()) == (0, 1, False, True)
    assert not D.global_relations_enabled()
    assert torch.equal(D.reduce_mean(x), x.detach())
    x.grad = torch.ones(4, 3)
    D.average_gradients([x])
    assert torch.equal(x.grad, torch.ones(4, 3))
    g = D.global_graph(x)
    assert torch.equal(g.x, x) and D.global_graph(g) is g


def test_global_relations_block_restores_the_setting_even_on_error():
    with pytest.raises(RuntimeError), D.global_relations(False):
        assert not D._global_relations
        raise RuntimeError
    assert D._global_relations


def test_repeated_bank_indices_keep_the_last_occurrence():
    torch.manual_seed(0)
    bank = MemoryBank(4, 3, momentum=0.5).double()
    old = bank.memory.clone()
    x = torch.randn(3, 3, dtype=torch.float64)
    bank.update(torch.tensor([2, 0, 2]), x)
    mixed = 0.5 * old[2] + 0.5 * x[2]
    assert_close(bank.memory[2], mixed / math.sqrt(float(mixed @ mixed)))
    assert_close(bank.memory[1], old[1])
