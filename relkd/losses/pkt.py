r"""Probabilistic knowledge transfer.

.. math::
    K_{ij} = \frac{1 + \cos(x_i, x_j)}{2}, \qquad P_{ij} = \frac{K_{ij}}{\sum_k K_{ik}}, \qquad
    \mathcal{L}_{PKT} = \frac{1}{B^2} \sum_{i,j} P^t_{ij} \log \frac{P^t_{ij} + \epsilon}{P^s_{ij} + \epsilon}

Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018
(Eq. 12-13, cosine kernel). We follow the authors' code: the cosine kernel mapped to ``[0, 1]``, rows
normalised to conditional probabilities, the mean (not the sum) over all ``B^2`` entries, ``eps = 1e-7``.
The code divides by ``||x|| + eps``; we use the exact cosine (0 for a zero vector), a difference of
order ``eps / ||x||``.

Shapes:
    student ``[B, ...]``, teacher ``[B, ...]`` (widths may differ) or RelationGraphs -> scalar.
"""

from __future__ import annotations

import torch

from relkd.graphs import RelationGraph
from relkd.losses._inputs import graph_pair, reduce
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register

__all__ = ["pkt", "PKTLoss"]
FUNCTIONAL = ("pkt",)

Input = torch.Tensor | RelationGraph


def _conditional(cos: torch.Tensor) -> torch.Tensor:
    # The kernel's 1/2 cancels in the row normalisation.
    k = cos + 1.0
    return k / k.sum(-1, keepdim=True)


class _Divergence(torch.autograd.Function):
    """``mean(p_t log((p_t + eps) / (p_s + eps)))`` with the gradient ``-p_t / (p_s + eps) / n`` formed
    in two passes (autograd's chain through the quotient takes six); ``p_t`` is a constant."""

    @staticmethod
    def forward(ctx, p_s: torch.Tensor, p_t: torch.Tensor, eps: float) -> torch.Tensor:
        denominator = p_s + eps
        ctx.save_for_backward(denominator, p_t)
        return (p_t * torch.log((p_t + eps) / denominator)).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        denominator, p_t = ctx.saved_tensors
        return torch.div(p_t, denominator).mul_(-grad / p_t.numel()), None, None


def pkt(student: Input, teacher: Input, eps: float = 1e-7, reduction: str = "mean") -> torch.Tensor:
    """PKT loss: KL-style divergence between cosine-kernel conditional probabilities."""
    s, t = graph_pair("pkt", student, teacher)
    loss = _Divergence.apply(_conditional(s.cosine), _conditional(t.cosine).detach(), eps)
    return reduce(loss, s.num_nodes**2, reduction, "pkt")


@register("pkt")
class PKTLoss(DistillLoss):
    """Module form of :func:`pkt`. The CIFAR-100 benchmark uses weight 30000.

    Config::

        losses:
          pkt: {weight: 30000.0}
    """

    accepts_graphs = True

    def __init__(self, eps: float = 1e-7, reduction: str = "mean") -> None:
        super().__init__()
        self.eps, self.reduction = eps, reduction

    def forward(self, student: Input, teacher: Input) -> torch.Tensor:
        return pkt(student, teacher, eps=self.eps, reduction=self.reduction)
