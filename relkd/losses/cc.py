r"""Correlation congruence for knowledge distillation.

On L2-normalised embeddings ``f``, the Gaussian kernel's P-order Taylor expansion (Eq. 8):

.. math::
    k(f_i, f_j) = \sum_{p=0}^{P} e^{-2\gamma} \frac{(2\gamma)^p}{p!} (f_i^\top f_j)^p, \qquad
    \mathcal{L}_{CC} = \frac{1}{B^2} \| K_s - K_t \|_F^2

Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019 (Sec. 3.3-3.4): the
Gaussian RBF with its Taylor expansion, ``gamma = 0.4``, ``P = 2`` (the paper's defaults). The kernel comes
from :meth:`RelationGraph.kernel` (``"rbf_taylor"``) on the normalised graph, whose Gram matrix is the
cosine matrix of the raw graph, so no second matrix product is paid. The paper's ``1 / B^2`` scaling
is kept; the instance-level KD term of the paper's total loss is the separate ``kd`` loss.

Shapes:
    student ``[B, ...]``, teacher ``[B, ...]`` (widths may differ) or RelationGraphs -> scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from relkd.graphs import RelationGraph
from relkd.losses._inputs import graph_pair, reduce
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register

__all__ = ["correlation_congruence", "CCLoss"]
FUNCTIONAL = ("correlation_congruence",)

Input = torch.Tensor | RelationGraph


def correlation_congruence(
    student: Input, teacher: Input, gamma: float = 0.4, order: int = 2, reduction: str = "mean"
) -> torch.Tensor:
    """CC loss with the P-order Taylor RBF kernel on unit-normalised embeddings."""
    s, t = graph_pair("correlation_congruence", student, teacher)
    k_s = s.normalized().kernel("rbf_taylor", gamma=gamma, order=order)
    k_t = t.normalized().kernel("rbf_taylor", gamma=gamma, order=order)
    loss = F.mse_loss(k_s, k_t)
    return reduce(loss, s.num_nodes**2, reduction, "correlation_congruence")


@register("cc")
class CCLoss(DistillLoss):
    """Module form of :func:`correlation_congruence`.

    Config::

        losses:
          cc: {weight: 0.02, gamma: 0.4, order: 2}
    """

    accepts_graphs = True

    def __init__(self, gamma: float = 0.4, order: int = 2, reduction: str = "mean") -> None:
        super().__init__()
        self.gamma, self.order, self.reduction = gamma, order, reduction

    def forward(self, student: Input, teacher: Input) -> torch.Tensor:
        return correlation_congruence(
            student, teacher, gamma=self.gamma, order=self.order, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, order={self.order}"
