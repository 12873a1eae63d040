r"""Similarity-preserving knowledge distillation.

.. math::
    \tilde G = \mathrm{rownorm}(X X^\top), \qquad
    \mathcal{L}_{SP} = \frac{1}{B^2} \big\| \tilde G_s - \tilde G_t \big\|_F^2

Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, Eq. 2-4: each row of the
batch Gram matrix is L2-normalised (a zero row stays zero, as with the authors' ``F.normalize``). The paper
applies it to each chosen layer's activations flattened per sample; pass ``[B, C, H, W]`` maps as they
are. The loss is invariant to a common scaling of the features.

Defaults follow the CIFAR-100 benchmark (github.com/HobbitLong/RepDistiller ``distiller_zoo/SP.py``,
"verified by original author", called from ``helper/loops.py`` on ``feat[-2]`` with ``-a 0 -b 3000``):
one layer pair, the last stage's feature map before global pooling (``[B, 256, 8, 8]`` for resnet32x4
and resnet8x4), which every zoo model exposes as the tap ``feature_map``; weight 3000.

Shapes:
    student ``[B, ...]``, teacher ``[B, ...]`` (widths may differ) or RelationGraphs -> scalar.
"""

from __future__ import annotations

import torch

from relkd.graphs import RelationGraph
from relkd.graphs.ops import GramChain, full_precision
from relkd.losses._inputs import features, gram_loss, gram_pair, nodes, reduce
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register

__all__ = ["similarity_preserving", "SPLoss"]
FUNCTIONAL = ("similarity_preserving",)

Input = torch.Tensor | RelationGraph


class _SimilarityPreserving(GramChain):
    """``sum_ij (Y^s_ij - Y^t_ij)^2 / B^2`` for the row-normalised ``Y = G / ||G_i||`` in five float
    passes over ``B x B`` forward and three backward.

    A zero row keeps the norm 1 (it stays zero, and its gradient passes through unscaled). With
    ``u_i = 1 / ||G^s_i||`` and ``D = Y^t - Y^s``, ``dL/dG^s_i = -2 u_i D_i + 2 u_i^3 (G^s_i . D_i) G^s_i``
    over ``B^2``.
    """

    @staticmethod
    def forward(gs: torch.Tensor, gt: torch.Tensor):
        inv_s = _inverse_row_norms(gs)
        diff = (gt * _inverse_row_norms(gt)).addcmul_(gs, inv_s, value=-1.0)
        value = torch.dot(diff.view(-1), diff.view(-1)) / diff.numel()
        return value, (gs, diff, inv_s), ()

    @staticmethod
    def backward(grad: torch.Tensor, saved: tuple, kept: tuple) -> torch.Tensor:
        gs, diff, inv_s = saved
        scale = grad * (2.0 / diff.numel())
        along = torch.linalg.vecdot(gs, diff).unsqueeze(-1).mul_(inv_s.pow(3)).mul_(scale)
        return (diff * (inv_s * -scale)).addcmul_(gs, along)


def _inverse_row_norms(g: torch.Tensor) -> torch.Tensor:
    """``1 / ||G_i||`` as ``[..., B, 1]``; 1 for a zero row."""
    return torch.linalg.vector_norm(g, dim=-1, keepdim=True).reciprocal_().nan_to_num_(posinf=1.0)


def similarity_preserving(student: Input, teacher: Input, reduction: str = "mean") -> torch.Tensor:
    """SP loss: squared Frobenius distance of the row-normalised Gram matrices over ``B^2``."""
    s, t = gram_pair("similarity_preserving", student, teacher)
    with full_precision(s.device):
        if nodes(s) < 2:  # one row of one entry, normalised to 1 on both sides
            loss = features(s).sum() * 0.0
        else:
            loss = gram_loss(_SimilarityPreserving, s, t)
    return reduce(loss, nodes(s) ** 2, reduction, "similarity_preserving")


@register("sp")
class SPLoss(DistillLoss):
    """Module form of :func:`similarity_preserving`, reading the last stage's map before pooling.

    Config (the CIFAR-100 benchmark)::

        losses:
          sp: {weight: 3000.0, taps: [feature_map]}
    """

    taps = ("feature_map",)
    accepts_graphs = True

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, student: Input, teacher: Input) -> torch.Tensor:
        return similarity_preserving(student, teacher, reduction=self.reduction)
