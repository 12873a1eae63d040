r"""Agreement between the student's and the teacher's relation graphs of one probe batch.

kNN edge overlap: the Jaccard index of the two directed kNN edge sets,

.. math::
    J = \frac{|E^s \cap E^t|}{|E^s \cup E^t|}, \qquad E = \{(j, i) : j \in \mathcal{N}_k(i)\},

1 when every instance keeps its ``k`` nearest neighbours, 0 when none does.

Linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019,
Eq. 3-4 with linear kernels), from the centred Gram matrices so that the widths may differ:

.. math::
    \mathrm{CKA}(X, Y) = \frac{\langle \tilde K, \tilde L \rangle_F}
    {\|\tilde K\|_F\, \|\tilde L\|_F}, \qquad
    \tilde K = H X X^\top H,\quad \tilde L = H Y Y^\top H,\quad
    H = I - \tfrac{1}{N} \mathbf{1} \mathbf{1}^\top,

equal to :math:`\|Y_c^\top X_c\|_F^2 / (\|X_c^\top X_c\|_F\, \|Y_c^\top Y_c\|_F)` on centred
features; invariant to orthogonal transforms and isotropic scaling of either side.

Distance rank correlation: Spearman's :math:`\rho` between the ``N (N - 1) / 2`` pairwise Euclidean
distances of the two sides (``scipy.stats.spearmanr``, ties get their average rank); 1 when the
student's distances are any increasing function of the teacher's.

These run once per epoch on a probe batch, not in the training step: each side pays one Gram
matrix (through :class:`~relkd.graphs.RelationGraph`, whose cached relations the three metrics
share), the math stays in torch on the inputs' device, and :func:`agreement` moves its results to
the host in one transfer. A constant side (no variance) has no CKA or rank correlation: those
come out NaN.

Shapes:
    student ``[N, ...]`` or ``RelationGraph``; teacher ``[N, ...]`` (widths may differ) -> float.
"""

from __future__ import annotations

import torch
from scipy.stats import spearmanr

from relkd.graphs import RelationGraph, as_graph, check_pair

__all__ = [
    "AGREEMENT_KEYS",
    "agreement",
    "centred_gram",
    "distance_rank_correlation",
    "jaccard",
    "knn_adjacency",
    "knn_overlap",
    "linear_cka",
    "probe_pair",
]

Input = torch.Tensor | RelationGraph

AGREEMENT_KEYS = ("knn_overlap", "cka", "distance_spearman")


def probe_pair(
    name: str, student: Input, teacher: Input, min_nodes: int = 2
) -> tuple[RelationGraph, RelationGraph]:
    """Detached student and teacher graphs of one batch each, with the same number of nodes."""
    s, t = as_graph(student, detach=True), as_graph(teacher, detach=True)
    check_pair(name, s, t)
    if s.num_nodes < min_nodes:
        raise ValueError(f"{name}: needs a probe batch of at least {min_nodes} instances, got {s.num_nodes}")
    return s, t


def knn_adjacency(graph: RelationGraph, k: int, relation: str = "cosine") -> torch.Tensor:
    """Boolean ``[N, N]`` matrix whose entry ``(i, j)`` says that ``j`` is one of ``i``'s ``k``
    nearest neighbours under ``relation`` (self excluded); ``k`` True entries per row."""
    edge_index, _ = graph.knn(k, relation)
    n = graph.num_nodes
    adj = torch.zeros(n, n, dtype=torch.bool, device=graph.device)
    adj[edge_index[1], edge_index[0]] = True
    return adj


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a & b| / |a | b|`` of two boolean masks (a 0-d float64 tensor; NaN if both are empty)."""
    inter = (a & b).sum(dtype=torch.float64)
    return inter / (a | b).sum(dtype=torch.float64)


def centred_gram(graph: RelationGraph) -> torch.Tensor:
    """``H G H`` in float64: the Gram matrix of the mean-centred features, ``[N, N]``."""
    g = graph.gram.double()
    return g - g.mean(0, keepdim=True) - g.mean(1, keepdim=True) + g.mean()


def _knn_overlap(s: RelationGraph, t: RelationGraph, k: int, relation: str) -> torch.Tensor:
    return jaccard(knn_adjacency(s, k, relation), knn_adjacency(t, k, relation))


def _linear_cka(s: RelationGraph, t: RelationGraph) -> torch.Tensor:
    ks, kt = centred_gram(s), centred_gram(t)
    return (ks * kt).sum() / (torch.linalg.matrix_norm(ks) * torch.linalg.matrix_norm(kt))


def _upper_distances(g: RelationGraph) -> torch.Tensor:
    iu = torch.triu_indices(g.num_nodes, g.num_nodes, offset=1, device=g.device)
    return g.distance[iu[0], iu[1]].double()


def _spearman(a, b) -> float:
    return float(spearmanr(a, b).statistic)


def knn_overlap(student: Input, teacher: Input, k: int = 5, relation: str = "cosine") -> float:
    """Jaccard index of the student's and the teacher's directed kNN edge sets (see module doc).

    Args:
        k: neighbours per instance; needs ``1 <= k < N``.
        relation: what "nearest" means, any :meth:`RelationGraph.relation` name (similarities keep
            the largest values, distances the smallest).
    """
    s, t = probe_pair("knn_overlap", student, teacher)
    return float(_knn_overlap(s, t, k, relation))


def linear_cka(x: Input, y: Input) -> float:
    """Linear CKA of two embeddings of the same ``N`` instances (see module doc), in ``[0, 1]``."""
    s, t = probe_pair("linear_cka", x, y)
    return float(_linear_cka(s, t))


def distance_rank_correlation(student: Input, teacher: Input) -> float:
    """Spearman's rho between the pairwise Euclidean distances of the two sides, in ``[-1, 1]``."""
    s, t = probe_pair("distance_rank_correlation", student, teacher, min_nodes=3)
    host = torch.stack([_upper_distances(s), _upper_distances(t)]).cpu().numpy()
    return _spearman(host[0], host[1])


def agreement(student: Input, teacher: Input, k: int = 5, *, relation: str = "cosine") -> dict[str, float]:
    """All three metrics at once, sharing each side's Gram matrix, with one host transfer.

    Returns:
        ``{"knn_overlap": J, "cka": CKA, "distance_spearman": rho}`` (keys :data:`AGREEMENT_KEYS`).
    """
    s, t = probe_pair("agreement", student, teacher, min_nodes=3)
    m = s.num_nodes * (s.num_nodes - 1) // 2
    scalars = torch.stack([_knn_overlap(s, t, k, relation), _linear_cka(s, t)])
    host = torch.cat([scalars, _upper_distances(s), _upper_distances(t)]).cpu().numpy()
    return {
        "knn_overlap": float(host[0]),
        "cka": float(host[1]),
        "distance_spearman": _spearman(host[2 : 2 + m], host[2 + m :]),
    }
