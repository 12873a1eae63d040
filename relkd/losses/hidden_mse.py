r"""Layer-mapped MSE between L2-normalised hidden states (DynamicKD's representation loss).

.. math::
    \mathrm{Rep}_b = \sum_{i=0}^{L_s} \frac{1}{|\mathcal{T}_b| D} \sum_{l \in \mathcal{T}_b}
    \big\| n(h^{s,i}_{bl}) - n(h^{t, m(i)}_{bl}) \big\|^2, \qquad n(h) = h / \|h\|_2,

with the layer map :math:`m(i) = i \lfloor L_t / L_s \rfloor` (hidden state 0 is the embedding layer's
output) and :math:`\mathcal{T}_b` the tokens of sentence :math:`b`. The loss is
:math:`\frac{1}{B} \sum_b \mathrm{Rep}_b`; :func:`normalized_hidden_mse` with ``reduction="none"``
gives the per-sentence values that DynamicKD's objective adjustment weights.

Li, Lin, Ren, Su & Sun, "Dynamic Knowledge Distillation for Pre-trained Language Models", EMNLP 2021.
The authors' code (lancopku/DynamicKD ``models/student.py``
``DynamicObjectiveKDForSequenceClassification``) maps the teacher's ``hidden_states[i * (L_t // L_s)]``
to the student's ``hidden_states[i]``, normalises over the hidden dimension, and averages the squared
difference over the hidden dimension and **every position, padding included**, then sums over the
layers. Here padding is left out (``include_padding: true`` restores the code's mean over all ``L``
positions): with it a sentence's value depends on how far its batch happens to be padded. (The code's
``strategy: none`` branch normalises over the sequence dimension instead, a slip not reproduced.)
``layer_map`` gives the teacher state of each student state explicitly.

It reads the ``hidden_states`` tap of :class:`relkd.models.text.TextTransformer` (every layer's
states stacked) and the padding ``mask``.

Shapes:
    student ``[B, L_s + 1, L, D]``, teacher ``[B, L_t + 1, L, D]`` (equal ``L`` and ``D``); mask
    ``[B, >= L]`` -> scalar, or ``[B]`` with ``reduction="none"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from relkd.graphs.ops import compute_dtype
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register
from relkd.losses.token_kd import stacked_states, token_weights

__all__ = ["NormalizedHiddenMSELoss", "layer_map", "normalized_hidden_mse"]
FUNCTIONAL = ("normalized_hidden_mse",)
REDUCTIONS = ("mean", "none")


def layer_map(student_states: int, teacher_states: int) -> list[int]:
    """The authors' map from ``L_s + 1`` student states to ``L_t + 1`` teacher states:
    ``i * (L_t // L_s)``."""
    ls, lt = student_states - 1, teacher_states - 1
    if ls < 1 or lt < ls:
        raise ValueError(f"no layer map from {ls} student layers to {lt} teacher layers")
    return [i * (lt // ls) for i in range(ls + 1)]


def normalized_hidden_mse(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    mapping: Sequence[int] | None = None,
    include_padding: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """:math:`\\mathrm{Rep}_b` summed over the mapped layers; the mean over sentences, or ``[B]``."""
    b, n_s, length, d = stacked_states("normalized_hidden_mse", student, teacher)
    if reduction not in REDUCTIONS:
        raise ValueError(f"normalized_hidden_mse: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    mapping = list(layer_map(n_s, teacher.shape[1]) if mapping is None else mapping)
    if len(mapping) != n_s or not all(0 <= m < teacher.shape[1] for m in mapping):
        raise ValueError(
            f"normalized_hidden_mse: layer map {mapping} for {n_s} and {teacher.shape[1]} states"
        )
    mask = token_weights(mask, length, b, "normalized_hidden_mse")
    dtype = compute_dtype(student.dtype)
    keep = torch.ones(b, length, device=student.device) if include_padding else mask
    weights = keep.to(dtype)
    t = teacher.detach()[:, mapping]
    diff = (F.normalize(student.to(dtype), dim=-1) - F.normalize(t.to(dtype), dim=-1)).pow(2).mean(-1)
    per_layer = (diff * weights[:, None]).sum(-1) / weights.sum(-1, keepdim=True).clamp(min=1)
    total = per_layer.sum(1)
    return total.mean() if reduction == "mean" else total


@register("normalized_hidden_mse")
class NormalizedHiddenMSELoss(DistillLoss):
    """Module form of :func:`normalized_hidden_mse` on the ``hidden_states`` and ``mask`` taps.

    Config::

        losses:
          rep: {loss: normalized_hidden_mse, weight: 1.0}
    """

    taps = ("hidden_states", "mask")

    def __init__(self, layer_map: Sequence[int] | None = None, include_padding: bool = False) -> None:
        super().__init__()
        self.layer_map = None if layer_map is None else list(layer_map)
        self.include_padding = include_padding

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        return normalized_hidden_mse(student, teacher, mask, self.layer_map, self.include_padding, reduction)

    def per_sample(self, student: dict, teacher: dict) -> torch.Tensor:
        """``[B]`` values from the two networks' features (by this loss's tap names)."""
        states, mask = self.taps
        return self(student[states], teacher[states], student[mask], reduction="none")

    def distill(self, student, teacher, batch=None) -> torch.Tensor:
        states, mask = self.taps
        return self(student[states], teacher[states], student[mask])

    def extra_repr(self) -> str:
        return f"layer_map={self.layer_map}, include_padding={self.include_padding}"
