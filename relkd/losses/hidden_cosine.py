r"""Cosine alignment of hidden states over tokens, padding ignored (DistilBERT's :math:`L_{cos}`).

.. math::
    \mathcal{L} = \frac{1}{|\mathcal{R}|} \sum_{(b, l) \in \mathcal{R}}
    \big(1 - \cos(h^s_{bl}, h^t_{bl})\big)

over the non-padding tokens :math:`\mathcal{R}`. Sanh et al., "DistilBERT", 2019; the authors' code
(``distiller.py``) selects the last layer's states with the attention mask and applies
``nn.CosineEmbeddingLoss(reduction="mean")`` with target 1, which is this mean. Student and teacher
widths must be equal (the code asserts it). A zero vector has cosine 0 with anything (eps 1e-8, as
``F.cosine_similarity``).

Shapes:
    student, teacher ``[B, L, D]``; mask ``[B, >= L]`` (1 = token) -> scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from relkd.graphs.ops import compute_dtype
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register
from relkd.losses.token_kd import masked_mean, token_weights

__all__ = ["HiddenCosineLoss", "hidden_cosine"]
FUNCTIONAL = ("hidden_cosine",)


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos`` over the masked token rows (see the module docstring)."""
    if student.dim() != 3 or student.shape != teacher.shape:
        raise ValueError(
            f"hidden_cosine: expected student and teacher states of the same shape [B, L, D], got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    weights = token_weights(mask, student.shape[1], student.shape[0], "hidden_cosine")
    dtype = compute_dtype(student.dtype)
    cos = F.cosine_similarity(student.to(dtype), teacher.detach().to(dtype), dim=-1)
    return masked_mean(1.0 - cos, weights)


@register("hidden_cosine")
class HiddenCosineLoss(DistillLoss):
    """Module form of :func:`hidden_cosine` on the ``last_hidden`` states and the padding ``mask``.

    Config (DistilBERT's weight 1)::

        losses:
          hidden_cosine: {weight: 1.0}
    """

    taps = ("last_hidden", "mask")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hidden_cosine(student, teacher, mask)

    def distill(self, student, teacher, batch=None) -> torch.Tensor:
        hidden, mask = (student[k] for k in self.taps)
        return self(hidden, teacher[self.taps[0]], mask)
