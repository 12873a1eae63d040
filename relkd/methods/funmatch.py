r"""Function matching: a patient and consistent teacher (FunMatch).

.. math::
    L = \sum_{t \in \text{teachers}} \frac{\tau^2}{B} \sum_b \mathrm{KL}\big(\mathrm{softmax}(z_{t,b}/\tau)
        \,\|\, \mathrm{softmax}(z_{s,b}/\tau)\big), \qquad
    \tilde x_b = a\, x_b + (1 - a)\, x_{b-1}, \quad a = \max(a', 1 - a'), \; a' \sim \mathrm{Beta}(p, p)

Beyer, Zhai, Royer, Markeeva, Anil & Kolesnikov, "Knowledge distillation: A good teacher is patient
and consistent", CVPR 2022. Official code github.com/google-research/big_vision
(``trainers/proj/distill/distill.py`` ``loss_fn`` and ``update_fn``, ``evaluators/proj/distill/
distance.py`` ``dist``, ``utils.py`` ``get_mixup``, ``pp/ops_image.py`` ``inception_crop``,
``configs/proj/distill/bit_i1k.py`` and ``bigsweep_flowers_pet.py``).

Distillation is function matching: the student is trained to agree with the teacher on the very
inputs it is shown, and nothing else. So

* **no labels**: the loss is the KL divergence to each teacher at temperature :math:`\tau`, times
  :math:`\tau^2`, averaged over the batch, summed over the teachers (``loss_fn``: a sum of KLs is the KL
  to the teachers' probability ensemble up to a constant); the step refuses a cross-entropy weight;
* **consistent views**: every step's batch is augmented once, an inception crop and a left-right flip
  per image, then mixed up, and the *same* tensor goes to the teachers and the student (the
  ``funmatch`` batch transform, ``views: consistent``). The teachers run on it at every step; their
  outputs are never cached;
* **mixup** with a single coefficient for the whole batch, :math:`a' \sim \mathrm{Beta}(p, p)`, folded to
  :math:`a = \max(a', 1 - a') \in [0.5, 1]`, and the partner of image ``b`` is image ``b - 1``
  (``jnp.roll(x, shift=1, axis=0)``, so image 0 is mixed with the last), ``p = 1`` (``config.mixup``);
* **inception crop** (``tf.image.sample_distorted_bounding_box`` with ``area_range = (0.05, 1)``, its
  default aspect-ratio range ``(0.75, 1.33)`` and 100 attempts, the whole image when all fail), resized
  back to the image size with bilinear interpolation at half-pixel centres, without antialiasing;
  :func:`inception_boxes` follows TensorFlow's sampler (the height drawn uniformly between the
  heights the area range allows for the drawn aspect ratio, the offsets drawn from ``[0, H - h)``);
* **patience**: long schedules (ImageNet 1,200 epochs; Flowers and Pets :math:`10^3`--:math:`10^6`),
  which are the suite's ``train.epochs``.

The ``views`` option of the transform gives the paper's baselines: ``fixed``, the teacher sees the
image as loaded while the student sees the augmented one (a "fixed teacher", whose targets could be
precomputed), and ``independent``, each network gets its own crop, flip and mixup ("independent
noise"); ``consistent`` with ``mixup: 0`` is consistent teaching without function matching.
The randomness comes from the global torch generator on the CPU (checkpointed, so a resumed run is
exact, and the same draws on every device); the crops and the mixing run on the images' device.

Where we differ from the authors. ``tf.image.resize`` and the crop box sampler are reimplemented in
torch (same rules, a different random stream). The optimiser (Adam ``lr = 0.03``, weight decay
``3e-4``, 5,000 warm-up steps, cosine, batch 4,096 on ImageNet) belongs to the suite; the method
keeps the gradient clipping to norm 1 (``grad_clip_norm``). The code also offers other distances
(euclidean, squared L2, hard labels, log-softmax euclidean); only the KL, the published one, is here.
Inputs are the loader's normalised images; crops, flips and mixup are linear, so they commute with the
normalisation except at the crop's edges (clamped, never padded).

**Shapes:** images ``[B, C, H, W]``; logits ``[B, K]``; every loss a scalar.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from relkd.data.augment import hflip
from relkd.losses.kd import kd
from relkd.methods.base import StageInfo, Step, StepContext, StepOutput, register_step
from relkd.methods.transforms import Batch, Transform, register_transform

__all__ = [
    "FUNCTIONAL",
    "TEACHER_INPUT",
    "VIEWS",
    "FunMatch",
    "crop_resize",
    "funmatch",
    "funmatch_transform",
    "inception_boxes",
    "mixup",
    "mixup_coefficient",
]

FUNCTIONAL = ("mixup_coefficient", "mixup", "inception_boxes", "crop_resize")
VIEWS = ("consistent", "independent", "fixed")
# The batch key the transform writes the teachers' view under (absent: the teachers see "input").
TEACHER_INPUT = "teacher_input"
# tf.image.sample_distorted_bounding_box's defaults, as big_vision's inception_crop uses them.
AREA_RANGE = (0.05, 1.0)
RATIO_RANGE = (0.75, 1.33)
MAX_ATTEMPTS = 100


def mixup_coefficient(p: float = 1.0) -> float:
    r""":math:`a = \max(a', 1 - a')` with :math:`a' \sim \mathrm{Beta}(p, p)`, drawn from the global torch
    generator on the CPU."""
    if p <= 0:
        raise ValueError(f"mixup: the Beta parameter p must be positive, got {p}")
    concentration = torch.tensor(float(p), dtype=torch.float64)
    a = float(torch.distributions.Beta(concentration, concentration).sample())
    return max(a, 1.0 - a)


def mixup(x: Tensor, a: float) -> Tensor:
    """``a * x + (1 - a) * roll(x, 1, dims=0)``: row ``b`` mixed with row ``b - 1`` (row 0 with the last).

    **Shapes:** ``[B, ...]`` -> the same.
    """
    return a * x + (1.0 - a) * torch.roll(x, shifts=1, dims=0)


def _round(x: Tensor) -> Tensor:
    """``lrintf``: round half to even, as an integer tensor."""
    return torch.round(x).to(torch.int64)


def _check_box_options(
    area_range: Sequence[float], ratio_range: Sequence[float], max_attempts: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    a0, a1 = (float(a) for a in area_range)
    r0, r1 = (float(r) for r in ratio_range)
    if not 0 < a0 <= a1 <= 1 or not 0 < r0 <= r1 or max_attempts < 1:
        raise ValueError(
            f"inception crop: expected 0 < area_min <= area_max <= 1, 0 < ratio_min <= ratio_max and "
            f"max_attempts >= 1, got area_range {tuple(area_range)}, ratio_range {tuple(ratio_range)}, "
            f"max_attempts {max_attempts}"
        )
    return (a0, a1), (r0, r1)


def inception_boxes(
    n: int,
    height: int,
    width: int,
    area_range: Sequence[float] = AREA_RANGE,
    ratio_range: Sequence[float] = RATIO_RANGE,
    max_attempts: int = MAX_ATTEMPTS,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n`` random crop boxes ``(top, left, h, w)`` of a ``height x width`` image, TensorFlow's
    ``sample_distorted_bounding_box`` rule without bounding boxes.

    Each attempt draws an aspect ratio ``r`` (width / height) uniformly in ``ratio_range``, then a height
    uniformly among the integers whose box ``h x round(h r)`` has an area in ``area_range`` (fractions
    of the image) and fits in the image, nudged by one row when rounding leaves the area range; the
    first valid attempt of each box is kept, the whole image when none of ``max_attempts`` is valid.
    The offsets are uniform in ``[0, height - h)`` and ``[0, width - w)`` (0 when the box spans the
    image), as TensorFlow draws them. Computed in float32 like the TensorFlow kernel, on the CPU.

    Returns:
        Four int64 tensors ``[n]``: ``top``, ``left``, ``h``, ``w``.
    """
    (a0, a1), (r0, r1) = _check_box_options(area_range, ratio_range, max_attempts)
    f32 = torch.float32
    draws = torch.rand((3, n, max_attempts), generator=generator, dtype=f32)
    ratio = draws[0] * (r1 - r0) + r0
    min_area = torch.tensor(a0 * width * height, dtype=f32)
    max_area = torch.tensor(a1 * width * height, dtype=f32)
    h = _round(torch.sqrt(min_area / ratio))
    max_h = _round(torch.sqrt(max_area / ratio))
    too_wide = _round(max_h * ratio) > width
    capped = ((width + 0.5 - 1e-7) / ratio).to(torch.int64)
    capped = capped - (_round(capped * ratio) > width).to(torch.int64)
    max_h = torch.where(too_wide, capped, max_h).clamp(max=height)
    h = torch.minimum(h, max_h)
    h = h + (draws[1] * (max_h - h + 1).to(f32)).floor().to(torch.int64).clamp(max=(max_h - h).clamp(min=0))
    w = _round(h * ratio)
    area = (w * h).to(f32)
    grow = area < min_area
    h = h + grow.to(torch.int64)
    w = torch.where(grow, _round(h * ratio), w)
    area = (w * h).to(f32)
    shrink = area > max_area
    h = h - shrink.to(torch.int64)
    w = torch.where(shrink, _round(h * ratio), w)
    area = (w * h).to(f32)
    valid = (area >= min_area) & (area <= max_area) & (w <= width) & (h <= height) & (w > 0) & (h > 0)
    first = valid.to(torch.int64).argmax(dim=1)
    found = valid.any(dim=1)
    rows = torch.arange(n)
    h = torch.where(found, h[rows, first], torch.full_like(first, height))
    w = torch.where(found, w[rows, first], torch.full_like(first, width))
    offsets = torch.rand((2, n), generator=generator, dtype=torch.float64)
    top = (offsets[0] * (height - h)).floor().to(torch.int64).clamp(min=0)
    left = (offsets[1] * (width - w)).floor().to(torch.int64).clamp(min=0)
    top = torch.minimum(top, (height - h - 1).clamp(min=0))
    left = torch.minimum(left, (width - w - 1).clamp(min=0))
    return top, left, h, w


def _lerp_indices(
    start: Tensor, size: Tensor, out: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Lower and upper source indices and weights of ``out`` samples at half-pixel centres over
    ``[start, start + size)``, clamped to that range (``tf.image.resize``, bilinear, no antialias)."""
    pos = (torch.arange(out, dtype=torch.float64) + 0.5)[None, :] * (size.double()[:, None] / out) - 0.5
    low = pos.floor()
    weight = pos - low
    last = (size - 1)[:, None]
    lo = low.to(torch.int64).clamp(min=0)
    lo = torch.minimum(lo, last)
    hi = torch.minimum(low.to(torch.int64) + 1, last).clamp(min=0)
    return (
        (start[:, None] + lo).to(device),
        (start[:, None] + hi).to(device),
        weight.to(device=device, dtype=dtype),
    )


def crop_resize(
    images: Tensor, top: Tensor, left: Tensor, h: Tensor, w: Tensor, size: Sequence[int] | None = None
) -> Tensor:
    """Cut box ``b`` out of image ``b`` and resize it to ``size`` (default the image size) with bilinear
    interpolation at half-pixel centres, sampling positions clamped to the box (TensorFlow's
    ``resize_bilinear`` with ``half_pixel_centers``), on the images' device.

    Args:
        images: ``[B, C, H, W]`` float images.
        top, left, h, w: ``[B]`` integer boxes inside the images.
        size: ``(H_out, W_out)``.

    Returns:
        ``[B, C, H_out, W_out]``.
    """
    b, c, height, width = images.shape
    out_h, out_w = (height, width) if size is None else (int(size[0]), int(size[1]))
    top, left, h, w = (t.cpu().to(torch.int64) for t in (top, left, h, w))
    if ((h < 1) | (w < 1) | (top < 0) | (left < 0) | (top + h > height) | (left + w > width)).any():
        raise ValueError(f"crop_resize: every box must lie inside the {height} x {width} images")
    r0, r1, wy = _lerp_indices(top, h, out_h, images.device, images.dtype)
    c0, c1, wx = _lerp_indices(left, w, out_w, images.device, images.dtype)

    def rows(index: Tensor) -> Tensor:
        return images.gather(2, index[:, None, :, None].expand(b, c, out_h, width))

    x = torch.lerp(rows(r0), rows(r1), wy[:, None, :, None])

    def cols(index: Tensor) -> Tensor:
        return x.gather(3, index[:, None, None, :].expand(b, c, out_h, out_w))

    return torch.lerp(cols(c0), cols(c1), wx[:, None, None, :])


def _augment(x: Tensor, crop: bool, flip: bool, p: float, options: dict[str, Any]) -> Tensor:
    """One view: inception crop, flip, mixup, each when asked for; draws from the global generator."""
    n, _, height, width = x.shape
    if crop:
        x = crop_resize(x, *inception_boxes(n, height, width, **options))
    if flip:
        x = hflip(x, torch.rand(n) < 0.5)
    if p > 0:
        x = mixup(x, mixup_coefficient(p))
    return x


@register_transform("funmatch")
def funmatch_transform(
    views: str = "consistent",
    crop: bool = True,
    flip: bool = True,
    mixup: float = 1.0,
    area_range: Sequence[float] = AREA_RANGE,
    ratio_range: Sequence[float] = RATIO_RANGE,
    max_attempts: int = MAX_ATTEMPTS,
) -> Transform:
    """FunMatch's batch transform: ``input`` becomes the student's view and ``teacher_input`` the
    teachers' (the same tensor under ``consistent``).

    Args:
        views: ``consistent`` (one view for every network), ``independent`` (a view per side, drawn
            independently) or ``fixed`` (the teachers see the batch as loaded).
        crop: inception crop (resized back to the image size).
        flip: left-right flip with probability 1/2 per image.
        mixup: the Beta parameter ``p`` of mixup; 0 turns it off.
        area_range, ratio_range, max_attempts: the crop sampler's (:func:`inception_boxes`).
    """
    if views not in VIEWS:
        raise ValueError(f"funmatch: views must be one of {', '.join(VIEWS)}, got {views!r}")
    if mixup < 0:
        raise ValueError(f"funmatch: mixup must be >= 0 (0 turns it off), got {mixup}")
    options = {
        "area_range": tuple(area_range),
        "ratio_range": tuple(ratio_range),
        "max_attempts": max_attempts,
    }
    _check_box_options(**options)  # now rather than at the first step; it draws nothing

    def transform(batch: Batch, ctx: Any) -> Batch:
        x = batch["input"]
        student = _augment(x, crop, flip, mixup, options)
        if views == "consistent":
            teacher = student
        elif views == "independent":
            teacher = _augment(x, crop, flip, mixup, options)
        else:
            teacher = x
        return {**batch, "input": student, TEACHER_INPUT: teacher}

    return transform


def funmatch(student: Tensor, teachers: Sequence[Tensor], T: float = 1.0) -> Tensor:
    r""":math:`\sum_t \frac{\tau^2}{B} \sum_b \mathrm{KL}(p_t^\tau \| p_s^\tau)_b` (teachers detached).

    **Shapes:** ``student`` and each teacher ``[B, K]`` -> scalar.
    """
    if not teachers:
        raise ValueError("funmatch needs at least one teacher's logits, got none")
    return sum(kd(student, t, T=T) for t in teachers)


@register_step("funmatch")
class FunMatch(Step):
    """FunMatch's step: every teacher runs on the batch's ``teacher_input`` (``input`` when there is
    none), the student on ``input``; the loss is :func:`funmatch` (see the module docstring).

    Args:
        T: the temperature :math:`\\tau` (1 on ImageNet; 1--10 on Flowers and Pets).
        students, teachers, stage: filled in by the engine; one student, any number of teachers.

    Its losses are ``kl/<teacher>`` for each teacher; the logits are the student's.
    """

    def __init__(
        self,
        T: float = 1.0,
        students: Sequence[str] = (),
        teachers: Sequence[str] = (),
        stage: StageInfo | None = None,
    ) -> None:
        super().__init__()
        if T <= 0 or not math.isfinite(T):
            raise ValueError(f"funmatch: the temperature T must be positive, got {T}")
        if len(students) != 1:
            raise ValueError(
                f"funmatch distils one student, got {len(students)} ({', '.join(students) or 'none'})"
            )
        if not teachers:
            raise ValueError("funmatch needs at least one teacher; the method has none (teachers: [])")
        if stage is not None and stage.ce_weight:
            raise ValueError(
                f"funmatch matches the teachers' function without labels, but stage {stage.name!r} has "
                f"ce_weight {stage.ce_weight}; set ce_weight: 0"
            )
        self.T, self.student, self.ensemble = float(T), students[0], list(teachers)

    def extra_repr(self) -> str:
        return f"T={self.T}, teachers={self.ensemble}"

    def forward(self, ctx: StepContext) -> StepOutput:
        shown = ctx.batch.get(TEACHER_INPUT)
        teachers = {t: ctx.run(t, shown)["logits"] for t in self.ensemble}
        student = ctx.run(self.student)["logits"]
        losses = {f"kl/{t}": funmatch(student, [z], self.T) for t, z in teachers.items()}
        return StepOutput(student, losses)
