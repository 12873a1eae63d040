r"""Translation retrieval and teacher-student agreement of sentence embeddings on held-out pairs.

For parallel test pairs :math:`(s_i, t_i)`, :math:`i = 1..N`, embedded by the measured network
:math:`\hat S`: source-to-target accuracy is the share of :math:`i` whose nearest translation by
cosine, :math:`\arg\max_j \cos(\hat S(s_i), \hat S(t_j))`, is :math:`t_i`; target-to-source the
reverse; ``accuracy`` their mean (sentence-transformers ``TranslationEvaluator``: the first maximum
wins a tie). Against the teacher :math:`M` (the run's first teacher) it also reports the mean cosine
:math:`\cos(\hat S(t_i), M(s_i))` (``teacher_cos_target``) and :math:`\cos(\hat S(s_i), M(s_i))`
(``teacher_cos_source``), and ``mse_target``, :math:`100 \cdot \mathrm{MSE}(\hat S(t_i), M(s_i))` over
pairs and dimensions (``MSEEvaluator``'s number). Reimers & Gurevych, EMNLP 2020, Sec. 4.
Accuracies are percentages.

Config::

    evaluate:
      translation_retrieval: {}       # test pairs: batch["input"] and batch["pair"], tap "embedding"
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relkd.evaluation.base import EvalContext, register_evaluator
from relkd.models import FeatureTaps, resolve_taps

__all__ = ["TranslationRetrieval", "embed_text", "translation_accuracy"]


def translation_accuracy(source: Tensor, target: Tensor) -> tuple[float, float]:
    """``(source -> target, target -> source)`` retrieval accuracy (percent) of aligned embeddings
    ``[N, D]`` by cosine similarity."""
    if source.shape != target.shape or source.dim() != 2 or source.shape[0] < 1:
        raise ValueError(
            f"translation_accuracy: expected aligned embeddings [N, D], got {tuple(source.shape)} and "
            f"{tuple(target.shape)}"
        )
    sim = F.normalize(source.double(), dim=1) @ F.normalize(target.double(), dim=1).T
    truth = torch.arange(source.shape[0], device=source.device)
    s2t = (sim.argmax(1) == truth).double().mean().item() * 100
    t2s = (sim.argmax(0) == truth).double().mean().item() * 100
    return s2t, t2s


@torch.no_grad()
def embed_text(model: nn.Module, batches: Iterable[Tensor], tap: str = "embedding", autocast=None) -> Tensor:
    """``[N, D]`` float32 features at ``tap`` of ``model`` (eval mode, restored after) over id batches."""
    was = model.training
    model.eval()
    out = []
    try:
        with FeatureTaps(model, resolve_taps(model, [tap])) as taps:
            for ids in batches:
                if autocast is None:
                    model(ids)
                else:
                    with autocast():
                        model(ids)
                out.append(taps[tap].float().flatten(1))
    finally:
        model.train(was)
    return torch.cat(out)


@register_evaluator("translation_retrieval")
class TranslationRetrieval:
    """See the module docstring.

    Args:
        split: the loader of the pairs (``test``).
        pair: the batch key of the translations.
        tap: the embedding tap.
        teacher: the teacher compared against (default the run's first; none: no agreement numbers).
    """

    def __init__(
        self, split: str = "test", pair: str = "pair", tap: str = "embedding", teacher: str | None = None
    ):
        self.split, self.pair, self.tap, self.teacher = split, pair, tap, teacher

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        batches = list(ctx.loaders[self.split])
        if not batches or self.pair not in batches[0]:
            raise KeyError(f"translation_retrieval reads batch[{self.pair!r}] of the {self.split} pairs")
        sources = [b["input"].to(ctx.device) for b in batches]
        targets = [b[self.pair].to(ctx.device) for b in batches]
        s = embed_text(ctx.model, sources, self.tap, ctx.autocast)
        t = embed_text(ctx.model, targets, self.tap, ctx.autocast)
        s2t, t2s = translation_accuracy(s, t)
        out = {"src2tgt": s2t, "tgt2src": t2s, "accuracy": (s2t + t2s) / 2}
        teacher = self.teacher or (ctx.teachers[0] if ctx.teachers else None)
        if teacher is not None:
            m = embed_text(ctx.networks[teacher], sources, self.tap, ctx.autocast)
            out["teacher_cos_source"] = F.cosine_similarity(s, m, dim=1).mean().item()
            out["teacher_cos_target"] = F.cosine_similarity(t, m, dim=1).mean().item()
            out["mse_target"] = 100 * (t - m).pow(2).mean().item()
        return out
