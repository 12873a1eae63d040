r"""Teacher-free KD with a manually designed teacher (Tf-KD\ :sub:`reg`).

The "teacher" of a sample with label :math:`c` among :math:`K` classes is the distribution

.. math::
    p^d(k) = \begin{cases} a & k = c \\ \frac{1 - a}{K - 1} & k \neq c \end{cases}

and the loss is a KL divergence from a temperature-softened form of it to the student's prediction:

.. math::
    \text{code:}\quad q = \operatorname{softmax}(p^d / T), \quad p^s = \operatorname{softmax}(z); \qquad
    \text{paper:}\quad q = \operatorname{softmax}(\log p^d / T) \propto (p^d)^{1/T}, \quad
    p^s = \operatorname{softmax}(z / T);

    \mathcal{L} = \frac{1}{B K} \sum_{b,k} q_{b,k} \big(\log q_{b,k} - \log p^s_{b,k}\big)

Yuan, Tay, Li, Wang & Feng, "Revisiting Knowledge Distillation via Label Smoothing Regularization",
CVPR 2020. The method's objective is :math:`(1 - \alpha)\,\mathrm{CE} + \alpha\, m\, \mathcal{L}`: the
cross-entropy is the engine's (``ce_weight`` :math:`= 1 - \alpha`), the term's weight is
:math:`\alpha m`.

Defaults follow the authors' code (github.com/yuanli2333/Teacher-free-Knowledge-Distillation,
``my_loss_function.py`` ``loss_kd_regularization``), which produced the published numbers:

- ``variant="code"``: the softmax is taken of the *probability vector* :math:`p^d / T`, so the target
  is nearly uniform (:math:`K = 100`, :math:`T = 20`: 0.0105 on the label, 0.0100 elsewhere) and the
  term acts as a confidence penalty; the student's logits are not softened and there is no
  :math:`T^2`. ``a = 0.99`` is hard-coded there; ``T = 20`` is the ResNet18 config
  (``experiments/base_experiments/base_resnet18/params.json``: ``reg_temperature`` 20, ``reg_alpha``
  0.1, ``multiplier`` 100).
- ``reduction="elementwise_mean"``: ``nn.KLDivLoss()`` with its default reduction, the sum divided by
  ``B * K``. ``"mean"`` divides by ``B`` (the per-sample divergence), ``"sum"`` not at all.
- ``variant="paper"``: the paper writes the loss as :math:`(1-\alpha) H(q, p) + \alpha\,
  D_{KL}(p^d_\tau, p^\tau)` with :math:`p^d_\tau` the designed distribution "softened with temperature
  :math:`\tau`" and :math:`p^\tau` the student's softened output, as in its KD loss. Softening a
  distribution with temperature means dividing its logits by :math:`\tau`; the logits of :math:`p^d`
  are :math:`\log p^d` up to a constant, which softmax ignores, hence :math:`q \propto (p^d)^{1/T}`,
  the distribution a teacher predicting :math:`p^d` would give at temperature :math:`T`. The student is
  softened with the same :math:`T`. No :math:`T^2` factor is written there, so none is applied; the
  reduction is the same option (the paper's per-sample divergence is ``reduction="mean"``).

Labels: rows with target ``-1`` (unlabelled transfer images) have no designed teacher; they are left
out, and the reduction counts the labelled rows only (a batch without any gives 0).

Shapes:
    student_logits ``[B, K]``, target ``[B]`` (class indices, ``-1`` for unlabelled rows) -> scalar.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from relkd._debug import check_finite
from relkd.graphs.ops import compute_dtype, full_precision
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register

__all__ = ["tfkd_target", "tfkd_reg", "TfKDRegLoss"]
FUNCTIONAL = ("tfkd_reg", "tfkd_target")

_VARIANTS = ("code", "paper")
_REDUCTIONS = ("elementwise_mean", "mean", "sum")


def _check_options(a: float, T: float, variant: str, reduction: str) -> None:
    if variant not in _VARIANTS:
        raise ValueError(f"tfkd_reg: variant must be one of {_VARIANTS}, got {variant!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"tfkd_reg: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 < a <= 1.0:
        raise ValueError(f"tfkd_reg: the label's probability a must be in (0, 1], got {a}")
    if T <= 0:
        raise ValueError(f"tfkd_reg: temperature T must be positive, got {T}")


def tfkd_target(
    target: torch.Tensor,
    num_classes: int,
    a: float = 0.99,
    T: float = 20.0,
    variant: str = "code",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The softened designed teacher ``q`` ``[B, K]`` of labels ``target`` ``[B]`` (see the module).

    Rows with target ``-1`` get the target of class 0; :func:`tfkd_reg` leaves them out.
    """
    _check_options(a, T, variant, "mean")
    if num_classes < 2:
        raise ValueError(f"tfkd_reg: needs at least 2 classes, got {num_classes}")
    label = target.long().clamp(min=0).unsqueeze(1)
    designed = torch.full(
        (target.shape[0], num_classes), (1.0 - a) / (num_classes - 1), dtype=dtype, device=target.device
    ).scatter(1, label, a)
    logits = designed if variant == "code" else designed.log()
    return F.softmax(logits / T, dim=1)


def tfkd_reg(
    student_logits: torch.Tensor,
    target: torch.Tensor,
    a: float = 0.99,
    T: float = 20.0,
    variant: str = "code",
    reduction: str = "elementwise_mean",
) -> torch.Tensor:
    """Tf-KD_reg loss of the student's logits against the designed teacher of ``target``."""
    _check_options(a, T, variant, reduction)
    if student_logits.dim() != 2:
        raise ValueError(f"tfkd_reg: expected logits of shape [B, K], got {tuple(student_logits.shape)}")
    if target.dim() != 1 or target.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"tfkd_reg: expected one target per row of the logits, got logits "
            f"{tuple(student_logits.shape)} and target {tuple(target.shape)}"
        )
    check_finite("tfkd_reg", "student input", student_logits)
    b, k = student_logits.shape
    dtype = compute_dtype(student_logits.dtype)
    with full_precision(student_logits.device):
        q = tfkd_target(target, k, a, T, variant, dtype)
        z = student_logits.to(dtype)
        log_p_s = F.log_softmax(z if variant == "code" else z / T, dim=1)
        per_row = F.kl_div(log_p_s, q, reduction="none").sum(1)
        labelled = target >= 0
        total = torch.where(labelled, per_row, torch.zeros_like(per_row)).sum()
        rows = labelled.sum().clamp(min=1).to(dtype)
        if reduction == "elementwise_mean":
            loss = total / (rows * k)
        elif reduction == "mean":
            loss = total / rows
        else:
            loss = total
    check_finite("tfkd_reg", "loss", loss)
    return loss


@register("tfkd_reg")
class TfKDRegLoss(DistillLoss):
    """Module form of :func:`tfkd_reg`; reads the student's logits and the batch's labels, no teacher.

    Config (the ResNet18 recipe: ``alpha`` 0.1, ``multiplier`` 100, so weight 10, ce_weight 0.9)::

        losses:
          tfkd_reg: {weight: 10.0, T: 20.0}
        train:
          ce_weight: 0.9
    """

    taps = ("logits",)
    batch_keys = ("target",)
    needs_teacher = False

    def __init__(
        self, a: float = 0.99, T: float = 20.0, variant: str = "code", reduction: str = "elementwise_mean"
    ) -> None:
        super().__init__()
        _check_options(a, T, variant, reduction)
        self.a, self.T, self.variant, self.reduction = a, T, variant, reduction

    def forward(self, student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return tfkd_reg(student_logits, target, self.a, self.T, self.variant, self.reduction)

    def distill(
        self,
        student: Mapping[str, Any],
        teacher: Mapping[str, Any] | None = None,
        batch: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """The loss on the student's logits and ``batch["target"]``; a teacher's features are ignored."""
        if batch is None or "target" not in batch:
            raise KeyError("tfkd_reg needs the labels of the batch as batch['target']")
        return self(student[self.taps[0]], batch["target"])

    def extra_repr(self) -> str:
        return f"a={self.a}, T={self.T}, variant={self.variant!r}, reduction={self.reduction!r}"
