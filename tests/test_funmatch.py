"""FunMatch: the mixup coefficient rule and the roll-by-one partner, the inception crop's box bounds and
its TensorFlow resize against a written-out reference, the three views of the batch transform, the
loss against a float64 KL summed over teachers, labels never read, no gradient into the teachers, the
pinned defaults, and digits runs in which teacher and student receive torch.equal inputs at every step
and a resumed run ends bit-identical."""

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
from relkd.experiment import RunDir, run_method, run_teacher
from relkd.methods import BATCH_TRANSFORMS, STEPS, StageInfo, StepContext, build_transform
from relkd.methods.funmatch import (
    AREA_RANGE,
    MAX_ATTEMPTS,
    RATIO_RANGE,
    TEACHER_INPUT,
    FunMatch,
    crop_resize,
    funmatch,
    funmatch_transform,
    inception_boxes,
    mixup,
    mixup_coefficient,
)
from relkd.train import TrainBatches

torch.set_num_threads(1)


# --- mixup --------------------------------------------------------------------------------------------


def test_mixup_coefficient_is_the_folded_beta_draw():
    # Beta(1, 1) is uniform on [0, 1]; folded by max(a, 1 - a) it is uniform on [0.5, 1]: mean 3/4,
    # a quarter of the draws below 5/8.
    torch.manual_seed(0)
    draws = torch.tensor([mixup_coefficient(1.0) for _ in range(4000)])
    assert draws.min() >= 0.5 and draws.max() <= 1.0
    assert draws.mean().item() == pytest.approx(0.75, abs=0.01)
    assert (draws < 0.625).float().mean().item() == pytest.approx(0.25, abs=0.03)
    # Beta(p, p) with a small p puts its mass near 0 and 1: folded, near 1.
    assert torch.tensor([mixup_coefficient(0.05) for _ in range(500)]).median() > 0.99
    with pytest.raises(ValueError, match="Beta parameter p must be positive, got 0"):
        mixup_coefficient(0.0)


def test_mixup_partner_is_the_previous_row_and_row_zero_takes_the_last():
    x = torch.arange(12, dtype=torch.float64).view(4, 3)
    a = 0.7
    expected = [[a * x[b, j].item() + (1 - a) * x[(b - 1) % 4, j].item() for j in range(3)] for b in range(4)]
    torch.testing.assert_close(mixup(x, a), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(mixup(x, 1.0), x)


# --- inception crop ------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(28, 28), (8, 8), (10, 16)])
def test_inception_boxes_stay_inside_the_image_and_the_area_and_ratio_ranges(height, width):
    g = torch.Generator().manual_seed(1)
    top, left, h, w = inception_boxes(4000, height, width, generator=g)
    assert (h >= 1).all() and (w >= 1).all() and (h <= height).all() and (w <= width).all()
    assert (top >= 0).all() and (left >= 0).all()
    # TensorFlow draws the offset in [0, H - h): a box short of the image never touches its last row.
    assert ((top <= height - h - 1) | (h == height) & (top == 0)).all()
    assert ((left <= width - w - 1) | (w == width) & (left == 0)).all()
    whole = (h == height) & (w == width)
    area = (h * w).double()[~whole] / (height * width)
    assert area.min() >= AREA_RANGE[0] - 1e-6 and area.max() <= AREA_RANGE[1]
    # w = round(h * r) with r in [0.75, 1.33]: w / h is within half a pixel of that range.
    hh, ww = h[~whole].double(), w[~whole].double()
    assert (ww >= RATIO_RANGE[0] * hh - 0.5).all() and (ww <= RATIO_RANGE[1] * hh + 0.5).all()
    assert (~whole).float().mean() > 0.9  # almost every draw finds a box


def test_inception_boxes_in_a_hand_computed_case():
    # Area exactly 1/4 of 8 x 8 with aspect ratio 1: every box is 4 x 4 at offsets 0..3.
    g = torch.Generator().manual_seed(2)
    top, left, h, w = inception_boxes(400, 8, 8, area_range=(0.25, 0.25), ratio_range=(1.0, 1.0), generator=g)
    assert h.eq(4).all() and w.eq(4).all()
    assert set(top.tolist()) == {0, 1, 2, 3} and set(left.tolist()) == {0, 1, 2, 3}
    # The whole image: area 1, ratio 1.
    top, left, h, w = inception_boxes(5, 8, 8, area_range=(1.0, 1.0), ratio_range=(1.0, 1.0))
    assert h.eq(8).all() and w.eq(8).all() and top.eq(0).all() and left.eq(0).all()
    # A ratio of 10 cannot fit 8 x 8 (max height 0): every attempt fails and the whole image is kept.
    top, left, h, w = inception_boxes(5, 8, 8, ratio_range=(10.0, 10.0), max_attempts=3)
    assert h.eq(8).all() and w.eq(8).all() and top.eq(0).all() and left.eq(0).all()
    with pytest.raises(ValueError, match="0 < area_min <= area_max <= 1"):
        inception_boxes(1, 8, 8, area_range=(0.5, 0.2))


def reference_resize(image: list[list[float]], top: int, left: int, h: int, w: int, out_h: int, out_w: int):
    """TensorFlow's ResizeBilinear with half_pixel_centers on the crop ``image[top:top+h, left:left+w]``:
    in = (i + 0.5) * size / out - 0.5, lower = max(floor(in), 0), upper = min(ceil(in), size - 1),
    lerp = in - floor(in); columns first, then rows."""
    crop = [row[left : left + w] for row in image[top : top + h]]

    def axis(i: int, size: int, out: int) -> tuple[int, int, float]:
        pos = (i + 0.5) * size / out - 0.5
        return max(math.floor(pos), 0), min(math.ceil(pos), size - 1), pos - math.floor(pos)

    result = []
    for i in range(out_h):
        y0, y1, ly = axis(i, h, out_h)
        row = []
        for j in range(out_w):
            x0, x1, lx = axis(j, w, out_w)
            top_v = crop[y0][x0] + (crop[y0][x1] - crop[y0][x0]) * lx
            bottom_v = crop[y1][x0] + (crop[y1][x1] - crop[y1][x0]) * lx
            row.append(top_v + (bottom_v - top_v) * ly)
        result.append(row)
    return result


def test_crop_resize_by_hand():
    x = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    # Rows 1..2 stretched to 4 rows: read at -0.25, 0.25, 0.75, 1.25 within the box, clamped to it.
    out = crop_resize(x, *(torch.tensor([v]) for v in (1, 0, 2, 4)))
    r1, r2 = x[0, 0, 1], x[0, 0, 2]
    expected = torch.stack([r1, 0.75 * r1 + 0.25 * r2, 0.25 * r1 + 0.75 * r2, r2])
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-12)
    whole = torch.tensor([0]), torch.tensor([0]), torch.tensor([4]), torch.tensor([4])
    assert torch.equal(crop_resize(x, *whole), x)


def test_crop_resize_matches_tensorflows_rule_on_random_boxes():
    g = torch.Generator().manual_seed(4)
    images = torch.rand(6, 2, 9, 7, generator=g, dtype=torch.float64)
    top, left, h, w = inception_boxes(6, 9, 7, generator=g)
    out = crop_resize(images, top, left, h, w, size=(5, 6))
    for b in range(6):
        for c in range(2):
            expected = reference_resize(
                images[b, c].tolist(), top[b].item(), left[b].item(), h[b].item(), w[b].item(), 5, 6
            )
            torch.testing.assert_close(
                out[b, c], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12
            )
    with pytest.raises(ValueError, match="every box must lie inside the 9 x 7 images"):
        crop_resize(images, top, left, h + 9, w)


# --- the batch transform --------------------------------------------------------------------------------


def batch(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        "input": torch.randn(n, 1, 8, 8, generator=g),
        "target": torch.arange(n) % 3,
        "index": torch.arange(n),
    }


@pytest.mark.parametrize("views", ["consistent", "independent", "fixed"])
def test_views(views):
    torch.manual_seed(0)
    original = batch()
    out = funmatch_transform(views=views)(dict(original), None)
    assert out["input"].shape == original["input"].shape and out[TEACHER_INPUT].shape == out["input"].shape
    assert not torch.equal(out["input"], original["input"])  # the student always sees a new view
    if views == "consistent":
        assert out[TEACHER_INPUT] is out["input"]
    elif views == "independent":
        assert not torch.equal(out[TEACHER_INPUT], out["input"])
    else:
        assert torch.equal(out[TEACHER_INPUT], original["input"])
    assert torch.equal(out["target"], original["target"])


def test_transform_draws_from_the_global_generator_only():
    torch.manual_seed(7)
    a = funmatch_transform()(batch(), None)
    torch.manual_seed(7)
    b = funmatch_transform()(batch(), None)
    assert torch.equal(a["input"], b["input"])
    # Without crop and flip, the view is the mixup of the batch alone.
    torch.manual_seed(8)
    c = funmatch_transform(crop=False, flip=False)(batch(), None)
    torch.manual_seed(8)
    coefficient = mixup_coefficient(1.0)
    torch.testing.assert_close(c["input"], mixup(batch()["input"], coefficient))
    with pytest.raises(ValueError, match="views must be one of consistent, independent, fixed, got 'same'"):
        funmatch_transform(views="same")


# --- the loss and the step ------------------------------------------------------------------------------


def reference_kl_sum(student: torch.Tensor, teachers: list[torch.Tensor], T: float) -> float:
    """sum over teachers of T^2 / B * sum_b sum_c p_t log(p_t / p_s), p = softmax(z / T), in float64."""

    def softmax(row: list[float]) -> list[float]:
        m = max(row)
        e = [math.exp((v - m) / T) for v in row]
        return [v / sum(e) for v in e]

    total = 0.0
    for t in teachers:
        for b in range(len(student)):
            p, q = softmax(t[b].tolist()), softmax(student[b].tolist())
            total += T * T * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)) / len(student)
    return total


def test_loss_is_the_kl_summed_over_teachers():
    g = torch.Generator().manual_seed(6)
    s = 3 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    t1, t2 = (3 * torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(2))
    for T in (1.0, 2.0, 10.0):
        assert funmatch(s, [t1, t2], T).item() == pytest.approx(reference_kl_sum(s, [t1, t2], T), rel=1e-10)
    assert funmatch(t1, [t1], 1.0).item() == pytest.approx(0.0, abs=1e-12)
    leaf = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: funmatch(z, [t1, t2], 2.0), (leaf,))
    with pytest.raises(ValueError, match="at least one teacher"):
        funmatch(s, [])


class Recorder(nn.Module):
    """A linear classifier that keeps every input it is given."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(64, 4)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return self.fc(x.flatten(1))


def context(nets: dict[str, nn.Module], data: dict[str, torch.Tensor], teachers: list[str]) -> StepContext:
    stage = StageInfo("train", 0, 1, 0, (), 0.0)
    students = [n for n in nets if n not in teachers]
    return StepContext(
        batch=data, epoch=0, step=0, steps_per_epoch=1, stage=stage, networks=nets,
        students=students, teachers=teachers, terms={}, taps={},
    )  # fmt: skip


@pytest.mark.parametrize("views", ["consistent", "fixed"])
def test_step_shows_the_networks_their_views_and_sums_the_teachers(views):
    nets = {"t1": Recorder(1).eval().requires_grad_(False), "t2": Recorder(2).eval().requires_grad_(False)}
    nets["student"] = Recorder(3)
    ctx = context(nets, batch(), ["t1", "t2"])
    loaded = ctx.batch["input"]
    torch.manual_seed(0)
    ctx.batch = funmatch_transform(views=views)(ctx.batch, ctx)
    out = FunMatch(T=2.0, students=["student"], teachers=["t1", "t2"])(ctx)
    shown_t1, shown_t2, shown_s = nets["t1"].inputs[0], nets["t2"].inputs[0], nets["student"].inputs[0]
    assert torch.equal(shown_t1, shown_t2)
    assert torch.equal(shown_t1, shown_s) == (views == "consistent")
    if views == "fixed":
        assert torch.equal(shown_t1, loaded)
    assert set(out.losses) == {"kl/t1", "kl/t2"}
    z = [nets[n].fc(x.flatten(1)).detach() for n, x in (("t1", shown_t1), ("t2", shown_t2))]
    expected = reference_kl_sum(
        nets["student"].fc(shown_s.flatten(1)).detach().double(), [v.double() for v in z], 2.0
    )
    assert sum(v.item() for v in out.losses.values()) == pytest.approx(expected, rel=1e-5)
    sum(out.losses.values()).backward()
    assert nets["student"].fc.weight.grad is not None
    assert nets["t1"].fc.weight.grad is None and nets["t2"].fc.weight.grad is None


def test_labels_are_never_read():
    nets = {"teacher": Recorder(1).eval().requires_grad_(False), "student": Recorder(3)}
    values = []
    for target in (torch.arange(6) % 3, torch.tensor([2, 0, 1, -1, -1, 1])):
        data = batch()
        data["target"] = target
        torch.manual_seed(0)
        ctx = context(nets, data, ["teacher"])
        ctx.batch = funmatch_transform()(ctx.batch, ctx)
        values.append(FunMatch(students=["student"], teachers=["teacher"])(ctx).losses["kl/teacher"].item())
    assert values[0] == values[1]
    with pytest.raises(
        ValueError, match="without labels, but stage 'train' has ce_weight 0.5; set ce_weight: 0"
    ):
        FunMatch(students=["student"], teachers=["t"], stage=StageInfo("train", 0, 1, 0, (), 0.5))
    with pytest.raises(ValueError, match="at least one teacher"):
        FunMatch(students=["student"], teachers=[])
    with pytest.raises(ValueError, match="temperature T must be positive"):
        FunMatch(T=0.0, students=["student"], teachers=["t"])


def test_pinned_defaults():
    assert STEPS.get("funmatch") is FunMatch and BATCH_TRANSFORMS.get("funmatch") is funmatch_transform
    assert inspect.signature(FunMatch).parameters["T"].default == 1.0  # bit_i1k.py distance_kw t=1.0
    options = {k: p.default for k, p in inspect.signature(funmatch_transform).parameters.items()}
    assert options == {
        "views": "consistent", "crop": True, "flip": True, "mixup": 1.0,  # config.mixup p=1.0
        "area_range": (0.05, 1.0), "ratio_range": (0.75, 1.33), "max_attempts": 100,  # inception_crop, TF
    }  # fmt: skip
    assert (AREA_RANGE, RATIO_RANGE, MAX_ATTEMPTS) == ((0.05, 1.0), (0.75, 1.33), 100)
    method = yaml.safe_load(configs.method_path("funmatch").read_text())
    assert method["step"] == {"name": "funmatch", "T": 1.0} and not method["losses"]
    assert method["train"]["ce_weight"] == 0.0 and method["train"]["clip_grad_norm"] == 1.0  # grad_clip_norm
    assert method["train"]["batch_transform"] == {
        "name": "funmatch", "views": "consistent", "crop": True, "flip": True, "mixup": 1.0,
    }  # fmt: skip
    assert "teachers" not in method  # every teacher of the suite, summed
    assert callable(build_transform(method["train"]["batch_transform"]))


# --- digits runs -------------------------------------------------------------------------------------------


def digits(tmp_path: Path, *overrides: str):
    """The built-in digits experiment, cut to two short epochs and one seed."""
    cfg = load_config(None, ["methods=[funmatch]", "train.epochs=2", "teacher.train.epochs=2", "seeds=[0]",
                             f"out={tmp_path}", "tensorboard=false", *overrides])[0]  # fmt: skip
    return cfg, RunDir(tmp_path)


@pytest.mark.slow
def test_digits_run_shows_both_networks_equal_inputs_and_finishes_with_finite_losses(tmp_path, monkeypatch):
    cfg, run_dir = digits(tmp_path)
    teacher = run_teacher(cfg, run_dir, quiet=True, echo=lambda s: None)
    shown: list[tuple[str, torch.Tensor]] = []
    original = StepContext.run

    def recording(self, name, inputs=None):
        shown.append((name, self.batch["input"] if inputs is None else inputs))
        return original(self, name, inputs)

    monkeypatch.setattr(StepContext, "run", recording)
    result = run_method(cfg, "funmatch", 0, {"teacher": teacher}, run_dir, quiet=True, echo=lambda s: None)
    assert len(shown) >= 4 and [n for n, _ in shown] == ["teacher", "student"] * (len(shown) // 2)
    for (_, t), (_, s) in zip(shown[::2], shown[1::2], strict=True):
        assert torch.equal(t, s)
    rows = [json.loads(line) for line in (tmp_path / "funmatch/seed0/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss/kl/teacher"]) for r in rows)
    assert "loss/ce" not in rows[0] and math.isfinite(result["last_acc1"])


class Interrupt(BaseException):
    pass


@pytest.mark.slow
def test_resume_after_an_interruption_is_bit_identical(tmp_path, monkeypatch):
    cfg, run_dir = digits(tmp_path / "a", "train.epochs=3")
    teacher = run_teacher(cfg, run_dir, quiet=True, echo=lambda s: None)
    straight = run_method(cfg, "funmatch", 0, {"teacher": teacher}, run_dir, quiet=True, echo=lambda s: None)
    other = RunDir(tmp_path / "b")
    original, armed = TrainBatches.epoch, [True]

    def epoch_fn(self, e, with_transfer):
        batches = original(self, e, with_transfer)
        if not (armed[0] and e == 1):
            return batches
        armed[0] = False

        def cut():
            for i, b in enumerate(batches):
                if i == 5:
                    raise Interrupt
                yield b

        return cut()

    monkeypatch.setattr(TrainBatches, "epoch", epoch_fn)
    with pytest.raises(Interrupt):
        run_method(cfg, "funmatch", 0, {"teacher": teacher}, other, quiet=True, echo=lambda s: None)
    resumed = run_method(
        cfg, "funmatch", 0, {"teacher": teacher}, other, resume=True, quiet=True, echo=lambda s: None
    )
    a = torch.load(tmp_path / "a/funmatch/seed0/final.pt", weights_only=True)["students"]["student"]
    b = torch.load(tmp_path / "b/funmatch/seed0/final.pt", weights_only=True)["students"]["student"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["networks"] == straight["networks"]
