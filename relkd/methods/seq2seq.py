r"""The sequence-to-sequence step: shrink a teacher into a student, optionally relabel with its summaries,
then the weighted terms (Shleifer & Rush, "Pre-trained Summarization Distillation", 2020).

Before the run's first update, ``init_from`` copies the named teacher into the first student
(:func:`relkd.models.seq2seq.copy_seq2seq`: embeddings, language-model head and the teacher layers
``encoder_layers`` / ``decoder_layers``, by default alternating ones with the first and the last kept,
the authors' ``make_student.py``). Then every step:

1. with ``pseudo_labels: <teacher>``, the summaries of the batch's documents become that teacher's
   generations (greedy, or beam search with ``generation: {num_beams: k}``): the student is trained on
   what the teacher writes (the paper's PL). Each training document is summarised once, the first time
   it is seen, and kept in the step's state (saved with the checkpoints, so a resumed run reads the same
   labels): the authors generate the pseudo-label data set once before training, which for a
   deterministic decoding is the same thing;
2. the batch gets ``mlm_labels``, the summary tokens with padding as -1 (what the ``mlm`` term, the
   authors' label loss :math:`\alpha_{mlm} \mathrm{CE}`, reads) and ``target``, the first summary token;
3. the stage's terms are weighted and summed (:class:`relkd.methods.weighted_sum.WeightedSum`): the
   label cross-entropy, the token-level KD of the teacher's decoder logits (``token_kd``, which reads the
   network's label ``mask``) and the layer-mapped hidden-state MSE (``layer_mse``).

A teacher is fine-tuned by the same step without ``init_from`` (the label cross-entropy alone).

**Shapes:** ``input`` ``[B, 2 L]`` (documents and labels, :func:`relkd.data.text.datasets.summarization`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from relkd.methods.base import StepContext, StepOutput, register_step
from relkd.methods.weighted_sum import WeightedSum

__all__ = ["Seq2Seq"]


def _unwrap(network: nn.Module) -> nn.Module:
    return network.module if hasattr(network, "module") and isinstance(network.module, nn.Module) else network


@register_step("seq2seq")
class Seq2Seq(WeightedSum):
    """See the module docstring.

    Args:
        init_from: the teacher copied into the first student before the first update, or None.
        encoder_layers, decoder_layers: the teacher layers copied (default: alternating, first and last).
        pseudo_labels: the teacher whose generations replace the summaries, or None (gold summaries).
        generation: options of the teacher's ``generate`` for the pseudo-labels (default its own).
    """

    ddp_wrap = False

    def __init__(
        self,
        init_from: str | None = None,
        encoder_layers: Sequence[int] | None = None,
        decoder_layers: Sequence[int] | None = None,
        pseudo_labels: str | None = None,
        generation: Mapping[str, Any] | None = None,
        students: Sequence[str] = (),
        teachers: Sequence[str] = (),
    ) -> None:
        super().__init__()
        for option, name in (("init_from", init_from), ("pseudo_labels", pseudo_labels)):
            if name is not None and name not in teachers:
                raise ValueError(
                    f"{option}: {name!r} is not a teacher of this method ({', '.join(teachers) or 'none'})"
                )
        self.init_from, self.pseudo_labels = init_from, pseudo_labels
        self.encoder_layers = None if encoder_layers is None else list(encoder_layers)
        self.decoder_layers = None if decoder_layers is None else list(decoder_layers)
        self.generation = dict(generation or {})
        self.cache: dict[int, Tensor] = {}

    def forward(self, ctx: StepContext) -> StepOutput:
        student = _unwrap(ctx.networks[ctx.students[0]])
        if self.init_from is not None and ctx.epoch == 0 and ctx.step == 0 and ctx.stage.start_epoch == 0:
            from relkd.models.seq2seq import copy_seq2seq

            teacher = _unwrap(ctx.networks[self.init_from])
            copy_seq2seq(student, teacher, self.encoder_layers, self.decoder_layers)
        batch = ctx.batch
        documents, labels = student.split(batch["input"])
        if self.pseudo_labels is not None:
            labels = self.teacher_labels(_unwrap(ctx.networks[self.pseudo_labels]), documents, batch["index"])
            labels = labels[:, : documents.shape[1]]
        pad = student.pad_token_id
        inputs = student.pack(documents, labels, pad).view_as(batch["input"])
        mlm_labels = torch.where(labels != pad, labels, torch.full_like(labels, -1))
        ctx.batch = {**batch, "input": inputs, "mlm_labels": mlm_labels, "target": mlm_labels[:, 0]}
        return super().forward(ctx)

    def teacher_labels(self, teacher: nn.Module, documents: Tensor, index: Tensor) -> Tensor:
        """The teacher's summaries of ``documents`` ``[B, L]`` in the labels' format, generated for the
        indices not yet in the cache and cached."""
        missing = [i for i, k in enumerate(index.tolist()) if k not in self.cache]
        if missing:
            rows = torch.tensor(missing, device=documents.device)
            was = teacher.training
            teacher.eval()
            generated = teacher.generate(documents[rows], **self.generation).cpu()
            teacher.train(was)
            for k, summary in zip(index[rows].tolist(), generated, strict=True):
                kept = (summary != teacher.pad_token_id).nonzero()
                self.cache[k] = summary[: int(kept.max()) + 1 if len(kept) else 1]
        out = [self.cache[k] for k in index.tolist()]
        length = max(x.shape[0] for x in out)
        labels = torch.full((len(out), length), teacher.pad_token_id, dtype=torch.long)
        for i, x in enumerate(out):
            labels[i, : x.shape[0]] = x
        return labels.to(documents.device)

    def get_extra_state(self) -> dict[str, Any]:
        return {"cache": dict(self.cache)}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        self.cache = dict(state["cache"])
