"""CKDN and the synthetic DR-IQA benchmark: SSIM against hand cases and a written-out windowed formula,
SRCC/PLCC on hand values, the Elo target, the feature term against loops (and where its gradient goes),
the two batch transforms, the step's losses against separate forwards of the shared network (both
phases), the data set's layout and pairs, the evaluator, pinned defaults, and 2-epoch runs of the
generic method on digits and of every method of the IQA experiment."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from relkd import models
from relkd.config import load_config
from relkd.config.methods import load_method
from relkd.data.iqa import DEGRADATIONS, RESTORATIONS, gaussian_window, ssim, swap_reference
from relkd.evaluation import EvalContext
from relkd.evaluation.iqa import IQACorrelation, plcc, srcc
from relkd.experiment import RunDir, run_method
from relkd.methods import StageInfo, StepContext, build_transform
from relkd.methods.ckdn import CKDN, DRIQANet, elo_target, feature_distance

torch.set_num_threads(1)

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "ckdn" / "config.yaml"
C1, C2 = 0.01**2, 0.03**2


def fashion_mnist_available() -> bool:
    from relkd.data import build

    try:
        build("fashion_mnist", augment=False)
    except FileNotFoundError:
        return False
    return True


needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(), reason="Fashion-MNIST files not installed"
)


# --- SSIM ----------------------------------------------------------------------------------------------


def ref_ssim(x: list[list[float]], y: list[list[float]], window: int = 11, sigma: float = 1.5) -> float:
    """Wang et al.'s SSIM of two single-channel images by loops: Gaussian-weighted statistics of every
    window position inside the image, averaged."""
    half = (window - 1) / 2
    w = [
        [math.exp(-((i - half) ** 2 + (j - half) ** 2) / (2 * sigma**2)) for j in range(window)]
        for i in range(window)
    ]
    total_w = sum(map(sum, w))
    w = [[v / total_w for v in row] for row in w]
    n_rows, n_cols = len(x) - window + 1, len(x[0]) - window + 1
    values = []
    for a in range(n_rows):
        for b in range(n_cols):

            def moment(f, a=a, b=b):
                return sum(w[i][j] * f(a + i, b + j) for i in range(window) for j in range(window))

            mx, my = moment(lambda i, j: x[i][j]), moment(lambda i, j: y[i][j])
            vx = moment(lambda i, j: x[i][j] ** 2) - mx**2
            vy = moment(lambda i, j: y[i][j] ** 2) - my**2
            cxy = moment(lambda i, j: x[i][j] * y[i][j]) - mx * my
            values.append(((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx**2 + my**2 + C1) * (vx + vy + C2)))
    return sum(values) / len(values)


def test_ssim_of_constant_images_is_the_luminance_term_and_of_identical_images_one():
    a, b = 0.2, 0.7
    x, y = (
        torch.full((1, 1, 11, 11), a, dtype=torch.float64),
        torch.full((1, 1, 11, 11), b, dtype=torch.float64),
    )
    assert float(ssim(x, y)[0]) == pytest.approx((2 * a * b + C1) / (a * a + b * b + C1), abs=1e-10)
    z = torch.rand(3, 2, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(ssim(z, z), torch.ones(3, dtype=torch.float64), atol=1e-12)


def test_ssim_matches_the_windowed_formula_written_out():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 2, 13, 12, generator=g, dtype=torch.float64)
    y = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim(x, y)
    for b in range(2):
        expected = (
            sum(ref_ssim(x[b, c].tolist(), y[b, c].tolist()) for c in range(2)) / 2
        )  # channels averaged
        assert float(got[b]) == pytest.approx(expected, abs=1e-12)
    assert torch.allclose(ssim(y, x), got, atol=1e-14)


def test_ssim_window_and_bad_inputs():
    w = gaussian_window(11, 1.5)
    assert float(w.sum()) == pytest.approx(1.0) and w[5, 5] == w.max() and torch.equal(w, w.T)
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="of one shape"):
        ssim(torch.zeros(1, 1, 12, 12), torch.zeros(1, 1, 12, 13))


# --- SRCC / PLCC --------------------------------------------------------------------------------------


def test_srcc_and_plcc_on_hand_values():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    # deviations (-2 -1 0 1 2) and (-1 -2 1 0 2): sum of products 8, sums of squares 10 and 10
    assert plcc(pred, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])) == pytest.approx(0.8)
    assert srcc(pred, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])) == pytest.approx(0.8)
    # tied targets: average ranks (1.5 1.5 3 4.5 4.5); rank deviations give 9 / sqrt(9 * 10)
    assert srcc(pred, torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0])) == pytest.approx(9 / math.sqrt(90))
    assert plcc(pred, torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0])) == pytest.approx(6 / math.sqrt(40))
    curved = pred.exp()
    assert srcc(pred, curved) == pytest.approx(1.0) and plcc(pred, curved) < 0.95
    assert srcc(pred, -curved) == pytest.approx(-1.0)
    assert math.isnan(srcc(pred, torch.ones(5))) and math.isnan(plcc(torch.ones(5), pred))
    with pytest.raises(ValueError, match="as many predictions as targets"):
        srcc(pred, pred[:3])


class FirstPixel(torch.nn.Module):
    """Predicts the first pixel of the first channel: ``[B, 1]``."""

    def forward(self, x):
        return x[:, :1, 0, 0]


def test_the_evaluator_reports_overall_and_per_reference_correlations():
    score = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2, 0.4, 0.8, 0.6])
    predicted = torch.tensor([0.2, 0.4, 0.3, 0.5, 0.9, 0.1, 0.7, 0.6])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    x = torch.zeros(8, 2, 3, 3)
    x[:, 0, 0, 0] = predicted
    reference = torch.zeros(8, 1, 3, 3)
    batches = [
        {"input": x[:5], "score": score[:5], "group": group[:5], "reference": reference[:5]},
        {"input": x[5:], "score": score[5:], "group": group[5:], "reference": reference[5:]},
    ]
    ctx = EvalContext("student", {"student": FirstPixel()}, {"test": batches}, torch.device("cpu"))
    out = IQACorrelation()(ctx)
    assert out["srcc"] == pytest.approx(srcc(predicted, score)) and out["plcc"] == pytest.approx(
        plcc(predicted, score)
    )
    first, second = slice(0, 4), slice(4, 8)
    assert out["srcc_ref"] == pytest.approx(
        (srcc(predicted[first], score[first]) + srcc(predicted[second], score[second])) / 2
    )
    assert out["plcc_ref"] == pytest.approx(
        (plcc(predicted[first], score[first]) + plcc(predicted[second], score[second])) / 2
    )
    # the reference view feeds (first channels, reference): here the first channel is kept
    assert IQACorrelation(view="reference")(ctx)["srcc"] == pytest.approx(out["srcc"])
    with pytest.raises(ValueError, match="view must be one of"):
        IQACorrelation(view="pristine")


# --- the pieces of the method --------------------------------------------------------------------------


def test_elo_target_is_the_elo_expectation():
    a, b = torch.tensor([0.7, 0.3, 0.5]), torch.tensor([0.3, 0.7, 0.5])
    t = elo_target(a, b)
    assert float(t[0]) == pytest.approx(1 / (1 + 10**1.0))  # 2.5 x 0.4 = 1
    assert torch.allclose(t + elo_target(b, a), torch.ones(3)) and float(t[2]) == pytest.approx(0.5)


@pytest.mark.parametrize("reduction", ["code", "mse"])
def test_feature_distance_matches_loops_and_reaches_both_views(reduction):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    per_image = [
        sum((u - v) ** 2 for u, v in zip(a[i].flatten().tolist(), b[i].flatten().tolist(), strict=True)) / 8
        for i in range(3)
    ]
    expected = sum(m**2 for m in per_image) / 3 if reduction == "code" else sum(per_image) / 3
    value = feature_distance(a, b, reduction)
    assert float(value.detach()) == pytest.approx(expected, abs=1e-12)
    value.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    assert float(feature_distance(a.detach(), a.detach().clone(), reduction)) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        feature_distance(a, b[:2], reduction)


def test_degrade_makes_the_two_views():
    x = torch.randn(4, 2, 9, 9, generator=torch.Generator().manual_seed(0))
    same = build_transform({"name": "degrade", "blur": 0.0, "noise": 0.0})({"input": x}, None)
    assert same["privileged"] is x and torch.equal(same["input"], x)
    blur = build_transform({"name": "degrade", "blur": 1.0, "noise": 0.0})
    delta = torch.zeros(1, 1, 9, 9)
    delta[0, 0, 4, 4] = 1.0
    g = [math.exp(-(r**2) / 2) for r in range(-3, 4)]
    assert float(blur({"input": delta}, None)["input"][0, 0, 4, 4]) == pytest.approx(
        (g[3] / sum(g)) ** 2, rel=1e-6
    )
    # linear with weights summing to 1 and replicated borders: it commutes with per-channel normalisation
    assert torch.allclose(
        blur({"input": 0.3 * x + 0.5}, None)["input"],
        0.3 * blur({"input": x}, None)["input"] + 0.5,
        atol=1e-6,
    )
    torch.manual_seed(0)
    noisy = build_transform({"name": "degrade", "blur": 0.0, "noise": 0.5})(
        {"input": torch.zeros(64, 1, 16, 16)}, None
    )
    assert float(noisy["input"].std()) == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError, match="must be >= 0"):
        build_transform({"name": "degrade", "blur": -1.0})


def test_reference_view_swaps_the_reference_channels():
    x, ref = torch.randn(3, 2, 4, 4), torch.randn(3, 1, 4, 4)
    out = build_transform({"name": "reference_view"})({"input": x, "reference": ref}, None)
    assert torch.equal(out["input"], x) and torch.equal(out["privileged"][:, :1], x[:, :1])
    assert torch.equal(out["privileged"][:, 1:], ref)
    replaced = build_transform({"name": "reference_view", "replace": True})(
        {"input": x, "reference": ref}, None
    )
    assert torch.equal(replaced["input"], replaced["privileged"])
    with pytest.raises(KeyError, match="no 'reference'"):
        build_transform({"name": "reference_view"})({"input": x}, None)
    with pytest.raises(ValueError, match="fewer channels"):
        swap_reference(x, torch.randn(3, 2, 4, 4))


def ctx_of(batch, net, ce_weight: float = 1.0) -> StepContext:
    return StepContext(
        batch=batch,
        epoch=0,
        step=0,
        steps_per_epoch=1,
        stage=StageInfo("train", 0, 1, 0, (), ce_weight),
        networks={"student": net},
        students=["student"],
        teachers=[],
        terms={},
        taps={},
    )


def test_classification_step_equals_separate_forwards_of_the_shared_network():
    torch.manual_seed(0)
    net = models.create(
        "lenet", num_classes=3, in_channels=1, width=4
    ).double()  # no BatchNorm: joint = separate
    g = torch.Generator().manual_seed(1)
    x_d, x_r = (
        torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64),
    )
    y = torch.tensor([0, 2, -1, 1, 2])
    step = CKDN(students=["student"], privileged_weight=0.7, feature_weight=30.0)
    out = step(ctx_of({"input": x_d, "privileged": x_r, "target": y}, net, ce_weight=0.5))
    labelled = y >= 0
    net.requires_grad_(False)
    ce_d = F.cross_entropy(net(x_d)[labelled], y[labelled])
    ce_r = F.cross_entropy(net(x_r)[labelled], y[labelled])
    f_d, f_r = net.stage1(x_d).flatten(1), net.stage1(x_r).flatten(1)
    feature = ((f_d - f_r) ** 2).mean(1).pow(2).mean()
    assert float(out.losses["task"].detach()) == pytest.approx(0.5 * float(ce_d), rel=1e-6)
    assert float(out.losses["privileged"].detach()) == pytest.approx(0.7 * float(ce_r), rel=1e-6)
    assert float(out.losses["feature"].detach()) == pytest.approx(30 * float(feature), rel=1e-6)
    assert torch.allclose(out.logits, net(x_d), atol=1e-12)


@pytest.mark.parametrize("detach", [False, True])
def test_the_feature_term_reaches_the_privileged_view_unless_detached(detach):
    torch.manual_seed(0)
    net = models.create("lenet", num_classes=3, in_channels=1, width=4).double()
    x_d = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    x_r = torch.randn(4, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    step = CKDN(students=["student"], privileged_weight=0.0, detach_privileged=detach)
    out = step(ctx_of({"input": x_d, "privileged": x_r, "target": torch.zeros(4, dtype=torch.long)}, net))
    out.losses["feature"].backward()
    assert (x_r.grad is None or float(x_r.grad.abs().sum()) == 0.0) == detach


def iqa_batch(b: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input": torch.randn(b, 2, 12, 12, generator=g),
        "reference": torch.randn(b, 1, 12, 12, generator=g),
        "pair": torch.randn(b, 2, 12, 12, generator=g),
        "score": torch.rand(b, generator=g),
        "pair_score": torch.rand(b, generator=g),
        "target": torch.full((b,), -1),
    }


def test_iqa_step_scores_both_paths_and_pulls_the_shared_reference_encoder():
    torch.manual_seed(0)
    net = models.create(
        "ckdn_iqa", num_classes=1, in_channels=2, width=4
    ).eval()  # running statistics, no dropout
    batch = iqa_batch()
    batch = build_transform({"name": "reference_view"})(batch, None)
    out = CKDN(students=["student"], task="mse")(ctx_of(batch, net))
    with torch.no_grad():
        s_dr, s_fr = net(batch["input"])[:, 0], net(batch["privileged"])[:, 0]
        d, r = net.reference_encoder(batch["input"][:, 1:]), net.reference_encoder(batch["reference"])
    assert float(out.losses["task"].detach()) == pytest.approx(
        float(((s_dr - batch["score"]) ** 2).mean()), rel=1e-5
    )
    assert float(out.losses["privileged"].detach()) == pytest.approx(
        float(((s_fr - batch["score"]) ** 2).mean()), rel=1e-5
    )
    assert float(out.losses["feature"].detach()) == pytest.approx(
        30 * float(((d - r) ** 2).flatten(1).mean(1).pow(2).mean()), rel=1e-5
    )
    assert out.logits is None


def test_elo_phase_trains_the_auxiliary_head_towards_the_elo_target():
    torch.manual_seed(0)
    net = models.create("ckdn_iqa", num_classes=1, in_channels=2, width=4).eval()
    batch = iqa_batch(seed=2)
    out = CKDN(students=["student"], phase="elo", task="mse")(ctx_of(batch, net))
    with torch.no_grad():
        s_nr = net.pairwise(batch["input"], batch["pair"])[:, 0]
    t = 1 / (1 + 10 ** (2.5 * (batch["score"] - batch["pair_score"])))
    assert float(out.losses["elo"].detach()) == pytest.approx(0.5 * float(((s_nr - t) ** 2).mean()), rel=1e-5)
    out.losses["elo"].backward()
    assert net.auxiliary_head[0].weight.grad is not None and net.restored_encoder[0].weight.grad is not None
    assert net.head[0].weight.grad is None and net.reference_encoder[0].weight.grad is None


def test_the_network_and_bad_setups():
    net = DRIQANet(in_channels=2, width=4)
    score = net(torch.randn(3, 2, 10, 10))
    assert score.shape == (3, 1) and bool(((score > 0) & (score < 1)).all())
    assert net.default_taps["stage1"] == "reference_encoder"
    with pytest.raises(ValueError, match="even number of channels"):
        DRIQANet(in_channels=3)
    with pytest.raises(ValueError, match="task must be one of"):
        CKDN(students=["student"], task="l1")
    with pytest.raises(ValueError, match="one network on two views"):
        CKDN(students=["a", "b"])
    with pytest.raises(KeyError, match="batch_transform"):
        CKDN(students=["student"])(
            ctx_of(
                {"input": torch.zeros(2, 1, 8, 8), "target": torch.zeros(2, dtype=torch.long)},
                models.create("lenet", num_classes=3, in_channels=1, width=4),
            )
        )
    with pytest.raises(TypeError, match="pairwise"):
        CKDN(students=["student"], phase="elo")(
            ctx_of(iqa_batch(), models.create("lenet", num_classes=1, in_channels=2, width=4))
        )


def test_pinned_defaults_are_the_authors_code():
    # CKDN train.py loss_fn: d1 + d2 + 30 * mean(diff ** 2) with diff the per-image MSE of D's features;
    # d3 = 0.5 * MSE(s_nr, 1 / (1 + 10 ** ((t1 - t2) * 1000 / 400))) for the first 10 epochs
    step = CKDN(students=["student"])
    assert (step.phase, step.task, step.tap) == ("distill", "ce", "stage1")
    assert (step.privileged_weight, step.feature_weight, step.feature_reduction) == (1.0, 30.0, "code")
    assert (step.detach_privileged, step.elo_weight, step.elo_scale) == (False, 0.5, 2.5)
    method = load_method("ckdn", "ckdn")
    assert method["step"] == {
        "name": "ckdn",
        "task": "ce",
        "tap": "stage1",
        "privileged_weight": 1.0,
        "feature_weight": 30.0,
        "feature_reduction": "code",
    }
    assert method["teachers"] == [] and method["train"]["batch_transform"]["name"] == "degrade"


# --- the synthetic data set -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_iqa():
    from relkd.data.iqa import synthetic_iqa

    return synthetic_iqa(train_references=2, test_references=1)


@needs_fashion_mnist
def test_the_synthetic_data_set_layout(tiny_iqa):
    per_reference = len(DEGRADATIONS) * len(RESTORATIONS)
    assert len(tiny_iqa.train) == 2 * per_reference and len(tiny_iqa.test) == per_reference
    assert (tiny_iqa.num_classes, tiny_iqa.in_channels, tiny_iqa.image_size) == (1, 2, (28, 28))
    assert bool((tiny_iqa.train_targets == -1).all())
    data = tiny_iqa.train
    parts = data.parts
    unnormalise = lambda t: t * 0.3530 + 0.2860  # noqa: E731
    for i in (0, 7, 40):
        item = data[i]
        restored = parts["restored"][i].double() / 255
        reference = parts["references"][parts["reference_of"][i]].double() / 255
        assert float(item["score"]) == pytest.approx(
            float(ssim(restored[None], reference[None])[0]), abs=1e-6
        )
        assert torch.allclose(unnormalise(item["input"][0]).double(), restored[0], atol=1e-6)
        degraded = parts["degraded"][parts["degraded_of"][i]].double() / 255
        assert torch.allclose(unnormalise(item["input"][1]).double(), degraded[0], atol=1e-6)
        assert torch.allclose(unnormalise(item["reference"][0]).double(), reference[0], atol=1e-6)
    # restoration "none" (the first of each degraded image's restorations) is the degraded image itself
    none = torch.arange(0, len(data), len(RESTORATIONS))
    assert torch.equal(parts["restored"][none], parts["degraded"][parts["degraded_of"][none]])
    assert float(data.scores.std()) > 0.05


@needs_fashion_mnist
def test_pairs_share_the_reference_and_are_redrawn_per_epoch(tiny_iqa):
    data = tiny_iqa.train
    a, b = data.for_epoch(3), data.for_epoch(4)
    for view in (a, b):
        assert torch.equal(data.parts["reference_of"][view.partner], data.groups)
        assert not bool((view.partner == data.indices).any())
    assert torch.equal(a.partner, data.for_epoch(3).partner) and not torch.equal(a.partner, b.partner)
    item = a[5]
    other = int(a.partner[5])
    assert torch.equal(item["pair"], a._input(other)) and float(item["pair_score"]) == float(
        data.parts["score"][other]
    )


@needs_fashion_mnist
def test_the_reference_view_feeds_the_pristine_image(tiny_iqa):
    from relkd.data.iqa import IQADataset

    item = IQADataset(tiny_iqa.train.parts, view="reference")[3]
    assert torch.equal(item["input"][1:], item["reference"])
    assert torch.equal(item["input"][:1], tiny_iqa.train[3]["input"][:1])


# --- runs ------------------------------------------------------------------------------------------


BASE = {
    "name": "tiny",
    "data": {
        "name": "digits",
        "train_subset": 40,
        "unlabeled": True,
        "batch_size": 16,
        "transfer_batch_size": 64,
    },
    "teacher": None,
    "student": {"model": "lenet", "args": {"width": 4}},
    "train": {"epochs": 2, "optimizer": {"name": "adamw", "lr": 0.003}},
    "methods": ["ckdn"],
    "seeds": [0],
    "probe_size": 32,
    "tensorboard": False,
}


def finite_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    losses = [v for row in rows for k, v in row.items() if k.startswith(("loss/", "raw/"))]
    assert losses and all(math.isfinite(v) for v in losses)
    return rows


@pytest.mark.slow
def test_the_generic_method_trains_two_epochs_on_digits(tmp_path):
    cfg = load_config(BASE)[0]
    run_method(cfg, "ckdn", 0, {}, RunDir(tmp_path), quiet=True, echo=lambda s: None)
    rows = finite_rows(tmp_path / "ckdn" / "seed0" / "metrics.jsonl")
    assert len(rows) == 2 and {"loss/task", "loss/privileged", "loss/feature"} <= set(rows[0])
    assert rows[1]["raw/feature"] < rows[0]["raw/feature"]


@needs_fashion_mnist
@pytest.mark.slow
def test_every_method_of_the_iqa_experiment_trains_two_epochs(tmp_path):
    cfg = load_config(
        EXPERIMENT,
        [
            f"out={tmp_path}",
            "seeds=[0]",
            "train.epochs=2",
            "data.options.train_references=3",
            "data.options.test_references=2",
            *(
                f"methods.{m}.stages.{i}.epochs=1"
                for m in ("ckdn", "ckdn_feature_mse", "ckdn_detached")
                for i in (0, 1)
            ),
        ],
    )[0]
    for name in cfg.methods:
        result = run_method(cfg, name, 0, {}, RunDir(tmp_path), quiet=True, echo=lambda s: None)
        rows = finite_rows(tmp_path / name / "seed0" / "metrics.jsonl")
        assert len(rows) == 2
        assert all(-1.0 <= result[f"iqa/{k}"] <= 1.0 for k in ("srcc", "plcc", "srcc_ref", "plcc_ref")), name
    rows = [
        json.loads(line) for line in (tmp_path / "ckdn" / "seed0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert (
        [r["stage"] for r in rows] == ["elo", "distill"]
        and "loss/elo" in rows[0]
        and "loss/feature" in rows[1]
    )
