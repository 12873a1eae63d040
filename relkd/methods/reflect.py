r"""Transferring inductive biases through knowledge distillation (Reflect): pure distillation from a
teacher whose architecture has the bias (a CNN) into one that lacks it (an MLP).

.. math::
    L = r_d \, \frac{s(\tau)}{B} \sum_b \Big(-\sum_c p^\tau_{t,bc} \log \mathrm{softmax}(z_s / \tau)_{bc}\Big)
        + w_{ce}\, \mathrm{CE}(z_s, y), \qquad p^\tau_t = \mathrm{softmax}(z_t / \tau)

Abnar, Dehghani & Zuidema, "Transferring Inductive Biases through Knowledge Distillation",
arXiv:2006.00555. Official code github.com/samiraabnar/Reflect: ``distill/distiller.py``
``Distiller.distill_loop`` (``final_loss = student_distill_rate * distill_loss + student_gold_rate *
actual_loss + reg_loss``), ``tf2_models/metrics.py`` ``distill_loss`` (the mean over the batch of the
soft cross-entropy at temperature :math:`\tau`, times ``scale_factor = 1 / tmp**2``),
``distill/distill_util.py`` ``get_probs`` (the teacher's ``softmax(z_t / tmp)``), ``util/distill_params.py``.

The term is a soft cross-entropy, not a KL: the two differ by the teacher's entropy, a constant, so the
gradients are equal. Its scale :math:`s(\tau)`:

* ``scale: code`` (the default): :math:`1/\tau^2`, as released. The code divides by :math:`\tau^2` and
  multiplies by nothing afterwards: there is no Hinton :math:`\tau^2` rescaling, and the gradient with
  respect to the student's logits is :math:`(q^\tau_s - p^\tau_t)/\tau^3`. Under Adam (the authors'
  optimiser, and relkd's usual AdamW) a constant factor on the only loss term barely changes the
  updates; it changes the balance against weight decay.
* ``scale: none``: :math:`1`, the plain soft cross-entropy at :math:`\tau`.
* ``scale: hinton``: :math:`\tau^2` (Hinton et al., 2015).

The MNIST configurations of the paper are pure distillation: ``student_distill_rate`` :math:`r_d = 1`,
``student_gold_rate`` ``0`` (the recipe's ``ce_weight``, 0 in the method's YAML) and ``distill_temp``
:math:`\tau = 5` (``pure_dstl5_4_crs_slw_mnst``: Adam, lr ``1e-4``, cosine decay with restarts, 300
epochs, each weight's gradient clipped to norm 1 by Keras' ``clipnorm``). Every row of the batch is
distilled, transfer images included.

Where we differ from the authors. Their teacher runs in training mode while it teaches
(``teacher_model(x, training=True)``: dropout on, batch-norm statistics of the batch); relkd's
teachers are frozen in eval mode, which is the same function for a teacher without dropout and batch
normalisation (the LeNet teachers of the experiments). The authors' networks add L1 and L2 penalties
of ``1e-5`` to their kernels (``reg_loss``); here weight decay is the optimiser's. The recipe (optimiser,
schedule, epochs) belongs to the suite.

**Shapes:** student and teacher logits ``[B, C]``; target ``[B]``; every loss a scalar.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from relkd.methods.base import Step, StepContext, StepOutput, register_step
from relkd.methods.weighted_sum import cross_entropy

__all__ = ["FUNCTIONAL", "SCALES", "Reflect", "reflect_distill"]

FUNCTIONAL = ("reflect_distill",)
SCALES = ("code", "none", "hinton")


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32 at least (logits under bf16/fp16 autocast), float64 kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def reflect_distill(student: Tensor, teacher: Tensor, T: float = 5.0, scale: str = "code") -> Tensor:
    r"""The soft cross-entropy at temperature :math:`\tau`, scaled:
    :math:`\frac{s(\tau)}{B} \sum_b -\sum_c p^\tau_{t,bc} \log \mathrm{softmax}(z_s/\tau)_{bc}` with
    :math:`s(\tau)` = :math:`1/\tau^2` (``code``), 1 (``none``) or :math:`\tau^2` (``hinton``); the teacher
    is a constant.

    **Shapes:** ``[B, C]`` and ``[B, C]`` -> scalar.
    """
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"expected student and teacher logits of the same shape [B, C], got {list(student.shape)} and "
            f"{list(teacher.shape)}"
        )
    if T <= 0:
        raise ValueError(f"reflect: the temperature T must be positive, got {T}")
    if scale not in SCALES:
        raise ValueError(f"reflect: scale must be one of {', '.join(SCALES)}, got {scale!r}")
    log_q = F.log_softmax(_wide(student) / T, dim=1)
    p = F.softmax(_wide(teacher.detach()).to(log_q.dtype) / T, dim=1)
    factor = {"code": 1.0 / (T * T), "none": 1.0, "hinton": T * T}[scale]
    return -(p * log_q).sum(1).mean() * factor


@register_step("reflect")
class Reflect(Step):
    """Reflect's step (see the module docstring).

    Args:
        T: the temperature :math:`\\tau` (``distill_temp``, 5).
        scale: the term's scale :math:`s(\\tau)`: ``code`` (:math:`1/\\tau^2`), ``none`` or ``hinton``.
        distill_weight: :math:`r_d` (``student_distill_rate``, 1).
        students, teachers: filled in by the engine; one of each.

    Its losses are ``distill`` and, when the stage's ``ce_weight`` is not 0, ``ce``; its metrics the
    unweighted values. The logits are the student's.
    """

    def __init__(
        self,
        T: float = 5.0,
        scale: str = "code",
        distill_weight: float = 1.0,
        students: Sequence[str] = (),
        teachers: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if T <= 0:
            raise ValueError(f"reflect: the temperature T must be positive, got {T}")
        if scale not in SCALES:
            raise ValueError(f"reflect: scale must be one of {', '.join(SCALES)}, got {scale!r}")
        if len(students) != 1 or len(teachers) != 1:
            raise ValueError(
                f"reflect distils one teacher into one student, got {len(students)} student(s) and "
                f"{len(teachers)} teacher(s)"
            )
        self.T, self.scale, self.weight = float(T), scale, float(distill_weight)
        self.student, self.teacher = students[0], teachers[0]

    def extra_repr(self) -> str:
        return f"T={self.T}, scale={self.scale!r}, distill_weight={self.weight}"

    def forward(self, ctx: StepContext) -> StepOutput:
        teacher = ctx.run(self.teacher)["logits"]
        student = ctx.run(self.student)["logits"]
        distill = reflect_distill(student, teacher, self.T, self.scale)
        losses, metrics = {"distill": self.weight * distill}, {"distill": distill.detach()}
        if ctx.stage.ce_weight:
            ce = cross_entropy(student, ctx.batch["target"])
            losses["ce"] = ctx.stage.ce_weight * ce
            metrics["ce"] = ce.detach()
        return StepOutput(student, losses, metrics)
