r"""DeiT: distillation through attention, a class token that learns from labels and a distillation
token that learns from the teacher.

.. math::
    L = w_{ce}\, \mathrm{CE}(z_{cls}, y) + \alpha\, L_{dist}(z_{dist}, z_t)

.. math::
    L_{dist}^{hard} = \frac1B \sum_b -\log \mathrm{softmax}(z_{dist})_{b,\, \arg\max_c z_{t,bc}}, \qquad
    L_{dist}^{soft} = \frac{\tau^2}{B C} \sum_{b,c} p^\tau_{t,bc} \big(\log p^\tau_{t,bc}
        - \log p^\tau_{dist,bc}\big), \quad p^\tau = \mathrm{softmax}(z / \tau)

Touvron, Cord, Douze, Massa, Sablayrolles & Jégou, "Training data-efficient image transformers &
distillation through attention", ICML 2021. Official code github.com/facebookresearch/deit
(``losses.py`` ``DistillationLoss.forward``, ``models.py`` ``DistilledVisionTransformer``,
``main.py``). The student is a vision transformer with a distillation token and a second head
(:class:`relkd.models.vit.VisionTransformer`, registered as ``deit_tiny``): ``z_cls`` is the class
head's output, ``z_dist`` the distillation head's; the deployed classifier is their mean. The teacher
(a CNN) runs on the same batch as the student, at every step.

As in the official code:

* ``hard`` (the default, which produced the published DeiT numbers): the cross-entropy of the
  distillation head against the teacher's argmax, averaged over the batch.
* ``soft``: the KL divergence at temperature :math:`\tau` summed over the batch and the classes,
  times :math:`\tau^2`, divided by ``B * C`` (``outputs_kd.numel()``: the legacy mean of
  ``nn.KLDivLoss``, issue #61 of the repository). It is ``1/C`` of the batch-mean KL of Hinton's KD.
* :math:`\alpha = 0.5` and :math:`\tau = 1` (``main.py`` ``--distillation-alpha``,
  ``--distillation-tau``); the cross-entropy weight is the recipe's ``ce_weight``, which the method's
  YAML sets to :math:`1 - \alpha = 0.5`.
* The teacher's argmax (or probabilities) are constants.

Where we differ from the authors. The official base criterion is a soft-target cross-entropy over
mixup/cutmix targets with label smoothing 0.1 (``main.py``: ``--mixup 0.8 --cutmix 1.0 --smoothing
0.1``); here it is the engine's cross-entropy on the labelled rows (target ``-1`` marks transfer
images, which the distillation term reads but the cross-entropy does not), and augmentation is the
recipe's. The paper states soft distillation with :math:`\tau = 3`, :math:`\alpha = 0.1`, and a
hard-label variant whose teacher label is smoothed (:math:`\varepsilon = 0.1`); neither is in the
released code, and the paper's values were not checked against it. Both are options away (``T``,
``alpha``, ``smoothing``: the teacher's class gets :math:`1 - \varepsilon` and every other class
:math:`\varepsilon / (C - 1)`). A student without a distillation token (``vit_tiny`` or any other
network) is distilled on its one output: both terms read the class head, the paper's "usual
distillation" of the class token.

**Shapes:** student heads ``[B, C]`` each, teacher logits ``[B, C]``, target ``[B]``; every loss a
scalar.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relkd.methods.base import Step, StepContext, StepOutput, register_step
from relkd.methods.weighted_sum import cross_entropy
from relkd.models import vit  # noqa: F401  (registers deit_tiny and vit_tiny, the method's students)

__all__ = ["DISTILLATIONS", "FUNCTIONAL", "DeiT", "deit_hard", "deit_soft", "student_heads"]

FUNCTIONAL = ("deit_hard", "deit_soft")
DISTILLATIONS = ("hard", "soft")


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32 at least (logits under bf16/fp16 autocast), float64 kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check(student: Tensor, teacher: Tensor) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"expected distillation-head and teacher logits of the same shape [B, C], got "
            f"{list(student.shape)} and {list(teacher.shape)}"
        )


def deit_hard(dist_logits: Tensor, teacher_logits: Tensor, smoothing: float = 0.0) -> Tensor:
    r"""Hard distillation: :math:`\frac1B \sum_b \mathrm{CE}(z_{dist,b}, \arg\max_c z_{t,bc})`.

    With ``smoothing`` :math:`\varepsilon > 0` the target puts :math:`1 - \varepsilon` on the teacher's
    class and :math:`\varepsilon / (C - 1)` on each other class (the paper's variant).

    **Shapes:** ``[B, C]`` and ``[B, C]`` -> scalar.
    """
    _check(dist_logits, teacher_logits)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"deit: smoothing must be in [0, 1), got {smoothing}")
    label = teacher_logits.detach().argmax(dim=1)
    log_p = F.log_softmax(_wide(dist_logits), dim=1)
    if smoothing == 0.0:
        return F.nll_loss(log_p, label)
    c = dist_logits.shape[1]
    target = torch.full_like(log_p, smoothing / (c - 1)).scatter_(1, label[:, None], 1.0 - smoothing)
    return -(target * log_p).sum(1).mean()


def deit_soft(dist_logits: Tensor, teacher_logits: Tensor, T: float = 1.0) -> Tensor:
    r"""Soft distillation as released: :math:`\frac{\tau^2}{BC} \sum_{b,c} p^\tau_t (\log p^\tau_t - \log
    p^\tau_{dist})`.

    **Shapes:** ``[B, C]`` and ``[B, C]`` -> scalar.
    """
    _check(dist_logits, teacher_logits)
    if T <= 0:
        raise ValueError(f"deit: the temperature T must be positive, got {T}")
    log_p = F.log_softmax(_wide(dist_logits) / T, dim=1)
    log_q = F.log_softmax(_wide(teacher_logits.detach()).to(log_p.dtype) / T, dim=1)
    return (log_q.exp() * (log_q - log_p)).sum() * (T * T) / dist_logits.numel()


def student_heads(network: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """``(z_cls, z_dist)`` of ``network`` on ``inputs``: ``network.forward_heads(inputs)`` when it has
    one (:class:`~relkd.models.vit.VisionTransformer`, also inside a wrapper's ``module``), else its
    one output twice."""
    heads = getattr(network, "forward_heads", None) or getattr(
        getattr(network, "module", None), "forward_heads", None
    )
    if heads is not None:
        return heads(inputs)
    out = network(inputs)
    return out, out


@register_step("deit")
class DeiT(Step):
    """DeiT's step (see the module docstring).

    Args:
        distillation: ``hard`` (the released default for the published models) or ``soft``.
        alpha: weight :math:`\\alpha` of the distillation term.
        T: temperature :math:`\\tau` of ``soft``.
        smoothing: label smoothing of the teacher's class under ``hard`` (0 as released).
        students, teachers: filled in by the engine; one of each.

    Its losses are ``ce`` (the stage's ``ce_weight`` times the class head's cross-entropy on the
    labelled rows; absent at weight 0) and ``distill`` (:math:`\\alpha L_{dist}`); its metrics the
    unweighted values. The logits are the deployed output, the mean of the two heads.
    """

    def __init__(
        self,
        distillation: str = "hard",
        alpha: float = 0.5,
        T: float = 1.0,
        smoothing: float = 0.0,
        students: Sequence[str] = (),
        teachers: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if distillation not in DISTILLATIONS:
            raise ValueError(
                f"deit: distillation must be one of {', '.join(DISTILLATIONS)}, got {distillation!r}"
            )
        if T <= 0:
            raise ValueError(f"deit: the temperature T must be positive, got {T}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"deit: smoothing must be in [0, 1), got {smoothing}")
        if len(students) != 1 or len(teachers) != 1:
            raise ValueError(
                f"deit distils one teacher into one student, got {len(students)} student(s) and "
                f"{len(teachers)} teacher(s)"
            )
        self.distillation, self.alpha, self.T, self.smoothing = (
            distillation,
            float(alpha),
            float(T),
            float(smoothing),
        )
        self.student, self.teacher = students[0], teachers[0]

    def extra_repr(self) -> str:
        return (
            f"distillation={self.distillation!r}, alpha={self.alpha}, T={self.T}, smoothing={self.smoothing}"
        )

    def forward(self, ctx: StepContext) -> StepOutput:
        teacher = ctx.run(self.teacher)["logits"]
        z_cls, z_dist = student_heads(ctx.networks[self.student], ctx.batch["input"])
        if self.distillation == "hard":
            distill = deit_hard(z_dist, teacher, self.smoothing)
        else:
            distill = deit_soft(z_dist, teacher, self.T)
        losses, metrics = {}, {"distill": distill.detach()}
        if ctx.stage.ce_weight:
            ce = cross_entropy(z_cls, ctx.batch["target"])
            losses["ce"] = ctx.stage.ce_weight * ce
            metrics["ce"] = ce.detach()
        losses["distill"] = self.alpha * distill
        return StepOutput(((z_cls + z_dist) / 2).detach(), losses, metrics)
