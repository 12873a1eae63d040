r"""Agreement between the student's and the teacher's relation graphs of one probe batch.

kNN edge overlap: the Jaccard index of the two directed kNN edge sets,

.. math::
    J = \frac{|E^s \cap E^t|}{|E^s \cup E^t|}, \qquad E = \{(j, i) : j \in \mathcal{N}_k(i)\},

1 when every instance keeps its ``k`` nearest neighbours, 0 when none does.

CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019,
Eq. 3-4), from the two sides' kernel matrices over the same ``N`` instances, so that the widths may
differ:

.. math::
    \mathrm{CKA}(K, L) = \frac{\langle \tilde K, \tilde L \rangle_F}
    {\|\tilde K\|_F\, \|\tilde L\|_F}, \qquad
    \tilde K = H K H,\quad H = I - \tfrac{1}{N} \mathbf{1} \mathbf{1}^\top,

with ``K = X X^T`` (linear; then equal to :math:`\|Y_c^\top X_c\|_F^2 / (\|X_c^\top X_c\|_F\,
\|Y_c^\top Y_c\|_F)` on centred features) or the RBF kernel
:math:`K_{ij} = \exp(-\|x_i - x_j\|^2 / (2 \tau^2 m))`, ``m`` the median of the ``N^2`` squared
distances (diagonal included) and ``tau`` the ``threshold`` (1 by default), as in the authors'
notebook. ``debiased=True`` replaces the centring by the U-centring of Székely & Rizzo (2014): the
diagonal is zeroed and

.. math::
    \tilde K_{ij} = K_{ij} - \frac{1}{N-2} \sum_a K_{aj} - \frac{1}{N-2} \sum_b K_{ib}
    + \frac{1}{(N-1)(N-2)} \sum_{a,b} K_{ab} \quad (i \ne j), \qquad \tilde K_{ii} = 0,

so that :math:`\langle \tilde K, \tilde L \rangle_F / (N (N - 3))` is the unbiased HSIC estimator of
Song et al. (JMLR 2012), and CKA built from it is the debiased CKA (Kornblith et al.'s notebook;
Nguyen et al., ICLR 2021); it needs ``N >= 4``. Linear CKA is invariant to orthogonal transforms
and isotropic scaling of either side, biased or not; RBF CKA is too (the bandwidth scales with the
median distance).

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
    "CKA_KERNELS",
    "agreement",
    "centre_kernel",
    "centred_gram",
    "cka",
    "cka_kernel",
    "distance_rank_correlation",
    "hsic",
    "jaccard",
    "knn_adjacency",
    "knn_overlap",
    "linear_cka",
    "probe_pair",
]

Input = torch.Tensor | RelationGraph

AGREEMENT_KEYS = ("knn_overlap", "cka", "distance_spearman")
CKA_KERNELS = ("linear", "rbf")


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


def centre_kernel(k: torch.Tensor, *, unbiased: bool = False) -> torch.Tensor:
    """A symmetric kernel matrix ``[N, N]`` centred in float64: ``H K H``, or U-centred with
    ``unbiased=True`` (zero diagonal; see the module doc), which needs ``N >= 4``."""
    k = k.double()
    n = k.shape[-1]
    if not unbiased:
        return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    if n < 4:
        raise ValueError(f"the unbiased (U-)centring needs at least 4 instances, got {n}")
    k = k - torch.diag_embed(torch.diagonal(k))
    means = k.sum(0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    out = k - means[:, None] - means[None, :]
    return out - torch.diag_embed(torch.diagonal(out))


def centred_gram(graph: RelationGraph, *, unbiased: bool = False) -> torch.Tensor:
    """``H G H`` in float64: the Gram matrix of the mean-centred features, ``[N, N]`` (U-centred with
    ``unbiased=True``)."""
    return centre_kernel(graph.gram, unbiased=unbiased)


def cka_kernel(graph: RelationGraph, kernel: str = "linear", threshold: float = 1.0) -> torch.Tensor:
    """The kernel matrix CKA compares, float64 ``[N, N]``: ``linear`` (the Gram matrix) or ``rbf``
    with the bandwidth ``threshold`` times the root median squared distance (see the module doc)."""
    if kernel == "linear":
        return graph.gram.double()
    if kernel == "rbf":
        sq = graph.sq_distance.double()
        values = sq.flatten().sort().values
        m = values.numel()
        median = (values[(m - 1) // 2] + values[m // 2]) / 2
        return torch.exp(-sq / (2 * threshold**2 * median))
    raise ValueError(f"unknown CKA kernel {kernel!r}; expected one of {list(CKA_KERNELS)}")


def hsic(kc: torch.Tensor, lc: torch.Tensor, *, unbiased: bool = False) -> torch.Tensor:
    """HSIC from two centred kernel matrices ``[..., N, N]`` (broadcast): ``<K~, L~> / (N - 1)^2``
    (biased, ``H``-centred inputs) or ``<K~, L~> / (N (N - 3))`` (Song et al.'s unbiased estimator,
    U-centred inputs)."""
    n = kc.shape[-1]
    return (kc * lc).sum((-2, -1)) / (n * (n - 3) if unbiased else (n - 1) ** 2)


def _knn_overlap(s: RelationGraph, t: RelationGraph, k: int, relation: str) -> torch.Tensor:
    return jaccard(knn_adjacency(s, k, relation), knn_adjacency(t, k, relation))


def _cka(
    s: RelationGraph, t: RelationGraph, kernel: str = "linear", debiased: bool = False, threshold: float = 1.0
) -> torch.Tensor:
    ks = centre_kernel(cka_kernel(s, kernel, threshold), unbiased=debiased)
    kt = centre_kernel(cka_kernel(t, kernel, threshold), unbiased=debiased)
    return (ks * kt).sum() / (torch.linalg.matrix_norm(ks) * torch.linalg.matrix_norm(kt))


def _upper_distances(g: RelationGraph) -> torch.Tensor:
    iu = torch.triu_indices(g.num_nodes, g.num_nodes, offset=1, device=g.device)
    return g.distance[iu[0], iu[1]].double()


def _spearman(a, b) -> float:
    """Spearman's rho; NaN (undefined, without SciPy's warning) when either side is constant, e.g. a
    network that maps every probe image to the same embedding."""
    if len(a) < 2 or (a == a[0]).all() or (b == b[0]).all():
        return float("nan")
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


def cka(
    x: Input, y: Input, kernel: str = "linear", *, debiased: bool = False, threshold: float = 1.0
) -> float:
    """CKA of two representations of the same ``N`` instances (see module doc): in ``[0, 1]``
    (debiased: may dip slightly below 0 for unrelated sides).

    Args:
        x, y: ``[N, ...]`` (flattened per instance; widths may differ) or ``RelationGraph`` s.
        kernel: ``linear`` or ``rbf``.
        debiased: the unbiased HSIC estimator (U-centring) instead of the biased one; needs ``N >= 4``.
        threshold: the RBF bandwidth as a multiple of the root median squared distance.
    """
    s, t = probe_pair("cka", x, y, min_nodes=4 if debiased else 2)
    return float(_cka(s, t, kernel, debiased, threshold))


def linear_cka(x: Input, y: Input) -> float:
    """Linear CKA of two embeddings of the same ``N`` instances (see module doc), in ``[0, 1]``."""
    s, t = probe_pair("linear_cka", x, y)
    return float(_cka(s, t))


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
    # a probe smaller than k + 1 instances (a tiny test set) compares all of each node's neighbours
    scalars = torch.stack([_knn_overlap(s, t, min(k, s.num_nodes - 1), relation), _cka(s, t)])
    host = torch.cat([scalars, _upper_distances(s), _upper_distances(t)]).cpu().numpy()
    return {
        "knn_overlap": float(host[0]),
        "cka": float(host[1]),
        "distance_spearman": _spearman(host[2 : 2 + m], host[2 + m :]),
    }
