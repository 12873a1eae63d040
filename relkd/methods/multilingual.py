r"""Making a monolingual sentence encoder multilingual by distillation (Reimers & Gurevych, EMNLP 2020).

.. math::
    L = \frac{1}{|B|} \sum_{i \in B} \Big[ w_s \,\mathrm{MSE}\big(\hat S(s_i), M(s_i)\big)
        + w_t \,\mathrm{MSE}\big(\hat S(t_i), M(s_i)\big) \Big]

for parallel pairs :math:`(s_i, t_i)`: the frozen teacher :math:`M` embeds the source sentence only
(``input``), the student :math:`\hat S` embeds both the source and its translation (``pair``), and both
student embeddings are pulled to the teacher's source embedding. The MSE is the mean over the batch
and the dimensions (sentence-transformers ``losses/MSELoss.py``; ``ParallelSentencesDataset`` feeds
each sentence of a pair as its own example with the teacher's source embedding as label, so the two
parts have equal weight, ``w_s = w_t = 1``). The teacher's embeddings are computed once per training
sentence and cached (the ``embedding_mse`` term with ``cache: true``), as that dataset does.

The term (default ``embedding_mse``) names the tap both embeddings come from (``embedding``: the
mean-pooled sentence embedding). Losses: ``mse_source`` and ``mse_target``.

**Shapes:** ``input`` and ``pair`` ``[B, L]`` token ids; embeddings ``[B, D]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from relkd.losses.embedding_mse import embedding_mse
from relkd.methods.base import Step, StepContext, StepOutput, register_step

__all__ = ["Multilingual"]


@register_step("multilingual")
class Multilingual(Step):
    """See the module docstring.

    Args:
        term: the method's ``embedding_mse`` term (its taps and its cache).
        pair: the batch key of the translations.
        source_weight, target_weight: :math:`w_s`, :math:`w_t`.
    """

    def __init__(
        self,
        term: str = "embedding_mse",
        pair: str = "pair",
        source_weight: float = 1.0,
        target_weight: float = 1.0,
        terms: dict | None = None,
        students: Sequence[str] = (),
        teachers: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if terms is not None and term not in terms:
            raise KeyError(f"multilingual: no term {term!r} among the losses ({', '.join(terms)})")
        if len(students) != 1 or len(teachers) != 1:
            raise ValueError(
                f"multilingual needs one student and one teacher, got {list(students)} and {list(teachers)}"
            )
        self.term, self.pair = term, pair
        self.source_weight, self.target_weight = float(source_weight), float(target_weight)

    def teacher_embeddings(self, ctx: StepContext) -> torch.Tensor:
        """The teacher's embeddings of the batch's source sentences, from the cache where it has them."""
        term = ctx.terms[self.term]
        teacher, tap = ctx.teachers[0], term.spec.teacher_taps[0]
        ids, index = ctx.batch["input"], ctx.batch["index"]
        if not getattr(term.module, "cache", False):
            return ctx.run(teacher, ids)[tap]
        cached, filled = term.module.lookup(index)
        missing = ~filled
        if bool(missing.any()):
            fresh = ctx.run(teacher, ids[missing])[tap].detach()
            term.module.store(index[missing], fresh)
            cached = cached.clone()
            cached[missing] = fresh.to(cached.dtype)
        return cached

    def forward(self, ctx: StepContext) -> StepOutput:
        if self.pair not in ctx.batch:
            raise KeyError(
                f"multilingual reads translations from batch[{self.pair!r}] (a parallel_text data set)"
            )
        term = ctx.terms[self.term]
        tap = term.spec.student_taps[0]
        target = self.teacher_embeddings(ctx)
        student = ctx.students[0]
        source = ctx.run(student, ctx.batch["input"])[tap]
        translated = ctx.run(student, ctx.batch[self.pair])[tap]
        mse_source, mse_target = embedding_mse(source, target), embedding_mse(translated, target)
        losses = {
            "mse_source": self.source_weight * mse_source,
            "mse_target": self.target_weight * mse_target,
        }
        return StepOutput(
            None, losses, {"mse_source": mse_source.detach(), "mse_target": mse_target.detach()}
        )
