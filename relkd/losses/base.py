"""The contract between a distillation loss and any trainer.

A loss is a plain ``nn.Module``: ``loss(student, teacher, ...)`` on tensors works in any training loop.
For the experiment engine it also declares which feature taps it reads (``taps``) and how to call
itself from the tapped features (``distill``), so the engine never needs to know the method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["DistillLoss"]


class DistillLoss(nn.Module):
    """Base class of every registered loss.

    Attributes:
        taps: names of the features the loss reads from each network, in the order ``distill`` passes
            them. ``"logits"`` is the network's output; other names are feature taps (``"penultimate"``,
            ``"stage1"``, ...) that the engine resolves with forward hooks. A config may override them.
        batch_keys: fields of the batch the loss needs besides the features (e.g. ``"index"``).
        accepts_graphs: the loss reads its inputs only through ``RelationGraph`` relations, so a trainer
            may pass one graph per network and tap, shared by every such loss of the step: each side's
            Gram matrix is then computed once however many relational losses read it.
        needs_teacher: the loss compares a student with a teacher; a loss that reads the student
            alone (a label-derived target, a classifier head) sets it to False and ``distill``
            receives ``teacher=None``.
        last_parts: a loss made of several parts may store them here (``{name: scalar tensor}``)
            when it is called; the engine logs each as ``raw/<term>.<name>``.
    """

    taps: ClassVar[tuple[str, ...]] = ("penultimate",)
    batch_keys: ClassVar[tuple[str, ...]] = ()
    accepts_graphs: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = True
    last_parts: dict[str, torch.Tensor] | None = None

    def on_step(self, context: Any) -> None:
        """Called by the engine before the loss is used in a training step, with the step's
        :class:`relkd.methods.StepContext` (epoch, step, stage ...): the place for epoch-aware
        weights or warm-ups. The default does nothing; in one's own loop it is never called."""

    def distill(
        self,
        student: Mapping[str, Any],
        teacher: Mapping[str, Any],
        batch: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """Call the loss on the tapped features: one tap -> ``self(s, t)``; several -> lists.
        A loss without a teacher (``needs_teacher = False``) is called on the student's alone."""
        taps = tuple(self.taps)
        if teacher is None:
            if len(taps) == 1:
                return self(student[taps[0]])
            return self([student[k] for k in taps])
        if len(taps) == 1:
            return self(student[taps[0]], teacher[taps[0]])
        return self([student[k] for k in taps], [teacher[k] for k in taps])
