r"""Second-order representational similarity (RSA) of Abnar, Dehghani & Zuidema, "Transferring Inductive
Biases through Knowledge Distillation" (2020), as their code computes it.

Each side's first-order similarity is the cosine matrix of its representations; the second-order
similarity of instance ``i`` is the cosine between row ``i`` of the two matrices, and RSA is its mean:

.. math::
    S^x_{ij} = \frac{x_i \cdot x_j}{\|x_i\|\,\|x_j\|}, \qquad
    r_i = \frac{S^x_{i\cdot} \cdot S^y_{i\cdot}}{\|S^x_{i\cdot}\|\,\|S^y_{i\cdot}\|}, \qquad
    \mathrm{RSA}(X, Y) = \frac1N \sum_i r_i .

This follows the authors' code (samiraabnar/Reflect, ``distill/repsim_util.py``:
``second_order_rep_sim``): a *similarity* (cosine), not a dissimilarity, on each side, and a cosine,
not a Pearson or Spearman correlation, between the rows, which keep their diagonal entries (1). No
centring: RSA is invariant to orthogonal transforms and to scaling of either side (cosines are), not
to translation; 1 when the two cosine matrices are equal. A zero representation has cosine 0 with
everything (:attr:`RelationGraph.cosine`); a row of zeros gives ``r_i = 0``.

Shapes:
    ``x [N, ...]``, ``y [N, ...]`` (flattened per instance; widths may differ) or ``RelationGraph`` s
    -> :func:`second_order_similarity` ``[N]`` float64, :func:`rsa` a float.
"""

from __future__ import annotations

import torch
from torch import Tensor

from relkd.graphs import RelationGraph
from relkd.graphs.agreement import probe_pair
from relkd.graphs.ops import inv_or_zero

__all__ = ["rsa", "second_order_similarity"]

Input = Tensor | RelationGraph


def second_order_similarity(x: Input, y: Input) -> Tensor:
    """``r_i``: the cosine between row ``i`` of the two sides' cosine matrices, ``[N]`` float64."""
    gx, gy = probe_pair("second_order_similarity", x, y)
    sx, sy = gx.cosine.double(), gy.cosine.double()
    norms = torch.linalg.vector_norm(sx, dim=1) * torch.linalg.vector_norm(sy, dim=1)
    return (sx * sy).sum(1) * inv_or_zero(norms)


def rsa(x: Input, y: Input) -> float:
    """Reflect's second-order similarity: the mean of :func:`second_order_similarity`, in ``[-1, 1]``."""
    return float(second_order_similarity(x, y).mean())
