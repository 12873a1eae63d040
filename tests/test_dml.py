"""Deep mutual learning: the peer losses against a written-out float64 reference, their symmetry and
detachment, unlabelled rows, both update orders against hand-written training loops (one optimiser
over every peer leaves the idle peer alone), bad options, the pinned defaults, a digits run whose rows
name both peers, and a bit-identical resume after an interruption in the middle of an epoch."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from relkd import configs
from relkd.config import load_config
from relkd.config.schema import TrainConfig
from relkd.experiment import RunDir, run_method
from relkd.experiment.results import summarize
from relkd.methods import STEPS, StageInfo, StepContext
from relkd.methods.dml import DML, mutual_kl
from relkd.train import Engine, TrainBatches, build_stages

torch.set_num_threads(1)

C, D = 4, 3


# --- float64 references, written out --------------------------------------------------------------


def ref_log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def ref_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, T: float) -> float:
    """Batch mean of KL(softmax(p / T) || softmax(q / T)), times T^2, by loops."""
    total = 0.0
    for p_row, q_row in zip(p_logits.tolist(), q_logits.tolist(), strict=True):
        log_p = ref_log_softmax([v / T for v in p_row])
        log_q = ref_log_softmax([v / T for v in q_row])
        total += sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q, strict=True))
    return T * T * total / len(p_logits)


def ref_ce(logits: torch.Tensor, target: list[int]) -> float:
    rows = [(row, t) for row, t in zip(logits.tolist(), target, strict=True) if t >= 0]
    return sum(-ref_log_softmax(row)[t] for row, t in rows) / max(1, len(rows))


def ref_peer_loss(z: list[torch.Tensor], k: int, target: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """L_k = CE(z_k) + 1/(K-1) sum_{l != k} KL(p_l || p_k), differentiable in z_k only (float64)."""
    zk = z[k]
    log_pk = zk - zk.max(1, keepdim=True).values
    log_pk = log_pk - log_pk.exp().sum(1, keepdim=True).log()
    labelled = (target >= 0).nonzero().flatten().tolist()
    ce = -sum(log_pk[i, int(target[i])] for i in labelled) / max(1, len(labelled))
    kl = 0.0
    for l, zl in enumerate(z):
        if l == k:
            continue
        zl = zl.detach() / T
        log_pl = zl - zl.logsumexp(1, keepdim=True)
        log_pk_t = zk / T - (zk / T).logsumexp(1, keepdim=True)
        kl = kl + (log_pl.exp() * (log_pl - log_pk_t)).sum(1).mean()
    return ce + T * T * kl / (len(z) - 1)


# --- helpers ---------------------------------------------------------------------------------------


def logits(b: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(b, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def linear(seed: int) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    net = nn.Linear(D, C, dtype=torch.float64)
    with torch.no_grad():
        net.weight.copy_(torch.randn(C, D, generator=g, dtype=torch.float64))
        net.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
    return net


def batch(b: int, seed: int, unlabelled: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, C, (b,), generator=g)
    target[b - unlabelled :] = -1
    return {"input": torch.randn(b, D, generator=g, dtype=torch.float64), "target": target,
            "index": torch.arange(b)}  # fmt: skip


def context(networks, data, ce_weight=1.0, update=None) -> StepContext:
    stage = StageInfo("train", 0, 1, 0, (), ce_weight)
    return StepContext(
        batch=data, epoch=0, step=0, steps_per_epoch=1, stage=stage, networks=networks,
        students=list(networks), teachers=[], terms={}, taps={}, update=update,
    )  # fmt: skip


# --- the loss --------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_mutual_kl_matches_the_written_out_reference(T):
    z = [logits(6, s) for s in range(3)]
    got = mutual_kl(z[0], z[1:], T)
    expected = (ref_kl(z[1], z[0], T) + ref_kl(z[2], z[0], T)) / 2
    assert abs(float(got) - expected) < 1e-12


def test_mutual_kl_gradient_matches_gradcheck_and_peers_stay_constant():
    z = logits(5, 0).requires_grad_()
    peers = [logits(5, 1).requires_grad_(), logits(5, 2).requires_grad_()]
    assert torch.autograd.gradcheck(lambda x: mutual_kl(x, peers, 2.0), (z,))
    mutual_kl(z, peers).backward()
    assert all(p.grad is None for p in peers)


def test_step_losses_match_the_reference_and_unlabelled_rows_feed_only_the_kl():
    nets = {"peer1": linear(1), "peer2": linear(2), "peer3": linear(3)}
    data = batch(7, 0, unlabelled=3)
    with torch.no_grad():
        out = DML(update="simultaneous", students=list(nets))(context(nets, data))
        z = [net(data["input"]) for net in nets.values()]
    target = data["target"].tolist()
    for k, name in enumerate(nets):
        others = [z[l] for l in range(3) if l != k]
        assert abs(float(out.losses[f"ce/{name}"]) - ref_ce(z[k], target)) < 1e-6  # CE in float32
        kl = sum(ref_kl(o, z[k], 1.0) for o in others) / 2
        assert abs(float(out.losses[f"kl/{name}"]) - kl) < 1e-12
    assert torch.equal(out.logits, z[0])
    # A batch of unlabelled rows only: no cross-entropy, the same KL.
    alone = {**data, "target": torch.full_like(data["target"], -1)}
    with torch.no_grad():
        out2 = DML(update="simultaneous", students=list(nets))(context(nets, alone))
    assert float(out2.losses["ce/peer1"]) == 0.0
    assert float(out2.losses["kl/peer1"]) == float(out.losses["kl/peer1"])


def test_two_peer_losses_mirror_each_other():
    a, b = linear(1), linear(2)
    data = batch(6, 0, unlabelled=2)
    with torch.no_grad():
        ab = DML(update="simultaneous", students=["peer1", "peer2"])(
            context({"peer1": a, "peer2": b}, data)
        ).losses
        ba = DML(update="simultaneous", students=["peer1", "peer2"])(
            context({"peer1": b, "peer2": a}, data)
        ).losses
    for part in ("ce", "kl"):
        assert torch.equal(ab[f"{part}/peer1"], ba[f"{part}/peer2"])
        assert torch.equal(ab[f"{part}/peer2"], ba[f"{part}/peer1"])
    za, zb = a(data["input"]).detach(), b(data["input"]).detach()
    assert abs(float(ab["kl/peer1"]) - ref_kl(zb, za, 1.0)) < 1e-12
    assert abs(float(ab["kl/peer2"]) - ref_kl(za, zb, 1.0)) < 1e-12


def test_the_gradient_of_each_peer_loss_reaches_that_peer_only():
    nets = {"peer1": linear(1), "peer2": linear(2)}
    data = batch(6, 0, unlabelled=2)
    losses = DML(update="simultaneous", students=list(nets))(context(nets, data)).losses
    (losses["ce/peer1"] + losses["kl/peer1"]).backward()
    assert all(p.grad is None for p in nets["peer2"].parameters())
    assert all(p.grad.abs().sum() > 0 for p in nets["peer1"].parameters())
    # ... and the peer's gradient of the whole objective is that of its own loss (reference).
    nets["peer1"].zero_grad(set_to_none=True)
    sum(DML(update="simultaneous", students=list(nets))(context(nets, data)).losses.values()).backward()
    z = [net(data["input"]) for net in nets.values()]
    expected = torch.autograd.grad(ref_peer_loss(z, 0, data["target"]), list(nets["peer1"].parameters()))
    for p, e in zip(nets["peer1"].parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-7)


def test_identical_peers_have_zero_kl():
    a = linear(1)
    b = linear(9)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        losses = DML(update="simultaneous", students=["peer1", "peer2"])(
            context({"peer1": a, "peer2": b}, batch(5, 0))
        ).losses
    assert float(losses["kl/peer1"]) == 0.0 and float(losses["kl/peer2"]) == 0.0
    assert float(losses["ce/peer1"]) > 0


def test_ce_weight_zero_drops_the_cross_entropy():
    nets = {"peer1": linear(1), "peer2": linear(2)}
    losses = DML(update="simultaneous", students=list(nets))(context(nets, batch(5, 0), ce_weight=0.0)).losses
    assert set(losses) == {"kl/peer1", "kl/peer2"}


# --- one optimiser over several peers --------------------------------------------------------------

OPTIMIZERS = {
    "sgd": {"name": "sgd", "lr": 0.3, "momentum": 0.9, "weight_decay": 0.05},
    "adamw": {"name": "adamw", "lr": 0.05, "weight_decay": 0.1},
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_a_parameter_without_gradient_is_left_alone_by_the_optimiser(optimizer):
    from relkd.optim import build_optimizer

    p, q = nn.Parameter(torch.tensor([1.0, -2.0])), nn.Parameter(torch.tensor([0.5]))
    opt = build_optimizer([p, q], OPTIMIZERS[optimizer])
    for _ in range(2):  # momentum / moment estimates now exist for both
        opt.zero_grad(set_to_none=True)
        (p.sum() ** 2 + 3 * q.sum()).backward()
        opt.step()
    before = p.detach().clone()
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
    opt.zero_grad(set_to_none=True)
    (q.sum() ** 2).backward()
    opt.step()
    assert torch.equal(p.detach(), before)
    assert all(torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v
               for k, v in state.items())  # fmt: skip


class HandOptimizer:
    """SGD (momentum, weight decay, torch's form) or AdamW, by hand, on one peer's float64 tensors."""

    def __init__(self, params: list[torch.Tensor], spec: dict) -> None:
        self.params, self.spec, self.t = params, spec, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def step(self, grads: list[torch.Tensor]) -> None:
        s = self.spec
        self.t += 1
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            if s["name"] == "sgd":
                g = g + s["weight_decay"] * p
                self.m[i] = g.clone() if self.t == 1 else s["momentum"] * self.m[i] + g
                p -= s["lr"] * self.m[i]
            else:
                b1, b2, eps = 0.9, 0.999, 1e-8
                p *= 1 - s["lr"] * s["weight_decay"]
                self.m[i] = b1 * self.m[i] + (1 - b1) * g
                self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
                m_hat, v_hat = self.m[i] / (1 - b1**self.t), self.v[i] / (1 - b2**self.t)
                p -= s["lr"] * m_hat / (v_hat.sqrt() + eps)


def hand_loop(update: str, spec: dict, batches: list[dict], seeds=(1, 2)) -> list[list[torch.Tensor]]:
    """Algorithm 1 of the paper (sequential) or every peer on the same predictions (simultaneous),
    with one optimiser per peer."""
    params = [[t.detach().clone() for t in (net.weight, net.bias)] for net in map(linear, seeds)]
    opts = [HandOptimizer(p, spec) for p in params]

    def grads_of(k: int, z: list[torch.Tensor], data: dict) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in params[k]]
        zk = data["input"] @ leaves[0].T + leaves[1]
        return list(torch.autograd.grad(ref_peer_loss([*z[:k], zk, *z[k + 1 :]], k, data["target"]), leaves))

    def predictions(data: dict) -> list[torch.Tensor]:
        return [data["input"] @ w.T + b for w, b in params]

    for data in batches:
        if update == "sequential":
            for k, opt in enumerate(opts):
                opt.step(grads_of(k, predictions(data), data))  # predictions with the peers updated so far
        else:
            z = predictions(data)
            grads = [grads_of(k, z, data) for k in range(len(opts))]
            for opt, g in zip(opts, grads, strict=True):
                opt.step(g)
    return params


class ListLoader:
    def __init__(self, batches):
        self.batches = batches

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def engine_run(update: str, spec: dict, batches: list[dict], tmp_path: Path) -> dict[str, nn.Module]:
    students = {"peer1": linear(1), "peer2": linear(2)}
    train = TrainConfig(epochs=1, optimizer=dict(spec))
    stages = build_stages(None, train, {}, {"name": "dml", "update": update})
    loader = ListLoader(batches)
    engine = Engine(
        students, stages, TrainBatches(loader), loader, tmp_path, probe=batches[0]["input"],
        log_agreement=False, tensorboard=False, quiet=True,
    )  # fmt: skip
    engine.fit()
    return students


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_both_update_orders_equal_hand_written_loops_with_one_optimiser_per_peer(optimizer, tmp_path):
    spec = OPTIMIZERS[optimizer]
    batches = [batch(8, s, unlabelled=3) for s in range(3)]
    finals = {}
    for update in ("sequential", "simultaneous"):
        nets = engine_run(update, spec, batches, tmp_path / update)
        expected = hand_loop(update, spec, batches)
        for net, (w, b) in zip(nets.values(), expected, strict=True):
            # the cross-entropy runs in float32, hence the tolerance
            torch.testing.assert_close(net.weight.detach(), w, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(net.bias.detach(), b, rtol=1e-6, atol=1e-6)
        finals[update] = nets
    # The first peer's first update is the same; everything after it differs.
    diff = (finals["sequential"]["peer2"].weight - finals["simultaneous"]["peer2"].weight).abs().max()
    assert diff > 1e-3


def test_sequential_recomputes_only_the_updated_peers():
    calls = []

    class Counted(nn.Linear):
        def forward(self, x):
            calls.append(self.tag)
            return super().forward(x)

    nets = {}
    for name in ["peer1", "peer2", "peer3"]:
        net = Counted(D, C, dtype=torch.float64)
        net.tag = name
        nets[name] = net
    opt = torch.optim.SGD([p for n in nets.values() for p in n.parameters()], lr=0.1)

    def update(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step = DML(update="sequential", students=list(nets))
    assert step.manual
    step(context(nets, batch(5, 0), update=update))
    # three forwards with gradients, then peer1 before peer2's update and peer2 before peer3's
    assert calls == ["peer1", "peer2", "peer3", "peer1", "peer2"]


# --- options, errors, defaults ---------------------------------------------------------------------


def test_bad_options_and_inputs_raise_clearly():
    with pytest.raises(ValueError, match="update must be one of simultaneous, sequential"):
        DML(update="alternate", students=["a", "b"])
    with pytest.raises(ValueError, match="K >= 2 peers, got 1 student"):
        DML(students=["student"])
    with pytest.raises(ValueError, match="T must be positive"):
        DML(T=0.0, students=["a", "b"])
    with pytest.raises(ValueError, match=r"same shape as the student's \[4, 4\], got \[3, 4\]"):
        mutual_kl(logits(4, 0), [logits(3, 1)])
    with pytest.raises(ValueError, match="at least one other peer"):
        mutual_kl(logits(4, 0), [])


def test_pinned_defaults():
    assert STEPS.get("dml") is DML and not DML.manual
    params = inspect.signature(DML).parameters
    # the paper's Algorithm 1 and the first author's TensorFlow code update the peers in turn
    assert params["update"].default == "sequential" and params["T"].default == 1.0
    method = yaml.safe_load(configs.method_path("dml").read_text())
    assert method["students"] == {"peer1": "student", "peer2": "student"}
    assert method["teachers"] == [] and method["deploy"] == ["peer1", "peer2"]
    assert method["step"] == {"name": "dml", "update": "sequential", "T": 1.0}
    assert method.get("train", {}).get("ce_weight", 1.0) == 1.0


# --- digits runs ---------------------------------------------------------------------------------

BASE = {
    "name": "tiny",
    "data": {"name": "digits", "train_subset": 40, "unlabeled": True, "batch_size": 16,
             "transfer_batch_size": 128, "test_batch_size": 256},
    "teacher": None,
    "student": {"model": "mlp", "args": {"width": 16, "depth": 2}},
    "train": {"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}},
    "methods": ["dml"],
    "seeds": [0],
    "probe_size": 64,
    "tensorboard": False,
}  # fmt: skip


def run(cfg, run_dir: Path, resume: bool = False) -> dict:
    return run_method(cfg, "dml", 0, {}, RunDir(run_dir), resume=resume, quiet=True, echo=lambda s: None)


def test_digits_run_trains_both_peers_and_names_them_in_the_table(tmp_path):
    cfg = load_config(BASE)[0]
    result = run(cfg, tmp_path)
    assert result["deployed"] == ["peer1", "peer2"]
    assert [r.method for r in summarize({"dml": [result]})] == ["dml (peer1)", "dml (peer2)"]
    rows = [json.loads(line) for line in (tmp_path / "dml/seed0/metrics.jsonl").read_text().splitlines()]
    assert {"loss/ce/peer1", "loss/kl/peer1", "loss/ce/peer2", "loss/kl/peer2", "peer2/test_acc1"} <= set(
        rows[0]
    )
    assert rows[1]["loss/ce/peer1"] < rows[0]["loss/ce/peer1"]
    final = torch.load(tmp_path / "dml/seed0/final.pt", weights_only=True)["students"]
    assert any(not torch.equal(final["peer1"][k], final["peer2"][k]) for k in final["peer1"])


class Interrupt(BaseException):
    pass


def interrupt_mid_epoch(monkeypatch, epoch: int, after: int) -> None:
    """Stop the run (like Ctrl-C) after ``after`` training steps of epoch ``epoch`` (0-based), once."""
    original = TrainBatches.epoch
    armed = [True]

    def epoch_fn(self, e, with_transfer):
        batches = original(self, e, with_transfer)
        if not (armed[0] and e == epoch):
            return batches
        armed[0] = False

        def cut():
            for i, b in enumerate(batches):
                if i == after:
                    raise Interrupt
                yield b

        return cut()

    monkeypatch.setattr(TrainBatches, "epoch", epoch_fn)


def final_tensors(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(node, torch.Tensor):
            flat[prefix] = node

    walk("", {k: state[k] for k in ("students", "losses", "steps")})
    return flat


@pytest.mark.parametrize("update", ["simultaneous", "sequential"])
def test_resume_after_a_mid_epoch_interruption_is_bit_identical(tmp_path, monkeypatch, update):
    cfg = load_config(BASE, [f"methods.dml.step.update={update}"])[0]
    straight = run(cfg, tmp_path / "a")
    interrupt_mid_epoch(monkeypatch, epoch=1, after=4)
    with pytest.raises(Interrupt):
        run(cfg, tmp_path / "b")
    checkpoint = torch.load(tmp_path / "b/dml/seed0/checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    resumed = run(cfg, tmp_path / "b", resume=True)
    a, b = final_tensors(tmp_path / "a/dml/seed0/final.pt"), final_tensors(tmp_path / "b/dml/seed0/final.pt")
    assert a.keys() == b.keys() and any(k.startswith(".students.peer2") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["networks"] == straight["networks"]
