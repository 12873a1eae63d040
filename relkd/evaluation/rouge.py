r"""ROUGE of generated summaries, and the generation speed of the student against its teacher.

The measured network summarises every held-out document (:meth:`relkd.models.seq2seq.Seq2SeqTransformer.
generate`: greedy, or beam search with ``generation: {num_beams: k}``); its summaries and the reference
ones (the data set's labels) are decoded with the network's tokenizer and scored with the
``rouge-score`` package (Lin, "ROUGE", 2004; Google's reimplementation of the original Perl script):
ROUGE-1, ROUGE-2 and ROUGE-L F-measures with the Porter stemmer, averaged over documents, in percent.
Shleifer & Rush (``utils.py calculate_rouge``) use the same package and stemmer and report the
bootstrap aggregate's mid value, which equals the mean up to resampling noise; for one-line summaries
ROUGE-Lsum equals ROUGE-L.

Speed: the run's first teacher summarises the same documents in the same process, batch by batch in
turn with the student (so both see the same machine load); ``examples_per_s`` and ``tokens_per_s``
(generated tokens, end token included) are each network's, ``speedup`` the student's examples per
second over the teacher's, and ``teacher_rouge*`` the teacher's scores. ``length`` is the mean number
of generated tokens.

Config::

    evaluate:
      rouge: {}                                   # every test document, the networks' own generation
      rouge: {max_examples: 200, generation: {num_beams: 4}}
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from relkd.evaluation.base import EvalContext, register_evaluator

__all__ = ["ROUGE_TYPES", "Rouge", "rouge_scores"]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    types: Sequence[str] = ROUGE_TYPES,
    stemmer: bool = True,
) -> dict[str, float]:
    """Mean F-measure (percent) of each ROUGE type over aligned prediction/reference pairs.

    Raises:
        ValueError: unequal or empty lists.
        ImportError: ``rouge-score`` is missing (``pip install 'relkd[text]'``).
    """
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"rouge_scores: expected as many predictions as references (at least one), got "
            f"{len(predictions)} and {len(references)}"
        )
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ImportError("ROUGE needs the package rouge-score: pip install 'relkd[text]'") from None
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=stemmer)
    totals = dict.fromkeys(types, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for kind in types:
            totals[kind] += scores[kind].fmeasure
    return {kind: 100.0 * total / len(predictions) for kind, total in totals.items()}


def _generated_tokens(summaries: Tensor, pad: int) -> int:
    return int((summaries != pad).sum())


@register_evaluator("rouge")
class Rouge:
    """See the module docstring.

    Args:
        split: the loader of the documents (``test``).
        teacher: the teacher compared against (default the run's first; ``none``: the student alone).
        max_examples: summarise only the first documents (default all).
        generation: options of ``generate`` over each network's own (``num_beams``, ``max_new_tokens``).
        types: the ROUGE variants; stemmer: Porter stemming.
    """

    def __init__(
        self,
        split: str = "test",
        teacher: str | None = None,
        max_examples: int | None = None,
        generation: Mapping[str, Any] | None = None,
        types: Sequence[str] = ROUGE_TYPES,
        stemmer: bool = True,
    ) -> None:
        self.split, self.teacher, self.max_examples = split, teacher, max_examples
        self.generation = dict(generation or {})
        self.types, self.stemmer = tuple(types), stemmer

    def _documents(self, ctx: EvalContext) -> list[Tensor]:
        batches, left = [], self.max_examples
        for batch in ctx.loaders[self.split]:
            inputs = batch["input"].to(ctx.device)
            if left is not None:
                inputs, left = inputs[:left], left - inputs.shape[0]
            if inputs.shape[0]:
                batches.append(inputs)
            if left is not None and left <= 0:
                break
        if not batches:
            raise ValueError(f"rouge: the {self.split} split has no document")
        return batches

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        from relkd.hub import load_tokenizer

        model = ctx.model
        if not hasattr(model, "generate") or not hasattr(model, "split"):
            raise TypeError(
                f"rouge measures seq2seq networks (seq2seq_transformer), not {type(model).__name__}"
            )
        teacher_name = self.teacher or (ctx.teachers[0] if ctx.teachers else None)
        teacher = None if teacher_name in (None, "none") else ctx.networks[teacher_name]
        networks: dict[str, nn.Module] = {"": model, **({"teacher_": teacher} if teacher is not None else {})}
        summaries: dict[str, list[Tensor]] = {k: [] for k in networks}
        seconds = dict.fromkeys(networks, 0.0)
        references = []
        for inputs in self._documents(ctx):
            documents, labels = model.split(inputs)
            references.append(labels)
            for key, network in networks.items():
                with ctx.autocast():
                    start = time.perf_counter()
                    out = network.generate(documents, **self.generation)
                    seconds[key] += time.perf_counter() - start
                summaries[key].append(out.cpu())
        tokenizer = load_tokenizer(model.tokenizer)
        gold = [
            t for labels in references for t in tokenizer.batch_decode(labels.cpu(), skip_special_tokens=True)
        ]
        result: dict[str, float] = {}
        for key, network in networks.items():
            decoded = [t for s in summaries[key] for t in tokenizer.batch_decode(s, skip_special_tokens=True)]
            result.update(
                {key + k: v for k, v in rouge_scores(decoded, gold, self.types, self.stemmer).items()}
            )
            tokens = sum(_generated_tokens(s, network.pad_token_id) for s in summaries[key])
            result[key + "length"] = tokens / len(gold)
            result[key + "examples_per_s"] = len(gold) / max(seconds[key], 1e-9)
            result[key + "tokens_per_s"] = tokens / max(seconds[key], 1e-9)
        if teacher is not None:
            result["speedup"] = result["examples_per_s"] / result["teacher_examples_per_s"]
        return result
