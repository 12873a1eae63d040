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
from relkd.graphs.ops import GramChain, cosine, cosine_backward, full_precision
from relkd.losses._inputs import gram_loss, gram_pair, nodes, reduce
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register

__all__ = ["pkt", "PKTLoss"]
FUNCTIONAL = ("pkt",)

Input = torch.Tensor | RelationGraph


class _Divergence(GramChain):
    """``mean_ij P^t_ij log((P^t_ij + eps) / (P^s_ij + eps))`` from the two Gram matrices, with
    ``P_ij = (cos_ij + 1) / r_i``, ``r_i = sum_j (cos_ij + 1)`` (the kernel's 1/2 cancels): ten float
    passes over ``B x B`` forward and nine backward.

    With ``Q = P^s + eps``, ``u = P^t / Q`` and ``w_i = sum_j u_ij P^s_ij = sum_j P^t_ij - eps sum_j
    u_ij``: ``dL/dcos^s_ij = (w_i - u_ij) / (r_i B^2)``, then through the cosine
    (:func:`relkd.graphs.ops.cosine_backward`).
    """

    @staticmethod
    def forward(gs: torch.Tensor, gt: torch.Tensor, eps: float):
        cs, inv = cosine(gs)
        q = cs.add_(1.0)
        rows = q.sum(-1, keepdim=True)
        q.div_(rows).add_(eps)
        p_t = cosine(gt)[0].add_(1.0)
        p_t.div_(p_t.sum(-1, keepdim=True))
        ratio = torch.add(p_t, eps).div_(q).log_()
        value = torch.dot(p_t.view(-1), ratio.view(-1)) / p_t.numel()
        return value, (gs, inv, q, p_t, rows), (eps,)

    @staticmethod
    def backward(grad: torch.Tensor, saved: tuple, kept: tuple) -> torch.Tensor:
        gs, inv, q, p_t, rows = saved
        (eps,) = kept
        u = p_t / q
        w = p_t.sum(-1, keepdim=True).sub_(u.sum(-1, keepdim=True), alpha=eps)
        d_cos = u.sub_(w).mul_(-grad / p_t.numel()).div_(rows)
        return cosine_backward(d_cos, gs, inv)


def pkt(student: Input, teacher: Input, eps: float = 1e-7, reduction: str = "mean") -> torch.Tensor:
    """PKT loss: KL-style divergence between cosine-kernel conditional probabilities."""
    s, t = gram_pair("pkt", student, teacher)
    with full_precision(s.device):
        loss = gram_loss(_Divergence, s, t, eps)
    return reduce(loss, nodes(s) ** 2, reduction, "pkt")


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
