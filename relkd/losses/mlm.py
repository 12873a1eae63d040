r"""Masked-language-model cross-entropy on the masked tokens (DistilBERT's :math:`L_{mlm}`).

.. math::
    \mathcal{L} = -\frac{1}{|\mathcal{M}|} \sum_{(b, l) \in \mathcal{M}}
    \log \mathrm{softmax}(s_{bl})_{y_{bl}}

over the positions :math:`\mathcal{M}` chosen for prediction (labels :math:`y \ge 0`; ``-1`` and the
``-100`` of ``transformers`` mark the others). Devlin et al., "BERT", NAACL 2019; DistilBERT's code
(``distiller.py``) uses ``nn.CrossEntropyLoss(ignore_index=-100)``, the same mean. The labels come from
a masked-LM step (:mod:`relkd.methods.masked_lm`), in the batch's ``mlm_labels``. It reads the student
alone.

Shapes:
    token_logits ``[B, L, V]``; labels ``[B, >= L]`` int64 -> scalar (0 with a gradient when nothing is
    masked). Labels beyond ``L`` (a batch padded further) must all be ignored ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from relkd._debug import is_debug
from relkd.graphs.ops import compute_dtype
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register
from relkd.losses.token_kd import masked_mean

__all__ = ["MLMLoss", "masked_lm"]
FUNCTIONAL = ("masked_lm",)


def masked_lm(token_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions with ``labels >= 0``."""
    if token_logits.dim() != 3 or labels.dim() != 2 or labels.shape[0] != token_logits.shape[0]:
        raise ValueError(
            f"masked_lm: expected token logits [B, L, V] and labels [B, >= L], got "
            f"{tuple(token_logits.shape)} and {tuple(labels.shape)}"
        )
    length = token_logits.shape[1]
    if labels.shape[1] < length:
        raise ValueError(f"masked_lm: labels of length {labels.shape[1]} for logits of length {length}")
    if is_debug():  # value checks sync the device: debug mode only (relkd.set_debug)
        if (labels[:, length:] >= 0).any():
            raise ValueError(f"masked_lm: labels mark positions beyond the logits' length {length}")
        if labels.max() >= token_logits.shape[-1]:
            raise ValueError(f"masked_lm: a label is >= the vocabulary size {token_logits.shape[-1]}")
    labels = labels[:, :length]
    chosen = labels >= 0
    logits = token_logits.to(compute_dtype(token_logits.dtype))
    # every position is scored (an ignored one as class 0) and weighted 0 unless chosen: static shapes
    per_token = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return masked_mean(per_token, chosen)


@register("mlm")
class MLMLoss(DistillLoss):
    """Module form of :func:`masked_lm`: the student's ``token_logits`` against ``batch["mlm_labels"]``.

    Config (DistilBERT's weight 2)::

        losses:
          mlm: {weight: 2.0}
    """

    taps = ("token_logits",)
    batch_keys = ("mlm_labels",)
    needs_teacher = False

    def forward(self, token_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return masked_lm(token_logits, labels)

    def distill(
        self,
        student: Mapping[str, Any],
        teacher: Mapping[str, Any] | None,
        batch: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        if batch is None or "mlm_labels" not in batch:
            raise KeyError("mlm reads the batch's mlm_labels: run it in a masked_lm step")
        return self(student[self.taps[0]], batch["mlm_labels"])
