r"""RSLAD: robust soft-label adversarial distillation (a student made robust by robust soft labels).

.. math::
    x' = \mathrm{PGD}_{\varepsilon}\Big(\max_{x'} \sum_{b,c} p_t \big(\log p_t - \log p_s(x')\big)\Big),
    \qquad
    L = \tfrac56\, \mathcal{D}\big(p_t, p_s(x')\big) + \tfrac16\, \mathcal{D}\big(p_t, p_s(x)\big),

    \mathcal{D}(p_t, p_s) = \frac{1}{B C} \sum_{b=1}^{B} \sum_{c=1}^{C}
        p_{t,bc} \big(\log(p_{t,bc} + 10^{-5}) - \log p_{s,bc}\big),

with :math:`p_t = \mathrm{softmax}(z_t(x))` the frozen robust teacher's probabilities on the *clean*
image (temperature 1) and :math:`p_s` the student's. Zi, Zhao, Ma & Jiang, "Revisiting Adversarial
Robustness Distillation: Robust Soft Labels Make Student Better", ICCV 2021. No label is read: the
teacher's soft labels replace them in the attack and in both terms.

One step, in the order of the authors' code (github.com/zibojia/RSLAD ``rslad_loss.py``
``rslad_inner_loss`` and ``resnet18_rslad_cifar10.py``):

1. the teacher's logits on the clean batch (no gradient);
2. the inner attack on the student **in eval mode** (:func:`relkd.evaluation.robust.pgd`): start
   :math:`x + 0.001\,N(0, 1)` (pixel units, unprojected), 10 signed steps of :math:`2/255` on the summed
   KL above, each projected onto the :math:`8/255` ball and the :math:`[0, 1]` box, in pixel space
   (see :mod:`relkd.evaluation.robust` for the normalisation);
3. the student back in its training mode: logits on :math:`x'`, then on :math:`x` (two forwards, so
   BatchNorm's running statistics move twice, adversarial batch first, as in the authors' loop);
4. the two terms, summed by the engine into one update.

:math:`\mathcal D` is the authors' ``kl_loss`` reduced by ``torch.mean``: the KL divergence divided
by the number of classes (``reduction="mean"``); ``"batchmean"`` gives the textbook per-image KL
(:math:`C` times larger). For CIFAR-100 the authors multiply it by 10 (``scale: 10``) to keep the
CIFAR-10 scale. The :math:`10^{-5}` inside the teacher's logarithm is theirs (``log_eps``).

Where we differ from the authors. Their teacher is a TRADES WideResNet-34-10 (or WRN-70-16) downloaded
pre-trained; relkd trains the robust teacher once with PGD adversarial training
(:mod:`relkd.methods.pgd_at`; ``teachers: {robust: {like: teacher, method: pgd_at}}``). Their recipe (SGD
lr 0.1, momentum 0.9, weight decay 2e-4, batch 128, 300 epochs, x0.1 at 215, 260 and 285) is the
suite's to set. The attack's gradient is taken with respect to the input only, so the student's
parameter gradients are untouched by it (theirs zero them after the attack).

**Shapes:** inputs ``[B, C, H, W]`` (normalised); logits ``[B, K]``; losses scalars.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from relkd.evaluation.robust import PixelSpace, kl_objective, pgd
from relkd.methods.base import StageInfo, Step, StepContext, StepOutput, register_step

__all__ = ["FUNCTIONAL", "REDUCTIONS", "RSLAD", "rslad_kl"]

FUNCTIONAL = ("rslad_kl",)
REDUCTIONS = ("mean", "batchmean")


def rslad_kl(
    student_logits: Tensor, teacher_logits: Tensor, reduction: str = "mean", log_eps: float = 1e-5
) -> Tensor:
    r""":math:`\mathcal D(p_t, p_s)` of the module docstring: :math:`p_t (\log(p_t + \epsilon) - \log p_s)`
    summed over classes and averaged over the batch, then divided by :math:`C` for ``mean`` (the
    authors' reduction) or not for ``batchmean``.

    Args:
        student_logits: ``[B, C]``; the gradient flows into them.
        teacher_logits: ``[B, C]``; a constant (detached here).
        reduction: ``mean`` (over the ``B * C`` entries) or ``batchmean`` (over the ``B`` rows).
        log_eps: added to the teacher's probabilities inside the logarithm.

    Raises:
        ValueError: shapes that are not equal ``[B, C]`` with ``B >= 1``, or an unknown reduction.
    """
    if (
        student_logits.dim() != 2
        or student_logits.shape != teacher_logits.shape
        or student_logits.shape[0] < 1
    ):
        raise ValueError(
            "expected student and teacher logits of the same shape [B, C] with B >= 1, got "
            f"{list(student_logits.shape)} and {list(teacher_logits.shape)}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    wide = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    p_t = F.softmax(teacher_logits.detach().to(wide), dim=1)
    log_p_s = F.log_softmax(student_logits.to(wide), dim=1)
    elementwise = p_t * (torch.log(p_t + log_eps) - log_p_s)
    return elementwise.mean() if reduction == "mean" else elementwise.sum() / student_logits.shape[0]


@register_step("rslad")
class RSLAD(Step):
    r"""Robust soft-label adversarial distillation (see the module docstring).

    Args:
        epsilon: radius of the inner attack's ball, pixel units (the authors': 8/255).
        step_size: its step, pixel units (2/255).
        steps: its number of steps (10).
        init_std: standard deviation of its Gaussian start, pixel units (0.001).
        adv_weight, nat_weight: weights of the adversarial and natural terms (5/6 and 1/6).
        scale: multiplies both terms (1; the authors use 10 on CIFAR-100).
        reduction: of :func:`rslad_kl` (``mean``: KL / C, the authors').
        log_eps: of :func:`rslad_kl` (1e-5).
        mean, std: the inputs' per-channel normalisation; default the data set's (injected as
            ``pixels`` by the engine).
        students, teachers, stage, pixels: filled in by the engine; the run has one student and one
            teacher (the robust one).

    Its losses are ``adv`` (``adv_weight * scale * D(adversarial)``) and ``nat``; its metrics the
    unweighted ``kl_adv`` and ``kl_nat``. The logits (training accuracy) are the student's on the
    clean batch. The stage's ``ce_weight`` must be 0: RSLAD reads no label.
    """

    def __init__(
        self,
        epsilon: float = 8 / 255,
        step_size: float = 2 / 255,
        steps: int = 10,
        init_std: float = 0.001,
        adv_weight: float = 5 / 6,
        nat_weight: float = 1 / 6,
        scale: float = 1.0,
        reduction: str = "mean",
        log_eps: float = 1e-5,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        students: Sequence[str] = (),
        teachers: Sequence[str] = (),
        stage: StageInfo | None = None,
        pixels: PixelSpace | None = None,
    ) -> None:
        super().__init__()
        if len(students) != 1 or len(teachers) != 1:
            raise ValueError(
                f"rslad distils one robust teacher into one student, got students {list(students)} and "
                f"teachers {list(teachers)}; give the method "
                "teachers: {robust: {like: teacher, method: pgd_at}}"
            )
        if stage is not None and stage.ce_weight:
            raise ValueError(
                "rslad reads no label, so its cross-entropy weight must be 0, got "
                f"ce_weight {stage.ce_weight}; "
                "set train.ce_weight: 0"
            )
        if reduction not in REDUCTIONS:
            raise ValueError(f"rslad: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        if epsilon < 0 or step_size < 0 or steps < 0:
            raise ValueError(
                f"rslad: epsilon, step_size and steps must be >= 0, got {epsilon}, {step_size}, {steps}"
            )
        if (mean is None) != (std is None):
            raise ValueError("rslad: give both mean and std, or neither (the data set's are used)")
        self.student, self.teacher = students[0], teachers[0]
        self.attack = {
            "epsilon": float(epsilon),
            "step_size": float(step_size),
            "steps": int(steps),
            "init_std": float(init_std),
        }
        self.adv_weight, self.nat_weight, self.scale = float(adv_weight), float(nat_weight), float(scale)
        self.reduction, self.log_eps = reduction, float(log_eps)
        self.pixels = PixelSpace(tuple(mean), tuple(std)) if mean is not None else pixels

    def extra_repr(self) -> str:
        return (
            f"student={self.student!r}, teacher={self.teacher!r}, attack={self.attack}, "
            f"weights=({self.adv_weight:.4g}, {self.nat_weight:.4g}), scale={self.scale}, "
            f"reduction={self.reduction!r}"
        )

    def forward(self, ctx: StepContext) -> StepOutput:
        if self.pixels is None:
            raise ValueError(
                "rslad attacks in pixel space but the data set does not say its normalisation; give the "
                "step mean and std"
            )
        x = ctx.batch["input"]
        teacher = ctx.run(self.teacher, x)["logits"].detach()
        x_adv = pgd(
            ctx.networks[self.student],
            x,
            kl_objective(F.softmax(teacher.float(), dim=1)),
            random_start="normal",
            pixels=self.pixels,
            **self.attack,
        )
        adversarial = ctx.run(self.student, x_adv)["logits"]
        natural = ctx.run(self.student, x)["logits"]
        kl_adv = rslad_kl(adversarial, teacher, self.reduction, self.log_eps)
        kl_nat = rslad_kl(natural, teacher, self.reduction, self.log_eps)
        losses = {"adv": self.adv_weight * self.scale * kl_adv, "nat": self.nat_weight * self.scale * kl_nat}
        return StepOutput(natural, losses, metrics={"kl_adv": kl_adv.detach(), "kl_nat": kl_nat.detach()})
