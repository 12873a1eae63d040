r"""Attention transfer: match the normalised spatial attention maps of stage pairs.

For a feature map :math:`A \in \mathbb{R}^{B \times C \times H \times W}` the attention map of a sample is
the channel mean of its ``p``-th powers, flattened and L2-normalised:

.. math::
    q_b = \operatorname{vec}\Big(\frac{1}{C} \sum_c |A_{b,c}|^p\Big) \in \mathbb{R}^{HW}, \qquad
    \hat q_b = \frac{q_b}{\lVert q_b \rVert_2}, \qquad
    \mathcal{L}_{AT} = \sum_j \frac{1}{B \cdot HW_j} \sum_{b, i}
    \big(\hat q^{s,j}_{b,i} - \hat q^{t,j}_{b,i}\big)^2

over the stage pairs :math:`j` (the method's weight is the paper's :math:`\beta`).

Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional
Neural Networks via Attention Transfer", ICLR 2017. We follow the authors' code
(github.com/szagoruyko/attention-transfer, ``utils.at`` / ``utils.at_loss``) and RepDistiller's
``distiller_zoo/AT.py`` (Tian et al., ICLR 2020), whose numbers the CIFAR-100 benchmark reports:

- ``p = 2``; the squared difference of the normalised maps averaged over the batch and the ``HW``
  positions of each pair, summed over the pairs; :math:`\beta = 1000` on CIFAR (``--beta 1e+3``,
  RepDistiller ``-b 1000``) with the cross-entropy at weight 1 and no logit KD. That weight is the
  method's, not the loss's: ``build("at")`` is the unweighted sum.
- Stages: RepDistiller distils ``feat[1:-1]``, the outputs of the three residual stages of the CIFAR
  ResNets and WRNs, which are the zoo models' taps ``stage1``, ``stage2``, ``stage3`` (the default
  ``taps``; name ``stage4`` too in a config for four-stage models such as VGG).
- Sizes: the authors pair stages of equal spatial size. When the sizes differ, RepDistiller average-pools
  the *larger feature map* (whichever side it is) to the smaller's size with ``adaptive_avg_pool2d``
  before the attention map is formed; we do the same, per dimension (RepDistiller assumes square
  maps). Channel counts may differ: the channel mean removes them.
- ``form="paper"``: the paper's Eq. 2 writes the distance as :math:`\frac{\beta}{2} \sum_j \lVert
  \hat q^{s,j} - \hat q^{t,j} \rVert_2`, the norm not squared, per sample; this form returns
  :math:`\frac{1}{2} \sum_j \frac{1}{B} \sum_b \lVert \hat q^{s,j}_b - \hat q^{t,j}_b \rVert_2`
  (its gradient at a zero difference is 0). :math:`\beta = 1000` was tuned for the code's form.
- The powers use :math:`|A|^p` (the paper's :math:`F^p_{sum}`); the code's ``A.pow(p)`` is the same for
  even ``p``. The normalisation divides by :math:`\max(\lVert q \rVert_2, 10^{-12})` as the code does,
  so an all-zero map gives the zero vector.

Shapes:
    student, teacher: ``[B, C, H, W]`` each, or equally long lists of them (one per stage pair);
    channels and spatial sizes may differ between student and teacher -> scalar.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from relkd._debug import check_finite
from relkd.graphs.ops import compute_dtype, full_precision
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register

__all__ = ["attention_map", "attention_transfer", "ATLoss"]
FUNCTIONAL = ("attention_transfer", "attention_map")

_FORMS = ("code", "paper")
Maps = torch.Tensor | Sequence[torch.Tensor]


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """The L2-normalised attention map ``[B, H*W]`` of a feature map ``[B, C, H, W]``."""
    q = features.abs().pow(p).mean(1).flatten(1)
    return F.normalize(q, dim=1)


def _pairs(student: Maps, teacher: Maps) -> list[tuple[torch.Tensor, torch.Tensor]]:
    single = isinstance(student, torch.Tensor), isinstance(teacher, torch.Tensor)
    if single[0] != single[1]:
        raise TypeError(
            "at: expected a feature map on both sides or a list of them on both sides, got "
            f"{'a tensor' if single[0] else 'a list'} for the student and "
            f"{'a tensor' if single[1] else 'a list'} for the teacher"
        )
    if single[0]:
        student, teacher = [student], [teacher]
    if len(student) != len(teacher):
        raise ValueError(
            f"at: expected as many student as teacher feature maps, got {len(student)} and {len(teacher)}"
        )
    if not len(student):
        raise ValueError("at: expected at least one pair of feature maps, got none")
    for j, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if s.dim() != 4 or t.dim() != 4:
            raise ValueError(
                f"at: expected feature maps [B, C, H, W], got student {tuple(s.shape)} and teacher "
                f"{tuple(t.shape)} at pair {j}"
            )
        if s.shape[0] != t.shape[0]:
            raise ValueError(
                f"at: expected student and teacher with the same batch size, got {s.shape[0]} and "
                f"{t.shape[0]} at pair {j}"
            )
        check_finite("at", f"student input {j}", s)
        check_finite("at", f"teacher input {j}", t)
    return list(zip(student, teacher, strict=True))


def _common_size(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger map of each spatial dimension down to the smaller size."""
    size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    if tuple(s.shape[2:]) != size:
        s = F.adaptive_avg_pool2d(s, size)
    if tuple(t.shape[2:]) != size:
        t = F.adaptive_avg_pool2d(t, size)
    return s, t


def attention_transfer(student: Maps, teacher: Maps, p: float = 2.0, form: str = "code") -> torch.Tensor:
    """AT loss summed over the stage pairs; ``form="code"`` (default) or ``"paper"`` (see the module)."""
    if form not in _FORMS:
        raise ValueError(f"at: form must be one of {_FORMS}, got {form!r}")
    if p <= 0:
        raise ValueError(f"at: the exponent p must be positive, got {p}")
    pairs = _pairs(student, teacher)
    dtype = compute_dtype(pairs[0][0].dtype)
    total = torch.zeros((), dtype=dtype, device=pairs[0][0].device)
    with full_precision(pairs[0][0].device):
        for s, t in pairs:
            s, t = _common_size(s.to(dtype), t.detach().to(dtype))
            diff = attention_map(s, p) - attention_map(t, p)
            if form == "code":
                total = total + diff.pow(2).mean()
            else:
                total = total + 0.5 * torch.linalg.vector_norm(diff, dim=1).mean()
    check_finite("at", "loss", total)
    return total


@register("at")
class ATLoss(DistillLoss):
    """Module form of :func:`attention_transfer`; reads ``stage1``, ``stage2``, ``stage3``.

    Config (RepDistiller's and the authors' CIFAR weight)::

        losses:
          at: {weight: 1000.0, p: 2}
    """

    taps = ("stage1", "stage2", "stage3")

    def __init__(self, p: float = 2.0, form: str = "code") -> None:
        super().__init__()
        if form not in _FORMS:
            raise ValueError(f"at: form must be one of {_FORMS}, got {form!r}")
        self.p, self.form = p, form

    def forward(self, student: Maps, teacher: Maps) -> torch.Tensor:
        return attention_transfer(student, teacher, p=self.p, form=self.form)

    def extra_repr(self) -> str:
        return f"p={self.p}, form={self.form!r}"
