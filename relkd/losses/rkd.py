r"""Relational knowledge distillation: distance and angle potentials.

Distance-wise (Park et al., "Relational Knowledge Distillation", CVPR 2019, Eq. 4-5):

.. math::
    \mathcal{L}_{D} = \frac{1}{B^2} \sum_{i,j} \ell_\delta\Big(\frac{d^s_{ij}}{\mu_s},
    \frac{d^t_{ij}}{\mu_t}\Big), \qquad \mu = \text{mean of the nonzero } d_{ij}

Angle-wise (Eq. 6-7), the angle at vertex ``i``:

.. math::
    \mathcal{L}_{A} = \frac{1}{B^3} \sum_{i,j,k} \ell_\delta\big(\cos\angle^s_{ijk},
    \cos\angle^t_{ijk}\big), \qquad
    \cos\angle_{ijk} = \Big\langle \frac{x_j - x_i}{\|x_j - x_i\|}, \frac{x_k - x_i}{\|x_k - x_i\|}
    \Big\rangle

``\ell_\delta`` is the Huber (smooth-L1) loss with ``\delta = 1``. Both averages run over all entries,
diagonal included, as in the authors' code. A zero difference vector contributes a cosine of 0 (the
authors' ``F.normalize`` does the same). The angle term is computed from the Gram matrix in chunks over
the anchor (:func:`relkd.graphs.angle_smooth_l1`): no ``B x B x D`` or ``B^3`` tensor is stored, forward
or backward.

Default weights: distance 25, angle 50, on the penultimate (pooled) features with no normalisation, the
CIFAR-100 benchmark's (github.com/HobbitLong/RepDistiller ``distiller_zoo/RKD.py``, ``RKDLoss(w_d=25,
w_a=50)``, run with ``-a 0 -b 1``). The authors' TensorFlow code (github.com/sseung0703/KD_methods_with_TF
``nets/ResNet.py``, ``RKD(fcs, fct, l=[25, 50])``) uses the same weights but L2-normalises both embeddings
first; for an L2-normalised input pass unit rows. The paper's metric-learning experiments (Sec. 4.1; the
authors' github.com/lenscloth/RKD ``examples/*.sh``: ``--dist_ratio 1 --angle_ratio 2``) use distance 1,
angle 2: the ``rkd_metric`` method.

Shapes:
    student ``[B, ...]`` or ``RelationGraph``; teacher ``[B, ...]`` (widths may differ) -> scalar.
"""

from __future__ import annotations

import torch

from relkd.graphs import RelationGraph, angle_smooth_l1
from relkd.graphs.ops import GramChain, distance_and_count, distance_backward, full_precision
from relkd.losses._inputs import gram_loss, gram_pair, graph_pair, nodes, reduce
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register

__all__ = ["rkd_distance", "rkd_angle", "RKDLoss"]
FUNCTIONAL = (
    "rkd_distance",
    "rkd_angle",
)

Input = torch.Tensor | RelationGraph


class _NormalizedHuber(GramChain):
    """``mean_ij Huber_beta(d^s_ij / mu_s - d^t_ij / mu_t)`` from the two Gram matrices, ``mu`` the mean
    of the nonzero distances: thirteen float passes over ``B x B`` forward and six backward (autograd's
    chain through the distances, the two means and ``smooth_l1_loss`` takes about twenty).

    With ``r = clamp(diff, -beta, beta)``, ``Huber = r (diff - r / 2) / beta`` and its derivative is
    ``r / beta``; ``mu_s = sum(d^s) / count`` (the count a constant) adds ``-(r . d^s) / (beta mu_s^2
    count)`` to every entry. The distances' backward is :func:`relkd.graphs.ops.distance_backward`.
    """

    symmetric = True

    @staticmethod
    def forward(gs: torch.Tensor, gt: torch.Tensor, beta: float):
        ds, count = distance_and_count(gs)
        inv_mu = _inverse_mean(ds, count)
        dt, count_t = distance_and_count(gt)
        diff = dt.mul_(-_inverse_mean(dt, count_t)).addcmul_(ds, inv_mu)
        r = diff.clamp(-beta, beta)
        value = torch.dot(r.view(-1), diff.view(-1)) - 0.5 * torch.dot(r.view(-1), r.view(-1))
        return value / (beta * ds.numel()), (ds, r, inv_mu, count), (beta,)

    @staticmethod
    def backward(grad: torch.Tensor, saved: tuple, kept: tuple) -> torch.Tensor:
        ds, r, inv_mu, count = saved
        (beta,) = kept
        scale = grad / (beta * ds.numel())
        # d mu / d ds is 1 / count on every entry; 0 where no distance is nonzero (mu is then fixed).
        shift = torch.dot(r.view(-1), ds.view(-1)) * inv_mu.square() / count.clamp_min(1)
        d_dist = (r * (inv_mu * scale)).sub_(shift * scale)
        return distance_backward(d_dist, ds)


def _inverse_mean(d: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``1 / mu``, ``mu`` the mean of the ``count`` nonzero distances (1 where there are none)."""
    return torch.where(count > 0, count / d.sum(), 1.0)


def rkd_distance(student: Input, teacher: Input, reduction: str = "mean") -> torch.Tensor:
    """RKD distance potential: Huber between mean-normalised distance matrices, over ``B^2``."""
    s, t = gram_pair("rkd_distance", student, teacher)
    with full_precision(s.device):
        loss = gram_loss(_NormalizedHuber, s, t, 1.0)
    return reduce(loss, nodes(s) ** 2, reduction, "rkd_distance")


def rkd_angle(
    student: Input,
    teacher: Input,
    reduction: str = "mean",
    chunk: int | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """RKD angle potential: Huber between triplet-angle cosines, over ``B^3``.

    ``chunk`` anchors are processed at a time (default: by a memory budget, see
    :func:`relkd.graphs.angles.default_chunk`). ``fused`` compiles
    the per-chunk body (default: only inside ``torch.compile``), see :func:`relkd.graphs.angle_smooth_l1`.
    """
    s, t = graph_pair("rkd_angle", student, teacher, min_nodes=3)
    loss = angle_smooth_l1(s.gram, s.inv_distance, t.gram, t.inv_distance, beta=1.0, chunk=chunk, fused=fused)
    return reduce(loss, s.num_nodes**3, reduction, "rkd_angle")


@register("rkd")
class RKDLoss(DistillLoss):
    """``distance_weight * rkd_distance + angle_weight * rkd_angle`` on the penultimate embeddings.

    Config (the CIFAR-100 benchmark; the paper's metric-learning weights are 1 and 2)::

        losses:
          rkd: {weight: 1.0, distance_weight: 25.0, angle_weight: 50.0}
    """

    accepts_graphs = True

    def __init__(
        self, distance_weight: float = 25.0, angle_weight: float = 50.0, reduction: str = "mean"
    ) -> None:
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight
        self.reduction = reduction

    def forward(self, student: Input, teacher: Input) -> torch.Tensor:
        s, t = graph_pair("rkd", student, teacher)
        loss = s.x.new_zeros((), dtype=s.dtype)
        if self.distance_weight:
            loss = loss + self.distance_weight * rkd_distance(s, t, self.reduction)
        if self.angle_weight:
            loss = loss + self.angle_weight * rkd_angle(s, t, self.reduction)
        return loss

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"
