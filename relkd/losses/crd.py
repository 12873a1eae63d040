r"""Contrastive representation distillation: NCE between student and teacher embeddings.

Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020. Embeddings
``e^n_i = W_n f^n_i / ||W_n f^n_i||`` (``n in {s, t}``) are contrasted against the *other* network's
memory bank, in both directions, with the NCE loss :math:`\ell_{\text{NCE}}` of
:mod:`relkd.losses.contrast` (noise prior ``1 / N``, normaliser ``Z`` fixed on the first batch):

.. math::
    \mathcal{L} = \ell_{\text{NCE}}\big(e^s_i;\, V^t_i,\, V^t_{n_{i1..iK}};\, Z_s\big)
    + \ell_{\text{NCE}}\big(e^t_i;\, V^s_i,\, V^s_{n_{i1..iK}};\, Z_t\big)

after which ``V^n_i <- normalize(m V^n_i + (1 - m) e^n_i)``. Defaults are those of the authors' code
that produced the CIFAR-100 numbers (github.com/HobbitLong/RepDistiller: ``crd/``, ``train_student.py``,
``dataset/cifar100.py``): 128-d, ``tau = 0.07``, ``K = 16384``, ``m = 0.5``, the positive is the
anchor's own example (``mode='exact'``), ``Z = N * mean(exp(s / tau))`` over the first batch's scores,
kept in the ``normalizer`` buffer (``state_dict`` included) for the rest of training; the benchmark's
weight is 0.8 on top of the cross-entropy (``-a 0 -b 0.8``). Differences:

* negatives: RepDistiller's CIFAR-100 runs (``dataset/cifar100.py``, ``CIFAR100InstanceSample``, which
  feeds ``contrast_idx`` to the loss) draw each anchor's ``K`` negatives from the *other classes*,
  *without replacement* (with replacement only for a class that leaves fewer than ``K``):
  ``negatives="other_classes"``, the default whenever the labels are known (the engine always passes
  ``targets``). The paper's and ``ContrastMemory``'s own sampler, uniform over the dataset with
  replacement, is ``negatives="uniform"``, the default without ``targets``. Both are drawn on the device
  (see :mod:`relkd.memory.sampling`), not in the data loader;
* ``bank="queue"`` replaces the ``N x 128`` banks by FIFO queues of ``queue_size`` recent embeddings
  (MoCo-style) for datasets whose banks would not fit: negatives are then uniform queue slots
  (``negatives="uniform"``) and an anchor's positive is the other network's current (detached)
  embedding of the same example; ``momentum`` is unused and the noise prior stays ``1 / N``;
* the loss is computed in log space; in ``eval()`` mode no state (banks, ``Z``) changes;
* under data parallelism with global relations (:mod:`relkd.distributed`) each rank contrasts its own
  anchors (the mean over ranks is the loss of the global batch), ``Z`` is estimated over the global
  batch, and the banks are updated with every rank's embeddings and indices, so they stay identical on
  every rank.

The projections ``embed_s``/``embed_t`` are trainable submodules: optimise ``student.parameters()``
together with ``loss.parameters()``. The teacher backbone gets no gradient.

Shapes:
    student_feat ``[B, Ds]`` (or ``[B, ...]``), teacher_feat ``[B, Dt]``, index ``[B]`` -> scalar.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from relkd._debug import check_finite
from relkd.distributed import all_gather, global_relations_enabled, reduce_mean
from relkd.graphs.ops import full_precision
from relkd.losses.base import DistillLoss
from relkd.losses.contrast import Embed, contrast_loss, contrast_scores, nce_normalizer
from relkd.losses.registry import register
from relkd.memory import MemoryBank, NegativeSampler, QueueBank

__all__ = ["crd", "crd_scores", "CRDLoss"]
FUNCTIONAL = ("crd",)

# the laws of the negatives: name -> (needs targets, drawn with replacement)
_NEGATIVES = {"other_classes": (True, False), "uniform": (False, True)}
# bank kind -> the bank each network gets
_BANKS = {
    "full": lambda num_data, queue_size, dim, momentum: MemoryBank(num_data, dim, momentum),
    "queue": lambda num_data, queue_size, dim, momentum: QueueBank(queue_size, dim),
}


def crd_scores(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_positive: torch.Tensor,
    teacher_positive: torch.Tensor,
    student_bank: torch.Tensor,
    teacher_bank: torch.Tensor,
    negatives: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score rows ``[B, 1 + K]`` of the student anchors against the teacher bank (positive:
    ``teacher_positive``), and of the teacher anchors against the student bank."""
    return (
        contrast_scores(student, teacher_positive, teacher_bank, negatives),
        contrast_scores(teacher, student_positive, student_bank, negatives),
    )


def crd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_positive: torch.Tensor,
    teacher_positive: torch.Tensor,
    student_bank: torch.Tensor,
    teacher_bank: torch.Tensor,
    negatives: torch.Tensor,
    num_data: int,
    normalizer: torch.Tensor | None = None,
    temperature: float = 0.07,
) -> torch.Tensor:
    """CRD's two NCE terms given embeddings ``[B, D]``, positives ``[B, D]`` (``V^t_i`` for the
    student anchor, ``V^s_i`` for the teacher anchor), banks ``[N, D]`` and negatives ``[B, K]``.

    ``normalizer`` holds ``(Z_s, Z_t)``; ``None`` estimates both from this batch.
    """
    with torch.no_grad():
        scores = crd_scores(
            student, teacher, student_positive, teacher_positive, student_bank, teacher_bank, negatives
        )
    z = normalizer if normalizer is not None else _estimate(scores, num_data, temperature)
    return _nce_terms(
        (student, teacher),
        scores,
        (teacher_positive, student_positive),
        (teacher_bank, student_bank),
        negatives,
        z,
        num_data,
        temperature,
    )


def _nce_terms(anchors, scores, positives, banks, negatives, z, num_data, temperature) -> torch.Tensor:
    """The two NCE terms through :func:`relkd.losses.contrast.contrast_loss`, whose backward reads no bank."""
    terms = zip(anchors, scores, positives, banks, strict=True)
    return sum(
        contrast_loss(a, p, bank, negatives, "nce", temperature, z[i], num_data, scores=x)
        for i, (a, x, p, bank) in enumerate(terms)
    )


def _estimate(scores: tuple[torch.Tensor, ...], num_data: int, temperature: float) -> torch.Tensor:
    return torch.stack([nce_normalizer(s, num_data, temperature) for s in scores])


@register("crd")
class CRDLoss(DistillLoss):
    """Module form of :func:`crd`: owns the projections, the banks, ``Z`` and the sampler.

    Args:
        student_dim, teacher_dim: widths of the penultimate features.
        num_data: ``N``, the training set size.
        feat_dim: embedding width; num_negatives: ``K``; temperature: ``tau``.
        momentum: bank momentum (full bank only).
        targets: labels of the training set ``[N]`` (the engine passes them); needed by
            ``negatives="other_classes"``.
        bank: ``"full"`` (one entry per example) or ``"queue"`` (``queue_size`` recent entries).
        negatives: ``"other_classes"`` (RepDistiller's CIFAR-100 sampler: ``K`` distinct entries of the
            anchor's other classes) or ``"uniform"`` (the paper's: uniform over the bank, with
            replacement; the only law of a ``"queue"`` bank). ``None``: ``"other_classes"`` when
            ``targets`` hold at least two classes and the bank is full, else ``"uniform"``.

    ``forward(..., negatives=None)`` draws the negatives; pass ``[B, K]`` indices to fix them.

    Config::

        losses:
          crd: {weight: 0.8}
    """

    taps = ("penultimate",)
    batch_keys = ("index",)

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        num_data: int,
        feat_dim: int = 128,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        targets: torch.Tensor | None = None,
        bank: str = "full",
        queue_size: int = 65536,
        negatives: str | None = None,
    ) -> None:
        super().__init__()
        if bank not in _BANKS:
            raise ValueError(f"crd: bank must be one of {sorted(_BANKS)}, got {bank!r}")
        if negatives is None:
            labelled = targets is not None and torch.as_tensor(targets).unique().numel() > 1
            negatives = "other_classes" if labelled and bank == "full" else "uniform"
        if negatives not in _NEGATIVES:
            raise ValueError(f"crd: negatives must be one of {sorted(_NEGATIVES)}, got {negatives!r}")
        by_class, replacement = _NEGATIVES[negatives]
        if by_class and targets is None:
            raise ValueError(
                "crd: negatives='other_classes' draws from the anchor's other classes and needs the "
                "labels of the training set as targets; pass targets, or negatives='uniform'"
            )
        if by_class and bank != "full":
            raise ValueError(
                f"crd: a {bank!r} bank has no entry per example, so its negatives cannot exclude a class; "
                "pass negatives='uniform'"
            )
        self.num_data, self.num_negatives, self.temperature = num_data, num_negatives, temperature
        self.bank = bank
        self.embed_s = Embed(student_dim, feat_dim)
        self.embed_t = Embed(teacher_dim, feat_dim)
        self.student_bank = _BANKS[bank](num_data, queue_size, feat_dim, momentum)
        self.teacher_bank = _BANKS[bank](num_data, queue_size, feat_dim, momentum)
        self.negatives = negatives
        self.sampler = NegativeSampler(
            self.student_bank.num_entries, targets if by_class else None, replacement=replacement
        )
        # (Z_s, Z_t); negative means "not set yet": the first training batch sets it.
        self.register_buffer("normalizer", torch.full((2,), -1.0))

    def forward(
        self,
        student_feat: torch.Tensor,
        teacher_feat: torch.Tensor,
        index: torch.Tensor,
        negatives: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b = student_feat.shape[0]
        if teacher_feat.shape[0] != b or len(index) != b:
            raise ValueError(
                "crd: expected student features, teacher features and index with the same batch "
                f"size, got {b}, {teacher_feat.shape[0]} and {len(index)}"
            )
        check_finite("crd", "student input", student_feat)
        check_finite("crd", "teacher input", teacher_feat)
        index = index.long()
        with full_precision(student_feat.device):
            s = self.embed_s(student_feat)
            t = self.embed_t(teacher_feat.detach())
            if negatives is None:
                negatives = self.sampler(index, self.num_negatives)
            positives = (self.teacher_bank.positive(index, t), self.student_bank.positive(index, s))
            banks = (self.teacher_bank.memory, self.student_bank.memory)
            with torch.no_grad():
                scores = crd_scores(s, t, positives[1], positives[0], banks[1], banks[0], negatives)
            stored = self.normalizer.to(s.dtype)
            estimate = _estimate(scores, self.num_data, self.temperature)
            sync = self.training and global_relations_enabled()
            if sync:
                estimate = reduce_mean(estimate)
            z = torch.where(stored > 0, stored, estimate)
            loss = _nce_terms((s, t), scores, positives, banks, negatives, z, self.num_data, self.temperature)
            if self.training:
                self.normalizer.copy_(z)
                if sync:
                    index = all_gather(index)
                    s, t = all_gather(torch.cat([s, t], -1).detach()).split(s.shape[-1], -1)
                self.student_bank.update(index, s)
                self.teacher_bank.update(index, t)
        check_finite("crd", "loss", loss)
        return loss

    def distill(
        self,
        student: Mapping[str, Any],
        teacher: Mapping[str, Any],
        batch: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        (feat,) = self.taps
        if batch is None or "index" not in batch:
            raise KeyError("crd needs the dataset indices of the batch as batch['index']")
        return self(student[feat], teacher[feat], batch["index"])

    def extra_repr(self) -> str:
        return (
            f"num_data={self.num_data}, num_negatives={self.num_negatives}, "
            f"temperature={self.temperature}, bank={self.bank!r}, negatives={self.negatives!r}"
        )
