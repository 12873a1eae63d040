r"""Cross-model retrieval: queries embedded by one network, a gallery embedded by another.

Two embedding models are *compatible* when a query embedded by one finds the right items in a gallery
embedded by the other (Shen et al., "Towards Backward-Compatible Representation Learning", CVPR 2020;
Meng et al., "Learning Compatible Embeddings", ICCV 2021). Backward compatibility, which lets a
system deploy a new model without re-embedding its gallery, is measured with **queries from the new
model against the gallery of the old model**; swapping the arguments measures the other direction
(the LCE authors' released test script, ``scripts/test.sh`` with ``eval/eval.py``, feeds the old
model's Market-1501 query features against the new model's gallery features).

On a classification dataset, which has one test split, relkd's protocol is: **queries** are the test
images embedded by the new model, the **gallery** the training images (without augmentation)
embedded by the old model, relevance is equality of labels. To use the test split on both sides,
pass the images' indices as ``query_ids`` / ``gallery_ids``: a gallery item with the query's own id
is ignored, as the authors' evaluation ignores gallery images of the query's identity taken by the
query's camera.

For each query, the gallery is ranked by similarity (cosine, or negative Euclidean distance); ties
keep gallery order. With relevant items at ranks :math:`r_1 < \dots < r_n` (1-based):

.. math::
    \text{top-}k = [r_1 \le k], \qquad \mathrm{AP} = \frac1n \sum_{j=1}^{n} \frac{j}{r_j},

averaged over the queries that have a relevant item (the others are left out, as in the authors'
``evaluate``), in percent. The similarities are computed for a block of queries at a time, so
memory grows with ``block x gallery``, never ``queries x gallery``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relkd.evaluation.base import EvalContext, register_evaluator
from relkd.graphs.ops import compute_dtype
from relkd.models import FeatureTaps, resolve_taps

__all__ = ["CrossRetrieval", "cross_model_retrieval", "embed"]

METRICS = ("cosine", "euclidean")
# Similarities scored at once when the block size is automatic: about 120 MB of working memory.
_BLOCK_ELEMENTS = 1 << 22


@torch.no_grad()
def embed(
    model: nn.Module,
    loader: Iterable[dict[str, Tensor]],
    tap: str = "penultimate",
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> tuple[Tensor, Tensor]:
    """L2-normalised embeddings of ``model`` at ``tap`` over ``loader``, and the labels.

    The model runs in eval mode (its mode is restored after) on the device of its parameters, one
    batch at a time; the tap's hook is removed when done.

    Args:
        model: the network.
        loader: batches ``{"input": [B, ...], "target": [B], ...}``.
        tap: a tap name (``"penultimate"``, ``"stage3"`` ...), a module path (``"fc:input"``) or
            ``"logits"`` (the output).
        autocast: context for the forward (e.g. the run's bf16 autocast).

    Returns:
        ``(embeddings [N, D], labels [N])`` on the model's device; float32 (float64 stays float64).

    Raises:
        KeyError: no such tap; ValueError: the loader yields nothing.
    """
    device = next(iter(model.parameters()), torch.empty(0)).device
    taps = None if tap == "logits" else FeatureTaps(model, resolve_taps(model, [tap]))
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        for batch in loader:
            with autocast():
                out = model(batch["input"].to(device))
            x = (out if taps is None else taps[tap]).flatten(1)
            features.append(F.normalize(x.to(compute_dtype(x.dtype)), dim=1))
            labels.append(batch["target"].to(device))
    finally:
        if taps is not None:
            taps.remove()
        model.train(was_training)
    if not features:
        raise ValueError("embed: the loader yielded no batch")
    return torch.cat(features), torch.cat(labels)


def _check(
    query: Tensor,
    query_labels: Tensor,
    gallery: Tensor,
    gallery_labels: Tensor,
    ks: Sequence[int],
    metric: str,
    ids: tuple[Tensor | None, Tensor | None],
) -> None:
    if metric not in METRICS:
        raise ValueError(f"cross_model_retrieval: metric must be one of {METRICS}, got {metric!r}")
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"cross_model_retrieval: ks must be positive integers, got {tuple(ks)}")
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(
            "cross_model_retrieval: expected query [Q, D] and gallery [G, D] embeddings of one width, got "
            f"{tuple(query.shape)} and {tuple(gallery.shape)}"
        )
    if gallery.shape[0] == 0:
        raise ValueError("cross_model_retrieval: the gallery is empty")
    for side, x, labels, extra in (
        ("query", query, query_labels, ids[0]),
        ("gallery", gallery, gallery_labels, ids[1]),
    ):
        for what, y in (("labels", labels), ("ids", extra)):
            if y is not None and tuple(y.shape) != (x.shape[0],):
                raise ValueError(
                    f"cross_model_retrieval: expected {side} {what} of shape [{x.shape[0]}], "
                    f"got {tuple(y.shape)}"
                )
    if (ids[0] is None) != (ids[1] is None):
        raise ValueError("cross_model_retrieval: give both query_ids and gallery_ids, or neither")


def cross_model_retrieval(
    query_embeddings: Tensor,
    query_labels: Tensor,
    gallery_embeddings: Tensor,
    gallery_labels: Tensor,
    ks: Sequence[int] = (1, 5),
    metric: str = "cosine",
    query_ids: Tensor | None = None,
    gallery_ids: Tensor | None = None,
    block_size: int | None = None,
) -> dict[str, float]:
    """Top-k accuracy and mAP (percent) of queries ranked against a gallery (see the module docstring).

    Args:
        query_embeddings, query_labels: ``[Q, D]``, ``[Q]`` (e.g. the new model on the test set).
        gallery_embeddings, gallery_labels: ``[G, D]``, ``[G]`` (e.g. the old model on the training set).
        ks: the k of each top-k accuracy.
        metric: ``"cosine"`` (embeddings normalised here) or ``"euclidean"``.
        query_ids, gallery_ids: ``[Q]``, ``[G]``; a gallery item with the query's id is ignored.
        block_size: queries scored at once (default: about 4M similarities per block).

    Returns:
        ``{"top1": ..., "top5": ..., "map": ...}`` over the queries with a relevant gallery item.

    Raises:
        ValueError: shapes that do not fit, an unknown metric, or no query with a relevant item.
    """
    ids = (query_ids, gallery_ids)
    _check(query_embeddings, query_labels, gallery_embeddings, gallery_labels, ks, metric, ids)
    device = query_embeddings.device
    dtype = compute_dtype(torch.promote_types(query_embeddings.dtype, gallery_embeddings.dtype))
    q = query_embeddings.to(dtype)
    g = gallery_embeddings.to(device, dtype)
    if metric == "cosine":
        q, g = F.normalize(q, dim=1), F.normalize(g, dim=1)
    g_sq = g.pow(2).sum(1)
    g_labels = gallery_labels.to(device)
    g_ids = None if gallery_ids is None else gallery_ids.to(device)
    n_gallery = g.shape[0]
    block = block_size or max(1, _BLOCK_ELEMENTS // n_gallery)
    rank = torch.arange(1, n_gallery + 1, device=device, dtype=dtype)
    hits = torch.zeros(len(ks), device=device, dtype=dtype)
    ap_sum = torch.zeros((), device=device, dtype=dtype)
    counted = torch.zeros((), device=device, dtype=torch.long)
    for start in range(0, q.shape[0], block):
        qb = q[start : start + block]
        sim = qb @ g.T
        if metric == "euclidean":
            sim = 2.0 * sim - qb.pow(2).sum(1, keepdim=True) - g_sq
        relevant = query_labels[start : start + block].to(device)[:, None] == g_labels[None, :]
        if query_ids is not None:
            same = query_ids[start : start + block].to(device)[:, None] == g_ids[None, :]
            sim = sim.masked_fill(same, float("-inf"))
            relevant = relevant & ~same
        order = sim.argsort(dim=1, descending=True, stable=True)
        ranked = relevant.gather(1, order)
        n_relevant = ranked.sum(1)
        valid = n_relevant > 0
        for i, k in enumerate(ks):
            hits[i] += (ranked[:, :k].any(1) & valid).sum()
        precision = ranked.cumsum(1).to(dtype) / rank
        ap = (precision * ranked).sum(1) / n_relevant.clamp(min=1)
        ap_sum += torch.where(valid, ap, torch.zeros_like(ap)).sum()
        counted += valid.sum()
    n = int(counted)
    if n == 0:
        raise ValueError("cross_model_retrieval: no query has a relevant item (same label) in the gallery")
    out = {f"top{k}": 100.0 * float(h) / n for k, h in zip(ks, hits.tolist(), strict=True)}
    out["map"] = 100.0 * float(ap_sum) / n
    return out


@register_evaluator("cross_retrieval")
class CrossRetrieval:
    """Cross-model retrieval as an evaluator: queries are the test images embedded by the deployed
    network, the gallery the training images (without augmentation) embedded by ``gallery``.

    Config::

        evaluate:
          cross_retrieval: {gallery: old}        # a teacher of the method, e.g. LCE's old model

    Args:
        gallery: the network that embeds the gallery (default: the run's first teacher).
        tap: the embedding tap of both networks.
        ks: the k of each top-k accuracy.
        metric: ``cosine`` or ``euclidean``.
    """

    def __init__(
        self,
        gallery: str | None = None,
        tap: str = "penultimate",
        ks: Sequence[int] = (1, 5),
        metric: str = "cosine",
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"cross_retrieval: metric must be one of {METRICS}, got {metric!r}")
        self.gallery, self.tap, self.ks, self.metric = gallery, tap, tuple(ks), metric

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        gallery = self.gallery or (ctx.teachers[0] if ctx.teachers else None)
        if gallery is None or gallery not in ctx.networks:
            raise KeyError(
                f"cross_retrieval: no gallery network {gallery!r}; the run's networks are "
                f"{', '.join(ctx.networks)}"
            )
        if "train" not in ctx.loaders:
            raise KeyError("cross_retrieval: the run gives evaluators no training images (loaders['train'])")
        q, qy = embed(ctx.model, ctx.loaders["test"], self.tap, ctx.autocast)
        g, gy = embed(ctx.networks[gallery], ctx.loaders["train"], self.tap, ctx.autocast)
        return cross_model_retrieval(q, qy, g, gy, self.ks, self.metric)
