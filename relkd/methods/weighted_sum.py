r"""The default step: cross-entropy plus a weighted sum of loss terms, over one batch.

.. math::
    L = w_{ce} \sum_{s \in \text{students}} \mathrm{CE}(z_s, y) + \sum_i w_i \, \ell_i

The stage's teachers run first (without gradients), then its students, all on the same (already
transformed) batch; each term reads the tapped features of its two networks. The cross-entropy reads
labelled rows only (target ``-1`` marks transfer images) and is averaged over them; a batch without a
labelled row contributes 0. A stage term with ``call`` and ``network`` calls that loss method on that
network's features alone (e.g. attention heads pre-trained on the teacher).

Every method of the form "CE + weighted terms" runs this step: a new such method is a YAML file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor

from relkd.methods.base import StageInfo, Step, StepContext, StepOutput, register_step
from relkd.methods.terms import LossTerm

__all__ = ["WeightedSum", "cross_entropy"]


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over the labelled samples (``target >= 0``); 0 when there are none.

    **Shapes:** logits ``[B, C]``, target ``[B]`` -> scalar.
    """
    total = F.cross_entropy(logits.float(), target, ignore_index=-1, reduction="sum")
    return total / (target >= 0).sum().clamp(min=1)


@register_step("weighted_sum")
class WeightedSum(Step):
    """``ce_weight * CE + sum_i weight_i * term_i`` (see the module docstring).

    Its losses are the weighted parts (``ce`` and each term by name), its metrics the unweighted
    values; the logits are the first student's.
    """

    ddp_wrap = True

    def networks_needed(
        self,
        stage: StageInfo,
        terms: Mapping[str, LossTerm],
        students: Sequence[str],
        teachers: Sequence[str],
    ) -> tuple[list[str], list[str]]:
        """The networks the stage's terms read, and every student when it has a cross-entropy."""
        needed: set[str] = set(students) if stage.ce_weight else set()
        for use in stage.uses:
            spec = terms[use.term].spec
            if use.network is not None:
                needed.add(use.network)
            else:
                needed |= {spec.student, spec.teacher} - {None}
        return [t for t in teachers if t in needed], [s for s in students if s in needed]

    def forward(self, ctx: StepContext) -> StepOutput:
        stage = ctx.stage
        teachers, students = self.networks_needed(stage, ctx.terms, ctx.students, ctx.teachers)
        features = {name: ctx.run(name) for name in [*teachers, *students]}
        values: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        if stage.ce_weight:
            target = ctx.batch["target"]
            values["ce"] = sum(cross_entropy(features[s]["logits"], target) for s in students)
            weights["ce"] = stage.ce_weight
        for use in stage.uses:
            spec = ctx.terms[use.term].spec
            if use.network is None:
                teacher = None if spec.teacher is None else features[spec.teacher]
                values[use.term] = ctx.term(use.term, features[spec.student], teacher)
            else:
                method = use.call or "distill"
                values[use.term] = ctx.call(use.term, method, use.network, features[use.network])
            weights[use.term] = use.weight
        losses = {k: weights[k] * values[k].float() for k in values}
        metrics = dict(values)
        for use in stage.uses:
            parts = ctx.terms[use.term].module.last_parts
            metrics.update({f"{use.term}.{k}": v for k, v in (parts or {}).items()})
        logits = features[students[0]]["logits"] if students else None
        return StepOutput(logits, losses, metrics=metrics)
