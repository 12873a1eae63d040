r"""Hinton knowledge distillation on softened logits.

.. math::
    \mathcal{L}_{KD} = T^2 \, \frac{1}{B} \sum_b \mathrm{KL}\big(\mathrm{softmax}(t_b / T) \,\|\,
    \mathrm{softmax}(s_b / T)\big)

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS workshop 2015. The ``T^2``
factor keeps the gradient scale independent of ``T`` (Sec. 2). Default ``T = 4`` as in the CIFAR-100 KD
benchmark (Tian et al., ICLR 2020).

``reduction``: ``"mean"`` (default) divides the sum over the batch and classes by ``B`` (PyTorch's
``"batchmean"``), ``"sum"`` does not divide, and ``"elementwise_mean"`` divides by ``B * C``: the legacy
default of ``nn.KLDivLoss()``, which codes such as Teacher-free KD (Yuan et al., CVPR 2020) used and
tuned their weights for.

Shapes:
    student_logits, teacher_logits: ``[B, C]`` -> scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from relkd._debug import check_finite
from relkd.graphs.ops import compute_dtype, full_precision
from relkd.losses._inputs import reduce
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register

__all__ = ["kd", "KDLoss"]
FUNCTIONAL = ("kd",)
_REDUCTIONS = ("mean", "sum", "elementwise_mean")


def kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    T: float = 4.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Hinton KD loss; ``reduction="mean"`` averages over the batch, ``"sum"`` sums over it,
    ``"elementwise_mean"`` averages over the batch and the classes (``nn.KLDivLoss()``'s legacy mean)."""
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ValueError(
            f"kd: expected logits of shape [B, C], got student {tuple(student_logits.shape)} and "
            f"teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd: expected student and teacher logits of the same shape [B, C], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)} (batch size or "
            "number of classes differ)"
        )
    if T <= 0:
        raise ValueError(f"kd: temperature T must be positive, got {T}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"kd: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    check_finite("kd", "student input", student_logits)
    check_finite("kd", "teacher input", teacher_logits)
    dtype = compute_dtype(student_logits.dtype)
    with full_precision(student_logits.device):
        log_p_s = F.log_softmax(student_logits.to(dtype) / T, dim=1)
        log_p_t = F.log_softmax(teacher_logits.detach().to(dtype) / T, dim=1)
        per_sample = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)
        b = max(1, student_logits.shape[0])
        if reduction == "elementwise_mean":
            loss = per_sample.sum() / (b * student_logits.shape[1]) * T * T
            check_finite("kd", "loss", loss)
            return loss
        return reduce(per_sample.sum() / b * T * T, b, reduction, "kd")


@register("kd")
class KDLoss(DistillLoss):
    """Module form of :func:`kd`; reads the networks' logits.

    Config::

        losses:
          kd: {weight: 0.9, T: 4.0}
    """

    taps = ("logits",)

    def __init__(self, T: float = 4.0, reduction: str = "mean") -> None:
        super().__init__()
        self.T, self.reduction = T, reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return kd(student_logits, teacher_logits, T=self.T, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"T={self.T}, reduction={self.reduction!r}"
