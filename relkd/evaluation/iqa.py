r"""Image-quality assessment: rank (SRCC) and linear (PLCC) correlation of predicted and true quality.

.. math::
    \mathrm{PLCC} = \frac{\sum_i (\hat q_i - \bar{\hat q})(q_i - \bar q)}
        {\sqrt{\sum_i (\hat q_i - \bar{\hat q})^2 \sum_i (q_i - \bar q)^2}}, \qquad
    \mathrm{SRCC} = \mathrm{PLCC}\big(\mathrm{rank}(\hat q), \mathrm{rank}(q)\big),

ranks averaged over ties (``scipy.stats.spearmanr`` and ``pearsonr``). The evaluator ``iqa`` runs the
deployed network on the test split (its first output column is the predicted score) and reports both
over every test image (``srcc``, ``plcc``) and, as the CKDN authors' validation does (github.com/
researchmm/CKDN ``train.py`` ``validate``: the predictions of each of PIPAL's 25 validation references
correlated separately, then averaged), the mean over references of the per-reference correlations
(``srcc_ref``, ``plcc_ref``; a reference whose scores are all equal is left out). No logistic mapping is
fitted before the PLCC, as in the authors' code. Correlations are numbers in [-1, 1] (the authors print
them times 100).

Batches carry the true score under ``score`` and the reference's id under ``group``
(:mod:`relkd.data.iqa`). Under data parallelism the processes' predictions are gathered before the
correlations are taken.

**Shapes:** predictions and targets ``[N]``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from scipy import stats
from torch import Tensor

from relkd import distributed as D
from relkd.data.iqa import VIEWS, swap_reference
from relkd.evaluation.base import EvalContext, register_evaluator

__all__ = ["IQACorrelation", "plcc", "predict_scores", "srcc"]


def _pair(pred: Tensor, target: Tensor) -> tuple[Any, Any]:
    pred, target = torch.as_tensor(pred).flatten(), torch.as_tensor(target).flatten()
    if pred.shape != target.shape or pred.numel() < 2:
        raise ValueError(
            f"expected as many predictions as targets, at least 2, got {pred.numel()} and {target.numel()}"
        )
    return pred.double().cpu().numpy(), target.double().cpu().numpy()


def srcc(pred: Tensor, target: Tensor) -> float:
    """Spearman's rank correlation of ``pred`` and ``target`` (``[N]``, N >= 2); NaN if either is constant."""
    a, b = _pair(pred, target)
    if a.min() == a.max() or b.min() == b.max():
        return math.nan
    return float(stats.spearmanr(a, b)[0])


def plcc(pred: Tensor, target: Tensor) -> float:
    """Pearson's correlation of ``pred`` and ``target`` (``[N]``, N >= 2); NaN if either is constant."""
    a, b = _pair(pred, target)
    if a.min() == a.max() or b.min() == b.max():
        return math.nan
    return float(stats.pearsonr(a, b)[0])


@torch.no_grad()
def predict_scores(
    model: torch.nn.Module,
    loader: Any,
    score_key: str = "score",
    group_key: str = "group",
    reference_key: str | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(predicted [N], true [N], groups [N] or None)`` over ``loader``: the model's first output column
    in eval mode (its mode restored after). With ``reference_key`` the model sees the input with its
    last channels replaced by that key's images (:func:`relkd.data.iqa.swap_reference`)."""
    was_training = model.training
    model.eval()
    preds, targets, groups = [], [], []
    try:
        for batch in loader:
            if score_key not in batch:
                raise KeyError(
                    f"the batches carry no {score_key!r} (they have {', '.join(batch)}): not an IQA data set"
                )
            x = (
                batch["input"]
                if reference_key is None
                else swap_reference(batch["input"], batch[reference_key])
            )
            with autocast():
                out = model(x)
            preds.append(out.float().reshape(out.shape[0], -1)[:, 0].cpu())
            targets.append(batch[score_key].float().cpu())
            if group_key in batch:
                groups.append(batch[group_key].cpu())
    finally:
        model.train(was_training)
    if not preds:
        raise ValueError("the IQA loader yielded no batch")
    out = (torch.cat(preds), torch.cat(targets), torch.cat(groups) if groups else None)
    if D.is_distributed():  # each process scored its shard of the test set: correlate all of them
        shards: list[Any] = [None] * D.world_size()
        dist.all_gather_object(shards, out)
        out = tuple(None if shards[0][i] is None else torch.cat([s[i] for s in shards]) for i in range(3))
    return out


@register_evaluator("iqa")
class IQACorrelation:
    """The evaluator ``iqa``: columns ``iqa/srcc``, ``iqa/plcc`` (every test image) and ``iqa/srcc_ref``,
    ``iqa/plcc_ref`` (mean over references, when the batches carry ``group``)::

        evaluate:
          iqa: {}

    Args:
        split: the evaluation split (``test``).
        view: ``degraded`` (the batches' inputs: the DR-IQA setting) or ``reference`` (the reference
            channels replaced by ``batch["reference"]``: a full-reference model's upper bound).
        score_key, group_key: the batch keys of the true score and of the reference id.
    """

    def __init__(
        self, split: str = "test", view: str = "degraded", score_key: str = "score", group_key: str = "group"
    ) -> None:
        if view not in VIEWS:
            raise ValueError(f"iqa: view must be one of {', '.join(VIEWS)}, got {view!r}")
        self.split, self.view, self.score_key, self.group_key = split, view, score_key, group_key

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        if self.split not in ctx.loaders:
            raise KeyError(f"iqa: no evaluation split {self.split!r}; the run has {', '.join(ctx.loaders)}")
        reference = "reference" if self.view == "reference" else None
        pred, true, groups = predict_scores(
            ctx.model, ctx.loaders[self.split], self.score_key, self.group_key, reference, ctx.autocast
        )
        out = {"srcc": srcc(pred, true), "plcc": plcc(pred, true)}
        if groups is not None:
            per = [
                (srcc(pred[groups == g], true[groups == g]), plcc(pred[groups == g], true[groups == g]))
                for g in groups.unique()
                if int((groups == g).sum()) >= 2
            ]
            per = [p for p in per if not (math.isnan(p[0]) or math.isnan(p[1]))]
            if per:
                out["srcc_ref"] = sum(p[0] for p in per) / len(per)
                out["plcc_ref"] = sum(p[1] for p in per) / len(per)
        return out
