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
import torch.nn.functional as F

from relkd.graphs import RelationGraph, angle_smooth_l1
from relkd.losses._inputs import graph_pair, reduce
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register

__all__ = ["rkd_distance", "rkd_angle", "RKDLoss"]
FUNCTIONAL = (
    "rkd_distance",
    "rkd_angle",
)

Input = torch.Tensor | RelationGraph


def rkd_distance(student: Input, teacher: Input, reduction: str = "mean") -> torch.Tensor:
    """RKD distance potential: Huber between mean-normalised distance matrices, over ``B^2``."""
    s, t = graph_pair("rkd_distance", student, teacher)
    loss = F.smooth_l1_loss(s.normalized_distance, t.normalized_distance, beta=1.0)
    return reduce(loss, s.num_nodes**2, reduction, "rkd_distance")


def rkd_angle(
    student: Input,
    teacher: Input,
    reduction: str = "mean",
    chunk: int | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """RKD angle potential: Huber between triplet-angle cosines, over ``B^3``.

    ``chunk`` anchors are processed at a time (default: ~4M elements per block). ``fused`` compiles
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
