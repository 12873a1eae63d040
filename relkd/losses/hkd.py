r"""Holistic knowledge distillation: contrast individual and graph (holistic) embeddings.

Zhou, Wang et al., "Distilling Holistic Knowledge with Graph Neural Networks", ICCV 2021. For each
network ``n in {s, t}`` and example ``i`` of the batch:

.. math::
    e^n_i = \frac{W_n f^n_i}{\|W_n f^n_i\|}, \qquad
    g^n = \mathrm{normalize}\big(\mathrm{TAG}_n(e^n, A^n)\big), \qquad
    A^n = \mathrm{kNN}_k\big(\cos(\mathrm{softmax}(z^n_i), \mathrm{softmax}(z^n_j))\big)

with ``f`` the penultimate features, ``z`` the (detached) logits and each node its own first
neighbour. With banks ``V^s, V^t`` (one momentum-averaged entry per example), ``K`` negatives
``n_{i1..iK}`` drawn from other classes and the InfoNCE loss :math:`\ell` of
:mod:`relkd.losses.contrast`:

.. math::
    \mathcal{L} = \ell(e^s_i; V^t_i, V^{s}_{n}) + \ell(e^t_i; V^s_i, V^{t}_{n})
    + \ell(g^s_i; P^t_i, V^{s}_{n}) + \ell(g^t_i; P^s_i, V^{t}_{n}), \qquad
    P^n_i = \mathrm{normalize}(0.75\, V^n_i + 0.25\, g^n_i)

after which ``V^n_i <- normalize(0.9 V^n_i + 0.1 e^n_i)``. The graph terms are skipped when the batch
has fewer than ``k`` examples.

Defaults follow the authors' code (github.com/wyc-ruiker/HKD, ``distiller_zoo/GNN.py``): 128-d
embeddings, ``k = 8`` (the node itself included), one TAG hop (``K = 1``) then L2 normalisation,
unweighted kNN edges, ``tau = 0.07``, ``K = 16384`` negatives from other classes, bank momentum 0.9,
smoothing 0.75, and an anchor's negatives from its *own* network's bank (``negatives_from="own"``;
CRD takes them from the other network's bank, ``"other"``). Where we differ:

* the kNN graph is built on the inputs' device with ``topk`` (the code goes through SciPy and DGL on
  the CPU each step, and hard-codes ``cuda:0``); the neighbours are the same;
* TAG is torch-geometric's: with unweighted edges both libraries normalise by the in-degree ``k``, so
  the hop is the mean over the ``k`` neighbours, as in DGL; the initialisation differs (one Linear per
  hop and a zero bias, where DGL has one Linear over the concatenated hops);
* negatives are drawn on the device (:mod:`relkd.memory.sampling`), not in the data loader; the law is
  the code's: ``K`` distinct entries of the anchor's other classes (with replacement only for a class
  that leaves fewer than ``K``);
* banks are updated on every training step, also when ``B < k`` (the code returns before the update);
  in ``eval()`` mode the loss is computed and no state changes;
* normalisation divides by ``max(||x||, 1e-12)`` (the code divides by ``||x||``); ``B = 1`` works.
* under data parallelism with global relations (:mod:`relkd.distributed`) the kNN graph and the GNN
  run over the global batch (``B`` above is the global batch size) while each rank contrasts its own
  anchors (the mean over ranks is the loss of the global batch); the banks are updated with every
  rank's embeddings and indices, so they stay identical on every rank.

The published recipe (``scripts/run_cifar_distill.sh``, ``run.sh`` and the README of the code: ``-a 1 -b 3
--mode hkd``) adds this loss with weight 3 to the cross-entropy *and* Hinton KD (weight 1, ``T = 4``);
the ``hkd`` method of relkd does the same, and the table's "HKD" row without KD is its ``kd`` weight set
to 0.

Trainable parts (the two projections ``embed_s``/``embed_t`` and the two encoders ``gnn_s``/``gnn_t``)
are submodules: optimise ``student.parameters()`` together with ``loss.parameters()``. The teacher
backbone gets no gradient; ``embed_t`` and ``gnn_t`` are trained through the teacher-anchored terms.

Shapes:
    student_feat ``[B, Ds]`` (or ``[B, ...]``), teacher_feat ``[B, Dt]``, student_logits and
    teacher_logits ``[B, C]``, index ``[B]`` (dataset indices) -> scalar.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from relkd._debug import check_finite
from relkd.distributed import all_gather, global_relations_enabled, rank
from relkd.gnn import create as create_gnn
from relkd.graphs import RelationGraph, knn_from_relation
from relkd.graphs.ops import full_precision
from relkd.losses.base import DistillLoss
from relkd.losses.contrast import Embed, contrast_loss
from relkd.losses.registry import register
from relkd.memory import MemoryBank, NegativeSampler

__all__ = ["hkd", "HKDLoss"]
FUNCTIONAL = ("hkd",)

# Which bank scores each network's anchors' negatives: (student's, teacher's).
_NEGATIVE_BANKS = {
    "own": lambda student_bank, teacher_bank: (student_bank, teacher_bank),
    "other": lambda student_bank, teacher_bank: (teacher_bank, student_bank),
}


def hkd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_bank: torch.Tensor,
    teacher_bank: torch.Tensor,
    index: torch.Tensor,
    negatives: torch.Tensor,
    student_graph: torch.Tensor | None = None,
    teacher_graph: torch.Tensor | None = None,
    *,
    temperature: float = 0.07,
    smooth: float = 0.75,
    negatives_from: str = "own",
) -> torch.Tensor:
    """HKD's contrastive terms given the embeddings, the banks and the negatives' indices.

    Args:
        student, teacher: individual embeddings ``e^s, e^t`` ``[B, D]`` (unit rows).
        student_bank, teacher_bank: ``V^s, V^t`` ``[N, D]``, read before this step's update.
        index: dataset indices ``[B]``; negatives: ``[B, K]`` bank indices.
        student_graph, teacher_graph: GNN embeddings ``g^s, g^t`` ``[B, D]``; ``None`` skips the
            graph terms.
        temperature: ``tau``; smooth: weight of the bank in the graph terms' positive.
        negatives_from: ``"own"`` (the authors') or ``"other"`` network's bank for the negatives.
    """
    if negatives_from not in _NEGATIVE_BANKS:
        raise ValueError(
            f"hkd: negatives_from must be one of {sorted(_NEGATIVE_BANKS)}, got {negatives_from!r}"
        )
    if (student_graph is None) != (teacher_graph is None):
        raise ValueError("hkd: pass both graph embeddings or neither")
    neg_s, neg_t = _NEGATIVE_BANKS[negatives_from](student_bank, teacher_bank)
    anchors_s, positives_s = [student], [teacher_bank[index]]
    anchors_t, positives_t = [teacher], [student_bank[index]]
    if student_graph is not None:
        anchors_s.append(student_graph)
        anchors_t.append(teacher_graph)
        positives_s.append(_smoothed(teacher_bank[index], teacher_graph, smooth))
        positives_t.append(_smoothed(student_bank[index], student_graph, smooth))
    return contrast_loss(
        torch.stack(anchors_s), torch.stack(positives_s), neg_s, negatives, "info_nce", temperature
    ) + contrast_loss(
        torch.stack(anchors_t), torch.stack(positives_t), neg_t, negatives, "info_nce", temperature
    )


def _smoothed(bank_rows: torch.Tensor, graph: torch.Tensor, smooth: float) -> torch.Tensor:
    return F.normalize(smooth * bank_rows + (1.0 - smooth) * graph.detach(), dim=-1)


def _global_batch(
    s: torch.Tensor,
    t: torch.Tensor,
    logits_s: torch.Tensor,
    logits_t: torch.Tensor,
    index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, slice]:
    """Embeddings, detached logits and indices of every rank under global relations (else this
    rank's), and the rows of this rank's shard among them. Two collectives: floats, then indices."""
    if not global_relations_enabled():
        return s, t, logits_s, logits_t, index, slice(None)
    widths = [s.shape[-1], t.shape[-1], logits_s.shape[-1], logits_t.shape[-1]]
    logits = [z.detach().to(s.dtype) for z in (logits_s, logits_t)]
    s_all, t_all, logits_s, logits_t = all_gather(torch.cat([s, t, *logits], -1)).split(widths, -1)
    start = rank() * s.shape[0]
    return s_all, t_all, logits_s, logits_t, all_gather(index), slice(start, start + s.shape[0])


@register("hkd")
class HKDLoss(DistillLoss):
    """Module form of :func:`hkd`: owns the projections, the GNN encoders, the banks and the sampler.

    Args:
        student_dim, teacher_dim: widths of the penultimate features.
        targets: the label of every training example ``[N]``; negatives come from other classes.
        feat_dim: embedding width; k: kNN neighbours per node (itself included).
        num_negatives: ``K``; temperature: ``tau``; momentum: bank momentum.
        smooth: bank weight in the graph terms' positive; negatives_from: ``"own"`` or ``"other"``.
        gnn, gnn_layers, gnn_kwargs: the encoder (:func:`relkd.gnn.create`), default one TAG hop.

    ``forward(..., negatives=None)`` draws the negatives; pass ``[B, K]`` indices to fix them.

    Config (the published recipe, HKD + KD)::

        losses:
          hkd: {weight: 3.0}
          kd: {weight: 1.0, T: 4.0}
    """

    taps = ("penultimate", "logits")
    batch_keys = ("index",)

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        targets: torch.Tensor,
        feat_dim: int = 128,
        k: int = 8,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.9,
        smooth: float = 0.75,
        negatives_from: str = "own",
        gnn: str = "tag",
        gnn_layers: int = 1,
        gnn_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if negatives_from not in _NEGATIVE_BANKS:
            raise ValueError(
                f"hkd: negatives_from must be one of {sorted(_NEGATIVE_BANKS)}, got {negatives_from!r}"
            )
        if k < 1:
            raise ValueError(f"hkd: k must be at least 1 (the node itself), got {k}")
        self.k, self.num_negatives, self.temperature = k, num_negatives, temperature
        self.smooth, self.negatives_from = smooth, negatives_from
        self.sampler = NegativeSampler(len(targets), targets)
        self.embed_s = Embed(student_dim, feat_dim)
        self.embed_t = Embed(teacher_dim, feat_dim)
        kwargs = {"normalize": True, **(gnn_kwargs or {})}
        self.gnn_s = create_gnn(gnn, feat_dim, feat_dim, feat_dim, gnn_layers, **kwargs)
        self.gnn_t = create_gnn(gnn, feat_dim, feat_dim, feat_dim, gnn_layers, **kwargs)
        self.student_bank = MemoryBank(len(targets), feat_dim, momentum)
        self.teacher_bank = MemoryBank(len(targets), feat_dim, momentum)

    def forward(
        self,
        student_feat: torch.Tensor,
        teacher_feat: torch.Tensor,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        index: torch.Tensor,
        negatives: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b = student_feat.shape[0]
        sizes = (teacher_feat.shape[0], student_logits.shape[0], teacher_logits.shape[0], len(index))
        if any(n != b for n in sizes):
            raise ValueError(
                "hkd: expected student/teacher features, student/teacher logits and index with the "
                f"same batch size, got {(b, *sizes)}"
            )
        for what, x in (("student input", student_feat), ("teacher input", teacher_feat)):
            check_finite("hkd", what, x)
        index = index.long()
        with full_precision(student_feat.device):
            s = self.embed_s(student_feat)
            t = self.embed_t(teacher_feat.detach())
            s_all, t_all, logits_s, logits_t, index_all, rows = _global_batch(
                s, t, student_logits, teacher_logits, index
            )
            gs = gt = None
            if s_all.shape[0] >= self.k:
                gs = self.gnn_s(s_all, self._knn(logits_s, s.dtype))[rows]
                gt = self.gnn_t(t_all, self._knn(logits_t, t.dtype))[rows]
            if negatives is None:
                negatives = self.sampler(index, self.num_negatives)
            loss = hkd(
                s,
                t,
                self.student_bank.memory,
                self.teacher_bank.memory,
                index,
                negatives,
                gs,
                gt,
                temperature=self.temperature,
                smooth=self.smooth,
                negatives_from=self.negatives_from,
            )
            if self.training:
                self.student_bank.update(index_all, s_all)
                self.teacher_bank.update(index_all, t_all)
        check_finite("hkd", "loss", loss)
        return loss

    def _knn(self, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Edges to each node from its ``k`` nearest by softmax cosine, itself first (as the code)."""
        cosine = RelationGraph(F.softmax(logits.detach().to(dtype), dim=-1)).cosine
        eye = torch.eye(cosine.shape[0], dtype=torch.bool, device=cosine.device)
        edge_index, _ = knn_from_relation(
            cosine.masked_fill(eye, float("inf")), self.k, largest=True, loop=True
        )
        return edge_index

    def distill(
        self,
        student: Mapping[str, Any],
        teacher: Mapping[str, Any],
        batch: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        feat, logits = self.taps
        if batch is None or "index" not in batch:
            raise KeyError("hkd needs the dataset indices of the batch as batch['index']")
        return self(student[feat], teacher[feat], student[logits], teacher[logits], batch["index"])

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, num_negatives={self.num_negatives}, temperature={self.temperature}, "
            f"smooth={self.smooth}, negatives_from={self.negatives_from!r}"
        )
