"""FFSD: the warm-up, the diversity target by hand, every loss of a step against its formula written out
in float64, which module each loss reaches, one update against the authors' sequence of updates, module
shapes on probe features, and digits runs (the leader deployed, the warm-up per epoch, exact resume)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from relkd import configs, models
from relkd.config import load_config
from relkd.experiment import RunDir, run_method
from relkd.losses.at import attention_map
from relkd.methods import STEPS, StageInfo, StepContext
from relkd.methods.ffsd import (
    FFSD,
    SDDecoder,
    diversity_loss,
    reflected_attention,
    reflected_features,
    warmup,
)
from relkd.train import TrainBatches

torch.set_num_threads(1)

COMMON = ["student1", "student2"]
NAMES = [*COMMON, "leader"]


# --- references, written out -------------------------------------------------------------------------


def ref_attention(f: torch.Tensor) -> list[list[float]]:
    """Per sample: the channel mean of F^2 at every position (row-major), divided by its L2 norm."""
    b, c, h, w = f.shape
    out = []
    for i in range(b):
        q = [sum(float(f[i, k, y, x]) ** 2 for k in range(c)) / c for y in range(h) for x in range(w)]
        norm = math.sqrt(sum(v * v for v in q))
        out.append([v / max(norm, 1e-12) for v in q])
    return out


def ref_reflect(f: torch.Tensor) -> list[list[float]]:
    """Per sample: entries of the normalised attention above the floor(HW/3)-th smallest become
    ||q|| - v, that entry itself ||q|| / 2, the rest stay (||q|| the raw attention's norm)."""
    b, c, h, w = f.shape
    out = []
    for i in range(b):
        q = [sum(float(f[i, k, y, x]) ** 2 for k in range(c)) / c for y in range(h) for x in range(w)]
        norm = math.sqrt(sum(v * v for v in q))
        unit = [v / norm for v in q]
        threshold = sorted(unit)[(h * w) // 3 - 1]
        out.append([norm - v if v > threshold else norm / 2 if v == threshold else v for v in unit])
    return out


def ref_mse(a: list[list[float]], b: list[list[float]]) -> float:
    sq = [(x - y) ** 2 for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(sq) / len(sq)


def ref_at(x: torch.Tensor, y: torch.Tensor) -> float:
    return ref_mse(ref_attention(x), ref_attention(y))


def ref_nmse(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over B * CHW of the squared difference of the per-sample L2-normalised flattenings."""

    def unit(t):
        rows = [[float(v) for v in t[i].flatten()] for i in range(t.shape[0])]
        return [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in rows]

    return ref_mse(unit(x), unit(y))


def ref_kl(s: torch.Tensor, t: torch.Tensor, T: float) -> float:
    """T^2 / B * sum_b sum_c p_t (log p_t - log p_s), p = softmax(z / T)."""
    total = 0.0
    for zs, zt in zip(s.tolist(), t.tolist(), strict=True):
        ls = [v / T - math.log(sum(math.exp(u / T) for u in zs)) for v in zs]
        lt = [v / T - math.log(sum(math.exp(u / T) for u in zt)) for v in zt]
        total += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls, strict=True))
    return T * T * total / s.shape[0]


def ref_ce(z: torch.Tensor, y: torch.Tensor) -> float:
    rows = [(zr, int(c)) for zr, c in zip(z.tolist(), y.tolist(), strict=True) if c >= 0]
    return sum(math.log(sum(math.exp(v) for v in zr)) - zr[c] for zr, c in rows) / len(rows)


# --- networks, probe features and a context, as the engine makes them ------------------------------------


def build(names=NAMES, model="lenet", width=2, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    nets = {n: models.create(model, num_classes=10, in_channels=1, width=width).to(dtype) for n in names}
    taps = {n: models.FeatureTaps(net, models.resolve_taps(net, FFSD.taps)) for n, net in nets.items()}
    probe = torch.randn(5, 1, 8, 8, dtype=dtype)
    features = {}
    with torch.no_grad():
        for n, net in nets.items():
            logits = net(probe)
            features[n] = {**taps[n].features, "logits": logits}
    return nets, taps, features


def context(nets, taps, batch, epoch=0):
    stage = StageInfo("train", 0, 10, 0, (), 1.0)
    return StepContext(
        batch=batch, epoch=epoch, step=0, steps_per_epoch=1, stage=stage, networks=nets,
        students=list(nets), teachers=[], terms={}, taps=taps,
    )  # fmt: skip


def batch(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 1, 8, 8, generator=g, dtype=dtype)
    return {"input": x, "target": torch.tensor([3, 1, -1, 7, 0, -1, 9, 3]), "index": torch.arange(8)}


# --- defaults and warm-up ---------------------------------------------------------------------------


def test_step_is_registered_with_the_official_defaults():
    assert STEPS.get("ffsd") is FFSD
    _, _, features = build()
    step = FFSD(NAMES, features)
    assert (step.leader, step.common, step.T, step.warmup_epochs) == ("leader", COMMON, 2.0, 5)
    assert step.lambdas == (1e-5, 10.0, 1000.0)
    data = yaml.safe_load(configs.method_path("ffsd").read_text())
    assert data["step"] == {
        "name": "ffsd", "leader": "leader", "T": 2.0, "lambda_diversity": 1e-5, "lambda_fusion": 10.0,
        "lambda_self_distillation": 1000.0, "warmup_epochs": 5,
    }  # fmt: skip
    assert data["students"] == {"student1": "student", "student2": "student", "leader": "student"}
    assert data["teachers"] == [] and data["deploy"] == ["leader"]


def test_warmup_factors_per_epoch():
    # The code's epochs count from 1: exp(-5 (1 - e/5)^2) for e = 1..5 is exp(-3.2), exp(-1.8), exp(-0.8),
    # exp(-0.2), 1, in relkd's stage epochs 0..4; 1 afterwards.
    expected = [math.exp(-3.2), math.exp(-1.8), math.exp(-0.8), math.exp(-0.2), 1.0, 1.0, 1.0]
    assert [round(v, 3) for v in expected[:5]] == [0.041, 0.165, 0.449, 0.819, 1.0]
    _, _, features = build()
    step = FFSD(NAMES, features)
    for epoch, factor in enumerate(expected):
        got = step.weights(epoch)
        assert got == pytest.approx((1e-5 * factor, 10.0 * factor, 1000.0 * factor), rel=1e-12), epoch
    assert warmup(3.0, 1, epochs=0) == 3.0


# --- the diversity target by hand --------------------------------------------------------------------


def maps_with_attention(q: list[list[float]], channels: int = 2) -> torch.Tensor:
    """Feature maps [B, C, 1, HW] whose channel mean of squares is q (every channel sqrt(q))."""
    root = torch.tensor(q, dtype=torch.float64).sqrt()
    return root[:, None, None, :].expand(-1, channels, 1, -1).contiguous()


def test_diversity_target_matches_a_hand_computed_vector():
    # q = (1, 2, 3, 4, 5, 27) in shuffled positions: ||q|| = 28 (1+4+9+16+25+729 = 784), HW/3 = 2, so
    # the threshold is 2/28: 1/28 stays, 2/28 becomes 28/2 = 14, v/28 above it becomes 28 - v/28.
    order = [4, 0, 5, 2, 1, 3]
    q = [1.0, 2.0, 3.0, 4.0, 5.0, 27.0]
    r = [1 / 28, 14.0, 28 - 3 / 28, 28 - 4 / 28, 28 - 5 / 28, 28 - 27 / 28]
    # The same shape at twice the scale: the norm (56) is the raw attention's, so the target moves.
    r2 = [1 / 28, 28.0, 56 - 3 / 28, 56 - 4 / 28, 56 - 5 / 28, 56 - 27 / 28]
    f = maps_with_attention([[q[i] for i in order], [2 * q[i] for i in order]])
    expected = torch.tensor([[r[i] for i in order], [r2[i] for i in order]], dtype=torch.float64)
    torch.testing.assert_close(reflected_attention(f), expected, rtol=1e-12, atol=1e-12)
    # HW = 4 keeps only the smallest entry: q = (1, 2, 4, 10), ||q|| = 11.
    f4 = maps_with_attention([[10.0, 1.0, 4.0, 2.0]], channels=3)
    expected4 = torch.tensor([[11 - 10 / 11, 5.5, 11 - 4 / 11, 11 - 2 / 11]], dtype=torch.float64)
    torch.testing.assert_close(reflected_attention(f4), expected4, rtol=1e-12, atol=1e-12)


def test_sd_input_is_the_map_shifted_by_the_attention_change():
    # rho(F) = F + ||q|| / C * (r - q / ||q||) on every channel: with ||q|| = 28 and C = 2, 14 (r - q/28).
    q = [1.0, 2.0, 3.0, 4.0, 5.0, 27.0]
    r = [1 / 28, 14.0, 28 - 3 / 28, 28 - 4 / 28, 28 - 5 / 28, 28 - 27 / 28]
    f = maps_with_attention([q])
    shift = torch.tensor([14 * (a - b / 28) for a, b in zip(r, q, strict=True)], dtype=torch.float64)
    torch.testing.assert_close(reflected_features(f), f + shift.view(1, 1, 1, 6), rtol=1e-12, atol=1e-12)


def test_diversity_loss_against_the_reference_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    current = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    previous = torch.randn(3, 5, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    value = diversity_loss(current, previous)
    expected = ref_mse(ref_attention(current.detach()), ref_reflect(previous.detach()))
    assert float(value.detach()) == pytest.approx(expected, rel=1e-12)
    value.backward()
    assert previous.grad is None
    assert torch.autograd.gradcheck(
        lambda c: diversity_loss(c, previous), (current.detach().requires_grad_(),)
    )


def test_attention_maps_have_unit_norm():
    g = torch.Generator().manual_seed(2)
    maps = attention_map(torch.randn(4, 6, 5, 3, generator=g, dtype=torch.float64) * 7.0)
    torch.testing.assert_close(maps.norm(dim=1), torch.ones(4, dtype=torch.float64), rtol=1e-12, atol=0)
    assert float(attention_map(torch.zeros(1, 2, 3, 3)).abs().sum()) == 0.0


def test_diversity_needs_three_positions():
    with pytest.raises(ValueError, match="at least 3 positions"):
        reflected_attention(torch.ones(1, 2, 1, 2))


# --- module shapes on the probe features --------------------------------------------------------------


def test_modules_are_sized_from_the_probe_features():
    nets, taps, features = build(width=3)
    step = FFSD(NAMES, features, num_classes=10).double()
    # lenet's stage3 is its feature_map: each distinct tapped tensor once.
    assert step.chain == ["stage1", "stage2", "feature_map"]
    shapes = [tuple(features["leader"][t].shape) for t in step.chain]
    assert shapes == [(5, 3, 4, 4), (5, 6, 2, 2), (5, 12, 2, 2)]
    stacked = torch.cat([features[n]["feature_map"] for n in COMMON], dim=1)
    logits, fused = step.fusion(stacked)
    assert logits.shape == (5, 10) and fused.shape == (5, 12, 2, 2)
    assert step.trans_fusion(features["leader"]["feature_map"]).shape == (5, 24, 2, 2)
    assert list(step.decoders) == ["student2", "leader"]
    decoded = step.decoders["leader"](features["leader"]["feature_map"])
    assert [tuple(d.shape) for d in decoded] == shapes[:-1]
    mix = step.fusion.mix[0]
    assert (mix.groups, mix.kernel_size, mix.in_channels, mix.out_channels) == (24, (3, 3), 24, 24)
    reduce = step.fusion.reduce[0]
    assert (reduce.kernel_size, reduce.in_channels, reduce.out_channels) == ((1, 1), 24, 12)


def test_decoders_of_the_cifar_resnets_are_the_authors():
    # small_resnet = the CIFAR ResNet: stride-2 transposed convolutions halving the channels.
    _, _, features = build(model="small_resnet", width=4)
    step = FFSD(NAMES, features)
    assert step.chain == ["stage1", "stage2", "feature_map"]
    convs = [block[0] for block in step.decoders["student2"].blocks]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(16, 8), (8, 4)]
    for c in convs:
        assert (c.kernel_size, c.stride, c.padding, c.output_padding, c.bias) == (
            (3, 3),
            (2, 2),
            (1, 1),
            (1, 1),
            None,
        )


def test_bad_setups_raise():
    _, _, features = build()
    with pytest.raises(ValueError, match="leader 'chief'"):
        FFSD(NAMES, features, leader="chief")
    with pytest.raises(ValueError, match="two common students"):
        FFSD(["student1", "leader"], features)
    with pytest.raises(ValueError, match="remove the method's losses"):
        FFSD(NAMES, features, terms={"kd": object()})
    _, _, mlp = build(model="mlp", width=8)
    with pytest.raises(ValueError, match=r"feature maps \[B, C, H, W\]"):
        FFSD(NAMES, mlp)
    with pytest.raises(ValueError, match="whole multiple"):
        SDDecoder([(4, 3, 3), (8, 2, 2)])


# --- one step: values, gradients, the update ----------------------------------------------------------


def test_step_losses_match_the_formulas():
    names = ["s1", "s2", "s3", "leader"]
    nets, taps, features = build(names)
    step = FFSD(names, features).double()
    twin = copy.deepcopy(step)
    b = batch()
    x, y = b["input"], b["target"]
    epoch = 1
    lam_div, lam_fus, lam_sd = (w * math.exp(-1.8) for w in (1e-5, 10.0, 1000.0))
    with torch.no_grad():
        f = {}
        for n in names:
            logits = nets[n](x)
            f[n] = {**{t: v.clone() for t, v in taps[n].features.items()}, "logits": logits}
        maps = {n: [f[n]["stage1"], f[n]["stage2"], f[n]["feature_map"]] for n in names}
        stacked = torch.cat([maps[n][-1] for n in names[:3]], 1)
        fusion_logits, fused = twin.fusion(stacked)
        ensemble = sum(f[n]["logits"] for n in names[:3]) / 3
        # targets from the decoders in eval mode (running statistics), before their training forward
        twin.decoders.eval()
        sd_targets = {
            n: twin.decoders[n](reflected_features(maps[p][-1])) for n, p in [("s2", "s1"), ("s3", "s2")]
        }
        sd_targets["leader"] = twin.decoders["leader"](fused)
        twin.decoders.train()
        decoded = {n: twin.decoders[n](maps[n][-1]) for n in ["s2", "s3", "leader"]}
        trans = twin.trans_fusion(maps["leader"][-1])
    out = step(context(nets, taps, b, epoch=epoch))

    expected = {}
    for i, n in enumerate(names[:3]):
        expected[f"{n}.ce"] = ref_ce(f[n]["logits"], y)
        others = [ref_kl(f[n]["logits"], f[o]["logits"], 2.0) for o in names[:3] if o != n]
        expected[f"{n}.kl"] = sum(others) / 2
        if i:
            prev = maps[names[i - 1]][-1]
            expected[f"{n}.diversity"] = lam_div * ref_mse(ref_attention(maps[n][-1]), ref_reflect(prev))
            expected[f"{n}.sd"] = lam_div * sum(
                ref_at(a, t) for a, t in zip(maps[n][:2], sd_targets[n], strict=True)
            )
    expected["fusion.ce"] = ref_ce(fusion_logits, y)
    expected["fusion.kl"] = ref_kl(fusion_logits, ensemble, 2.0)
    expected["leader.ce"] = ref_ce(f["leader"]["logits"], y)
    expected["leader.kl"] = ref_kl(f["leader"]["logits"], fusion_logits, 2.0)
    expected["leader.fusion"] = lam_fus * ref_at(maps["leader"][-1], fused)
    expected["leader.trans_fusion"] = lam_fus * ref_at(trans, stacked)
    expected["leader.sd"] = lam_fus * sum(
        ref_at(a, t) for a, t in zip(maps["leader"][:2], sd_targets["leader"], strict=True)
    )
    for n, outs in decoded.items():
        pairs = list(zip(outs, maps[n][:2], strict=True))
        expected[f"decoder.{n}"] = lam_sd * sum(ref_nmse(d, t) + ref_at(d, t) for d, t in pairs)
    assert set(out.losses) == set(expected)
    for key, value in expected.items():
        # the cross-entropy is computed in float32 (relkd.methods.cross_entropy), the rest in float64
        rel = 1e-6 if key.endswith(".ce") else 1e-9
        assert float(out.losses[key].detach()) == pytest.approx(value, rel=rel, abs=1e-15), key
    torch.testing.assert_close(out.logits, f["leader"]["logits"])
    assert float(out.metrics["leader.fusion"].detach()) == pytest.approx(
        expected["leader.fusion"] / lam_fus, rel=1e-9
    )


def owners(step, nets):
    """Which parameters each loss may reach (the code's optimiser of that loss)."""
    own = {}
    for n in nets:
        for part in ("ce", "kl", "diversity", "sd"):
            own[f"{n}.{part}"] = list(nets[n].parameters())
    own["leader.fusion"] = list(nets["leader"].parameters())
    own["fusion.ce"] = own["fusion.kl"] = list(step.fusion.parameters())
    own["leader.trans_fusion"] = [*nets["leader"].parameters(), *step.trans_fusion.parameters()]
    for n, d in step.decoders.items():
        own[f"decoder.{n}"] = list(d.parameters())
    return own


def test_each_loss_reaches_only_its_own_module():
    nets, taps, features = build()
    step = FFSD(NAMES, features).double()
    out = step(context(nets, taps, batch()))
    own = owners(step, nets)
    every = [p for m in [*nets.values(), step] for p in m.parameters()]
    for key, loss in out.losses.items():
        allowed = {id(p) for p in own[key]}
        grads = torch.autograd.grad(loss, every, retain_graph=True, allow_unused=True)
        reached = {
            id(p) for p, g in zip(every, grads, strict=True) if g is not None and bool(g.abs().sum() > 0)
        }
        assert reached and reached <= allowed, key


def test_the_fusion_loss_sends_no_gradient_into_the_students():
    nets, taps, features = build()
    step = FFSD(NAMES, features).double()
    out = step(context(nets, taps, batch()))
    fusion = out.losses["fusion.ce"] + out.losses["fusion.kl"]
    students = [p for n in COMMON for p in nets[n].parameters()]
    assert all(g is None for g in torch.autograd.grad(fusion, students, retain_graph=True, allow_unused=True))
    assert all(g is not None for g in torch.autograd.grad(fusion, list(step.fusion.parameters())))


def test_one_update_equals_the_authors_sequence_of_updates():
    # The code: one forward, then students, fusion module, leader, decoders each stepped by its own SGD.
    # Here: one backward of the sum and one optimiser over everything (same hyperparameters).
    nets, taps, features = build()
    step = FFSD(NAMES, features).double()
    b = batch()
    sgd = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
    nets2, taps2, _ = build()
    step2 = copy.deepcopy(step)

    out = step(context(nets, taps, b, epoch=4))
    groups = [
        (list(nets[n].parameters()), [k for k in out.losses if k.startswith(f"{n}.")]) for n in COMMON
    ] + [
        (list(step.fusion.parameters()), ["fusion.ce", "fusion.kl"]),
        ([*nets["leader"].parameters(), *step.trans_fusion.parameters()],
         [k for k in out.losses if k.startswith("leader.")]),
        *[(list(d.parameters()), [f"decoder.{n}"]) for n, d in step.decoders.items()],
    ]  # fmt: skip
    for params, keys in groups:
        opt = torch.optim.SGD(params, **sgd)
        opt.zero_grad()
        sum(out.losses[k] for k in keys).backward(retain_graph=True)
        opt.step()

    out2 = step2(context(nets2, taps2, b, epoch=4))
    everything = [p for m in [*nets2.values(), step2] for p in m.parameters()]
    opt = torch.optim.SGD(everything, **sgd)
    opt.zero_grad()
    sum(out2.losses.values()).backward()
    opt.step()
    for (name, a), (_, c) in zip(
        [
            *((f"{n}.{k}", v) for n in NAMES for k, v in nets[n].state_dict().items()),
            *step.state_dict().items(),
        ],
        [
            *((f"{n}.{k}", v) for n in NAMES for k, v in nets2[n].state_dict().items()),
            *step2.state_dict().items(),
        ],
        strict=True,
    ):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14, msg=name)


# --- digits runs --------------------------------------------------------------------------------------

SUITE = {
    "name": "tiny",
    "data": {"name": "digits", "train_subset": 40, "unlabeled": True, "batch_size": 16,
             "transfer_batch_size": 32, "test_batch_size": 256},
    "teacher": None,
    "student": {"model": "lenet", "args": {"width": 2}},
    "train": {"epochs": 2, "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 1e-4}},
    "methods": ["ffsd"],
    "seeds": [0],
    "probe_size": 32,
    "tensorboard": False,
}  # fmt: skip


def run(run_dir: Path, resume: bool = False) -> dict:
    cfg = load_config(SUITE)[0]
    return run_method(cfg, "ffsd", 0, {}, RunDir(run_dir), resume=resume, quiet=True, echo=lambda s: None)


@pytest.mark.slow
def test_digits_run_deploys_the_leader_and_warms_up_per_epoch(tmp_path):
    result = run(tmp_path)
    assert result["deployed"] == ["leader"] and list(result["networks"]) == ["leader"]
    final = torch.load(tmp_path / "ffsd/seed0/final.pt", weights_only=True)
    assert set(final["students"]) == set(NAMES)
    assert {k.split(".")[1] for k in final["steps"]} == {"fusion", "trans_fusion", "decoders"}
    rows = [json.loads(line) for line in (tmp_path / "ffsd/seed0/metrics.jsonl").read_text().splitlines()]
    for row, factor in zip(rows, [math.exp(-3.2), math.exp(-1.8)], strict=True):
        for key, weight in [
            ("leader.fusion", 10.0),
            ("student2.diversity", 1e-5),
            ("decoder.leader", 1000.0),
        ]:
            assert row[f"loss/{key}"] == pytest.approx(weight * factor * row[f"raw/{key}"], rel=1e-5), key
    assert "loss/student1.diversity" not in rows[0]


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
            for i, item in enumerate(batches):
                if i == after:
                    raise Interrupt
                yield item

        return cut()

    monkeypatch.setattr(TrainBatches, "epoch", epoch_fn)


@pytest.mark.slow
def test_resume_mid_epoch_ends_bit_identical(tmp_path, monkeypatch):
    straight = run(tmp_path / "a")
    interrupt_mid_epoch(monkeypatch, 1, after=2)
    with pytest.raises(Interrupt):
        run(tmp_path / "b")
    assert torch.load(tmp_path / "b/ffsd/seed0/checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = run(tmp_path / "b", resume=True)
    a = torch.load(tmp_path / "a/ffsd/seed0/final.pt", weights_only=True)
    b = torch.load(tmp_path / "b/ffsd/seed0/final.pt", weights_only=True)
    assert set(a["students"]) == set(b["students"]) == set(NAMES)
    for name in NAMES:
        for key, value in a["students"][name].items():
            assert torch.equal(value, b["students"][name][key]), f"{name}.{key}"
    assert a["steps"].keys() == b["steps"].keys() and a["steps"]
    for key, value in a["steps"].items():
        assert torch.equal(value, b["steps"][key]), key
    assert resumed["last_acc1"] == straight["last_acc1"]
