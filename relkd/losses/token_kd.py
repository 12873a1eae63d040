r"""Soft-target distillation over token rows, padding ignored (DistilBERT's :math:`L_{ce}`).

.. math::
    \mathcal{L} = \frac{T^2}{|\mathcal{R}|} \sum_{(b, l) \in \mathcal{R}}
    \mathrm{KL}\big(\mathrm{softmax}(t_{bl} / T) \,\|\, \mathrm{softmax}(s_{bl} / T)\big)

over the token rows :math:`\mathcal{R}`: every non-padding token (``positions: tokens``) or only the
tokens chosen for masked-LM prediction (``positions: masked``, rows whose ``mlm_labels`` are >= 0).

Sanh, Debut, Chaumond & Wolf, "DistilBERT, a distilled version of BERT", 2019. The authors' code
(huggingface/transformers examples/research_projects/distillation, ``distiller.py`` ``Distiller.step``)
selects the rows with the attention mask (``restrict_ce_to_mask`` off by default), then applies
``nn.KLDivLoss(reduction="batchmean")`` to the ``[rows, V]`` matrix, i.e. divides by the number of
rows, times :math:`T^2`; ``train.py``'s ``--temperature`` defaults to 2. Those are the defaults here.
Padding rows contribute nothing, so a batch padded further gives the same loss.

Shapes:
    student_logits, teacher_logits ``[B, L, V]``; mask ``[B, L]`` (1 = token) -> scalar. The mask may
    be longer than ``L`` (a batch padded to a longer length); its columns beyond ``L`` must be 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from relkd._debug import check_finite, is_debug
from relkd.graphs.ops import compute_dtype
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register

__all__ = ["TokenKDLoss", "masked_mean", "stacked_states", "token_kd", "token_weights"]
FUNCTIONAL = ("token_kd",)
POSITIONS = ("tokens", "masked")


def token_weights(mask: torch.Tensor, length: int, batch: int, name: str) -> torch.Tensor:
    """``mask [B, >= L]`` as 0/1 weights ``[B, L]`` (shapes checked here; the check that no position beyond
    ``L`` is marked reads values, so it runs in debug mode only: :func:`relkd.set_debug`)."""
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < length:
        raise ValueError(
            f"{name}: expected a mask [B, >= L] for tensors [B={batch}, L={length}, ...], got mask "
            f"{tuple(mask.shape)}"
        )
    if is_debug() and bool(mask[:, length:].any()):
        raise ValueError(f"{name}: the mask marks positions beyond the tensors' length {length}")
    return (mask[:, :length] != 0).float()


def stacked_states(name: str, student: torch.Tensor, teacher: torch.Tensor) -> tuple[int, int, int, int]:
    """``(B, student layers, L, D)`` of stacked hidden states ``[B, layers, L, D]`` on both sides (the
    layer counts may differ); raises ``ValueError`` naming ``name`` otherwise."""
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"{name}: expected stacked states [B, layers, L, D], got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    b, n_s, length, d = student.shape
    if teacher.shape[0] != b or teacher.shape[2:] != (length, d):
        raise ValueError(
            f"{name}: student states {tuple(student.shape)} and teacher states {tuple(teacher.shape)} "
            "differ in batch, length or width"
        )
    return b, n_s, length, d


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The mean of ``values [B, L]`` over the positions with weight 1; 0 (with a gradient) when none is.
    A weighted sum, not boolean indexing: shapes stay static, so it compiles without a graph break."""
    return (values * weights.to(values.dtype)).sum() / weights.sum().clamp(min=1).to(values.dtype)


def token_kd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, T: float = 2.0
) -> torch.Tensor:
    """Token-row KD (see the module docstring); 0 (with a gradient) when no row is selected."""
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"token_kd: expected student and teacher logits of the same shape [B, L, V], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if T <= 0:
        raise ValueError(f"token_kd: temperature T must be positive, got {T}")
    b, length, _ = student_logits.shape
    weights = token_weights(mask, length, b, "token_kd")
    dtype = compute_dtype(student_logits.dtype)
    s = student_logits.to(dtype)
    t = teacher_logits.detach().to(dtype)
    check_finite("token_kd", "student input", s)
    log_p_s = F.log_softmax(s / T, dim=-1)
    log_p_t = F.log_softmax(t / T, dim=-1)
    per_token = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return masked_mean(per_token, weights) * T * T


@register("token_kd")
class TokenKDLoss(DistillLoss):
    """Module form of :func:`token_kd`; reads each network's ``token_logits`` and padding ``mask``
    (``positions: masked`` reads the batch's ``mlm_labels`` instead of the mask).

    Config (DistilBERT's weight 5, T = 2)::

        losses:
          token_kd: {weight: 5.0, T: 2.0}
    """

    taps = ("token_logits", "mask")
    batch_keys = ("mlm_labels",)

    def __init__(self, T: float = 2.0, positions: str = "tokens") -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"token_kd: positions must be one of {POSITIONS}, got {positions!r}")
        self.T, self.positions = T, positions

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return token_kd(student_logits, teacher_logits, mask, T=self.T)

    def distill(
        self, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        logits_s, mask = (student[k] for k in self.taps)
        if self.positions == "masked":
            if batch is None or "mlm_labels" not in batch:
                raise KeyError(
                    "token_kd with positions: masked needs the batch's mlm_labels (a masked_lm step)"
                )
            mask = batch["mlm_labels"] >= 0
        return self(logits_s, teacher[self.taps[0]], mask)

    def extra_repr(self) -> str:
        return f"T={self.T}, positions={self.positions!r}"
