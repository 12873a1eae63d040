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
import torch.nn.functional as F

from relkd.graphs import RelationGraph
from relkd.graphs.ops import distance_from_sq
from relkd.losses._inputs import graph_pair, reduce
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register

__all__ = ["similarity_preserving", "SPLoss"]
FUNCTIONAL = ("similarity_preserving",)

Input = torch.Tensor | RelationGraph


def _row_normalized(g: torch.Tensor) -> torch.Tensor:
    # A division, not a product with the reciprocal: a row of one entry is then exactly 1.
    norm = distance_from_sq(g.square().sum(-1, keepdim=True))
    return g / torch.where(norm > 0, norm, 1.0)


def similarity_preserving(student: Input, teacher: Input, reduction: str = "mean") -> torch.Tensor:
    """SP loss: squared Frobenius distance of the row-normalised Gram matrices over ``B^2``."""
    s, t = graph_pair("similarity_preserving", student, teacher)
    loss = F.mse_loss(_row_normalized(s.gram), _row_normalized(t.gram))
    return reduce(loss, s.num_nodes**2, reduction, "similarity_preserving")


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
