r"""MEAL V2: distil an ensemble of teachers into a pre-trained student, without labels.

.. math::
    \bar p = \frac1M \sum_{m=1}^M \mathrm{softmax}(z_t^m), \qquad
    L_G = -\frac1B \sum_b \sum_c \bar p_{bc} \log \mathrm{softmax}(z_s)_{bc}, \qquad
    \bar z = \frac1M \sum_m z_t^m,

.. math::
    L_D = \mathrm{BCE}\Big(D\big([z_s; \bar z]\big), \big[[1, 0]^{\times B}; [0, 1]^{\times B}\big]\Big),
    \qquad L = L_G + w_D \, L_D

Shen & Savvides, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet without
Tricks", NeurIPS 2020 workshop (arXiv:2009.08453). Official code github.com/szq0214/MEAL-V2
(``extensions/teacher_wrapper.py`` ``ModelDistillationWrapper``, ``extensions/kd_loss.py`` ``KLLoss``,
``loss.py`` ``discriminatorLoss``, ``models/discriminator.py``, ``train.py``).

* The soft target :math:`\bar p` averages the teachers' *probabilities* (``soft_labels``), which is not
  the softmax of their averaged logits :math:`\bar z` (``soft_labels_``); :math:`\bar z` feeds only the
  discriminator. ``T = 1``, and no one-hot label is read: the step never touches ``batch["target"]``,
  so labelled and transfer rows are distilled alike (``ce_weight`` must be 0).
* The discriminator :math:`D` (:class:`LogitDiscriminator`) maps a logit vector through
  ``C -> C//8 -> C//64 -> 2`` (the released 1x1 convolutions on a 1x1 map, i.e. linear layers) with a
  ReLU after every layer, the last included, as released. It reads the student's logits and the
  teachers' mean logits stacked along the batch; targets ``[1, 0]`` mark student rows and ``[0, 1]``
  teacher rows, and the loss is ``BCEWithLogits`` averaged over the ``2B x 2`` entries. It is a module
  of the step, so it is trained and checkpointed with the networks.

Discriminator modes (``discriminator``):

* ``joint`` (as released): one optimiser minimises :math:`L_G + L_D` over the student and :math:`D`
  together. :math:`L_D` is not reversed for the student, so its gradient pushes the student's logits
  to be *told apart* from the teachers': :math:`\partial L_D / \partial z_s` is the discriminator's own
  descent direction. The author calls :math:`D` a regulariser that keeps the student's output from
  becoming identical to the ensemble (issues #2 and #6), not an adversary.
* ``grl``: a gradient reversal layer between the student's logits and :math:`D`: :math:`D` still
  minimises :math:`L_D`, while the student receives :math:`-\partial L_D / \partial z_s` and learns to
  fool it (a true adversarial game, in one backward).
* ``none``: :math:`L_G` alone.

Where we differ from the authors. The released optimiser gives :math:`D` a learning rate of ``1e-4``
that ``_set_learning_rate`` overwrites with the student's every epoch, so :math:`D` trains at the
student's rate (issue #9, acknowledged as unintended); here :math:`D` is a parameter of the stage's one
optimiser, at the student's rate too, as the published models were trained (the intended rate is a
stage option away: ``optimizers: {steps.1.discriminator: {lr: 1.0e-4}}``). For fewer than 64 classes
the released widths ``C//8`` and ``C//64`` reach 0; they are kept at least 1 here, so that with few
classes :math:`D` is a one-unit bottleneck that barely learns (on the 10 digits its loss stays near
:math:`\log 2`); ``reduction: 2`` widens it. The recipe (SGD, momentum 0.9, no weight decay, lr
0.01 then 0.001, a student initialised from pre-trained weights) lives in
``relkd/configs/methods/meal_v2.yaml``.

**Shapes:** student logits ``[B, C]``; each teacher's ``[B, C]``; :math:`D` input ``[2B, C]``, output
``[2B, 2]``; every loss a scalar.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relkd.methods.base import StageInfo, Step, StepContext, StepOutput, register_step

__all__ = [
    "FUNCTIONAL",
    "MODES",
    "LogitDiscriminator",
    "MEALV2",
    "discriminator_loss",
    "discriminator_targets",
    "ensemble_probabilities",
    "reverse_gradient",
    "soft_cross_entropy",
]

FUNCTIONAL = (
    "ensemble_probabilities",
    "soft_cross_entropy",
    "discriminator_targets",
    "discriminator_loss",
    "reverse_gradient",
)
MODES = ("joint", "grl", "none")


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32 at least (logits under bf16/fp16 autocast), float64 kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_logits(student: Tensor, teachers: Sequence[Tensor]) -> None:
    if student.dim() != 2:
        raise ValueError(f"expected student logits of shape [B, C], got {list(student.shape)}")
    if not teachers:
        raise ValueError("MEAL V2 needs at least one teacher's logits, got none")
    for t in teachers:
        if t.shape != student.shape:
            raise ValueError(
                f"expected teacher logits of the student's shape {list(student.shape)}, got {list(t.shape)}"
            )


def ensemble_probabilities(teachers: Sequence[Tensor]) -> Tensor:
    r""":math:`\bar p = \frac1M \sum_m \mathrm{softmax}(z_t^m)`: the mean of the teachers' probabilities
    (detached).

    **Shapes:** each ``[B, C]`` -> ``[B, C]``.
    """
    if not teachers:
        raise ValueError("MEAL V2 needs at least one teacher's logits, got none")
    return torch.stack([F.softmax(_wide(t.detach()), dim=1) for t in teachers]).mean(0)


def soft_cross_entropy(student: Tensor, target: Tensor) -> Tensor:
    r""":math:`-\frac1B \sum_b \sum_c q_{bc} \log \mathrm{softmax}(z_s)_{bc}` against soft targets ``q``
    (detached).

    **Shapes:** student ``[B, C]``, target ``[B, C]`` -> scalar.
    """
    if student.shape != target.shape or student.dim() != 2:
        raise ValueError(
            f"expected student logits and soft targets of the same shape [B, C], got "
            f"{list(student.shape)} and {list(target.shape)}"
        )
    return -(target.detach() * F.log_softmax(_wide(student), dim=1)).sum(1).mean()


def discriminator_targets(batch_size: int, like: Tensor) -> Tensor:
    """The discriminator's targets: ``[1, 0]`` for the ``batch_size`` student rows, then ``[0, 1]`` for
    as many teacher rows (dtype and device of ``like``).

    **Shapes:** -> ``[2 * batch_size, 2]``.
    """
    rows = like.new_tensor([[1.0, 0.0], [0.0, 1.0]])
    return rows.repeat_interleave(batch_size, dim=0)


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


def reverse_gradient(x: Tensor, scale: float = 1.0) -> Tensor:
    """The identity forward; the gradient multiplied by ``-scale`` backward (Ganin & Lempitsky, 2015).

    **Shapes:** any -> the same.
    """
    return _Reverse.apply(x, scale)


def discriminator_loss(discriminator: nn.Module, student: Tensor, teacher: Tensor) -> Tensor:
    r""":math:`\mathrm{BCEWithLogits}(D([z_s; \bar z]), \text{targets})`, averaged over the ``2B x 2``
    entries; ``teacher`` (the mean teacher logits) is detached, ``student`` keeps its gradient.

    **Shapes:** student ``[B, C]``, teacher ``[B, C]`` -> scalar.
    """
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(
            f"expected student and teacher logits of the same shape [B, C], got {list(student.shape)} "
            f"and {list(teacher.shape)}"
        )
    student = _wide(student)
    output = discriminator(torch.cat([student, teacher.detach().to(student.dtype)]))
    return F.binary_cross_entropy_with_logits(output, discriminator_targets(student.shape[0], output))


class LogitDiscriminator(nn.Module):
    """The released discriminator: ``C -> C//r -> C//r^2 -> 2`` linear layers (1x1 convolutions in the
    official code), each followed by a ReLU, the output layer included.

    Args:
        num_classes: ``C``, the length of a logit vector.
        reduction: ``r`` (the official ``K = 8``); each hidden width is at least 1.

    **Shapes:** ``[N, C]`` -> ``[N, 2]`` (non-negative).
    """

    def __init__(self, num_classes: int, reduction: int = 8) -> None:
        super().__init__()
        if num_classes < 2 or reduction < 1:
            raise ValueError(
                f"expected num_classes >= 2 and reduction >= 1, got {num_classes} and {reduction}"
            )
        first = max(1, num_classes // reduction)
        second = max(1, first // reduction)
        self.layers = nn.Sequential(
            nn.Linear(num_classes, first), nn.ReLU(),
            nn.Linear(first, second), nn.ReLU(),
            nn.Linear(second, 2), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


@register_step("meal_v2")
class MEALV2(Step):
    """MEAL V2's step: the ensemble's soft cross-entropy and the logit discriminator (see the module
    docstring).

    Args:
        discriminator: ``joint`` (as released), ``grl`` (gradient reversal on the student's logits)
            or ``none``.
        discriminator_weight: ``w_D`` (1 as released).
        reduction: width reduction of the discriminator's layers (8 as released).
        grl_scale: the reversed gradient's scale under ``grl``.
        students, teachers, num_classes, stage: filled in by the engine; the run must have one student,
            and every teacher of the run is in the ensemble.

    Its losses are ``similarity`` (:math:`L_G`) and ``discriminator`` (:math:`w_D L_D`, absent under
    ``none``); the logits are the student's.
    """

    def __init__(
        self,
        discriminator: str = "joint",
        discriminator_weight: float = 1.0,
        reduction: int = 8,
        grl_scale: float = 1.0,
        students: Sequence[str] = (),
        teachers: Sequence[str] = (),
        num_classes: int | None = None,
        stage: StageInfo | None = None,
    ) -> None:
        super().__init__()
        if discriminator not in MODES:
            raise ValueError(
                f"meal_v2: discriminator must be one of {', '.join(MODES)}, got {discriminator!r}"
            )
        if len(students) != 1:
            raise ValueError(
                f"meal_v2 distils one student, got {len(students)} ({', '.join(students) or 'none'})"
            )
        if not teachers:
            raise ValueError("meal_v2 needs at least one teacher; the method has none (teachers: [])")
        if stage is not None and stage.ce_weight:
            raise ValueError(
                f"meal_v2 trains without labels, but stage {stage.name!r} has ce_weight {stage.ce_weight}; "
                "set ce_weight: 0"
            )
        self.mode, self.weight, self.grl_scale = discriminator, float(discriminator_weight), float(grl_scale)
        self.student, self.ensemble = students[0], list(teachers)
        self.discriminator: LogitDiscriminator | None = None
        if discriminator != "none":
            if num_classes is None:
                raise ValueError("meal_v2: the discriminator needs num_classes")
            self.discriminator = LogitDiscriminator(num_classes, reduction)

    def extra_repr(self) -> str:
        return f"discriminator={self.mode!r}, weight={self.weight}, teachers={self.ensemble}"

    def forward(self, ctx: StepContext) -> StepOutput:
        teachers = [ctx.run(t)["logits"] for t in self.ensemble]
        student = ctx.run(self.student)["logits"]
        _check_logits(student, teachers)
        losses = {"similarity": soft_cross_entropy(student, ensemble_probabilities(teachers))}
        if self.discriminator is not None:
            mean_logits = torch.stack([_wide(t) for t in teachers]).mean(0)
            into_d = reverse_gradient(student, self.grl_scale) if self.mode == "grl" else student
            l_d = discriminator_loss(self.discriminator, into_d, mean_logits)
            losses["discriminator"] = self.weight * l_d
        return StepOutput(student, losses)
