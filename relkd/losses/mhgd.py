r"""Graph-based knowledge distillation by multi-head attention network (MHGD).

Each tapped layer ``l`` gives every sample one vector: the leading right singular vector of its
``HW x C_l`` feature matrix (teacher: canonical sign; student: the best aligned of its top 4, see
:func:`relkd.graphs.svd.aligned_singular_vectors`). Between consecutive layers, ``H`` attention heads
relate the samples of the batch:

.. math::
    G^{(l)}_{h,i,j} = \big\langle [\mathrm{BN}(W_K v^{(l+1)}_i)]_h, \, [\mathrm{BN}(W_Q v^{(l)}_j)]_h
    \big\rangle, \qquad P^{(l)}_{h,i,:} = \mathrm{softmax}_j\big(\tanh G^{(l)}_{h,i,:}\big),

    \mathcal{L}_{\text{MHGD}} = \sum_l \sum_{h,i} \mathrm{KL}\big(P^{(l),s}_{h,i,:} \,\|\,
    P^{(l),t}_{h,i,:}\big)

with per-head width ``d = (C_l + C_{l+1}) // 2``. The heads are first trained on the teacher alone
(:meth:`MHGDLoss.pretrain_loss`): an estimator predicts each sample's back-layer vector from the
attention-weighted front-layer vectors of the batch,

.. math::
    \hat v^{(l+1)}_i = \mathrm{normalize}\Big(W_2 \, \big\Vert_h \sum_j m_{h,i} \,
    \mathrm{softmax}_j(G^{(l)}_{h,i,:}) \, \mathrm{ReLU}(\mathrm{BN}(W_1 v^{(l)}_j)) + b_2\Big), \qquad
    \mathcal{L}_{\text{pre}} = \sum_l \frac{1}{B} \sum_i \big(1 - \hat v^{(l+1)}_i \cdot v^{(l+1)}_i\big)

where ``m_{h,i}`` drops about half of the heads at random per sample (kept where a standard normal draw
exceeds its mean over the heads). The heads' own objective adds ``head_decay * sum(theta^2)`` over
every head parameter ``theta`` (:meth:`MHGDLoss.pretrain_loss`). Then the heads are frozen and the
student distils through them.

Lee & Song, "Graph-based Knowledge Distillation by Multi-head Attention Network", BMVC 2019. Defaults
follow the authors' CIFAR-100 code (github.com/sseung0703/KD_methods_with_TF ``nets/Relation.py``,
``op_util.py`` ``Optimizer_w_MHGD``, ``train_w_distill.py``; the MHGD row of its README): 8 heads, the
last block of each stage tapped, teacher top-1 vector, student top-4 candidates, batch-norm running
statistics in the distillation graph, ``KL(student || teacher)`` (the student's distribution first, as
their ``kld_loss(G_S, G_T)``), a plain sum (``reduction="sum"``; ``"mean"`` averages over the
``H * B`` rows), weight 1 next to the cross-entropy. Their recipe around the loss, which the ``mhgd``
method reproduces:

- the heads train alone for ``init_epoch = 40`` epochs first (SGD, Nesterov momentum 0.9, lr 0.1,
  constant), on ``mha_loss + 5e-4 * sum(v^2)`` over the heads' weights, biases and batch-norm scales
  and shifts (``head_decay=5e-4``; its gradient ``1e-3 v`` is an SGD weight decay of 1e-3, so the
  heads' optimiser has none of its own);
- then the student trains with the heads frozen, its distillation gradient clipped per variable to
  the cross-entropy gradient's norm times ``sigmoid(epoch - init_epoch)``, ``epoch`` the integer epoch
  counted from the start of head training, i.e. ``sigmoid(e)`` with ``e`` the 0-based epoch of the
  distillation stage (``train: {clip_to_ce: true, clip_to_ce_ramp: sigmoid}``).

Where we differ, and why:

- The teacher's vector gets a canonical sign (:func:`relkd.graphs.svd.canonical_sign`); the authors use
  whatever their SVD returns, which makes the teacher graph depend on arbitrary per-sample signs.
- The SVD backward is bounded on (near-)repeated singular values
  (:func:`relkd.graphs.svd.truncated_svd`) instead of zeroing NaN gradients.
- Head dropping needs two heads to compare; with ``num_heads=1`` no head is dropped (the authors'
  rule would drop every head).
- A batch of one sample cannot give batch statistics: pretraining then uses the running statistics.
- Under global relations (:mod:`relkd.distributed`) the vectors are gathered from every rank, so the
  graphs (and the heads' batch statistics in pretraining) span the global batch.
- The authors clip the distillation gradient to the cross-entropy's norm, which the default ``sum``
  relies on (at initialisation its gradient is hundreds of times the cross-entropy's): the engine does
  it with ``train.clip_to_ce``; in one's own loop call ``relkd.train.clip_to_ce_backward(ce, loss,
  params, ramp=relkd.train.sigmoid(epoch - head_epochs))`` instead of ``backward()``
  (``examples/multi_map.py``).

Shapes:
    student, teacher: lists of ``L >= 2`` feature maps ``[B, C_l, *spatial_l]`` -> scalar.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from relkd.distributed import all_gather, global_relations_enabled
from relkd.graphs import ops
from relkd.graphs.svd import aligned_singular_vectors, canonical_sign, feature_matrix, truncated_svd
from relkd.losses._inputs import reduce, warn_once
from relkd.losses.base import DistillLoss
from relkd.losses.kdsvd import build_connectors, check_feature_lists, connect
from relkd.losses.registry import register

__all__ = ["mhgd", "mhgd_pretrain", "AttentionHeads", "MHGDLoss"]
FUNCTIONAL = (
    "mhgd",
    "mhgd_pretrain",
)


class _LinearBN(nn.Module):
    """``BN(W x)``; ``batch_stats`` picks batch statistics (and updates the running ones) or not."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, x: torch.Tensor, batch_stats: bool) -> torch.Tensor:
        bn = self.bn
        return F.batch_norm(
            self.linear(x),
            bn.running_mean,
            bn.running_var,
            bn.weight,
            bn.bias,
            training=batch_stats and x.shape[0] > 1,
            momentum=bn.momentum,
            eps=bn.eps,
        )


class AttentionHeads(nn.Module):
    """The attention heads between a front layer (``front_dim``) and the next (``back_dim``), plus the
    estimator that pretrains them.

    Attributes:
        key, query: ``W_K`` (back layer) and ``W_Q`` (front layer), each linear + batch norm.
        embed, out: the estimator's ``W_1`` (linear + batch norm + ReLU) and ``W_2`` (linear + bias).
    """

    def __init__(self, front_dim: int, back_dim: int, num_heads: int = 8) -> None:
        super().__init__()
        self.front_dim, self.back_dim, self.num_heads = front_dim, back_dim, num_heads
        self.width = (front_dim + back_dim) // 2
        self.key = _LinearBN(back_dim, self.width * num_heads)
        self.query = _LinearBN(front_dim, self.width * num_heads)
        self.embed = _LinearBN(front_dim, self.width)
        self.out = nn.Linear(self.width * num_heads, back_dim)

    def graph(self, front: torch.Tensor, back: torch.Tensor, batch_stats: bool) -> torch.Tensor:
        """``G_{h,i,j}`` between back-layer sample ``i`` and front-layer sample ``j``: ``[H, B, B]``."""
        b = back.shape[0]
        # The authors' layout: features laid out [width, heads], heads fastest.
        k = self.key(back, batch_stats).view(b, self.width, self.num_heads).permute(2, 0, 1)
        q = self.query(front, batch_stats).view(b, self.width, self.num_heads).permute(2, 1, 0)
        return k @ q

    def estimate(
        self, front: torch.Tensor, graph: torch.Tensor, batch_stats: bool, drop_heads: bool
    ) -> torch.Tensor:
        """The estimator's unit-norm guess of the back-layer vectors ``[B, back_dim]``."""
        h, b = self.num_heads, front.shape[0]
        attn = graph.softmax(-1)
        if drop_heads and h > 1:
            noise = torch.randn(h, b, 1, device=attn.device, dtype=attn.dtype)
            attn = attn * (noise > noise.mean(0, keepdim=True)).to(attn.dtype)
        f = F.relu(self.embed(front, batch_stats))
        mixed = (attn @ f).permute(1, 0, 2).reshape(b, h * self.width)
        return F.normalize(self.out(mixed), dim=-1)

    def extra_repr(self) -> str:
        return f"front_dim={self.front_dim}, back_dim={self.back_dim}, num_heads={self.num_heads}"


def _teacher_vectors(teacher: Sequence[torch.Tensor], eps: float) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            canonical_sign(truncated_svd(feature_matrix(t.detach()), 1, eps=eps)[1])[..., 0] for t in teacher
        ]


def _global(vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The vectors of the global batch under global relations (:mod:`relkd.distributed`)."""
    return [all_gather(v) for v in vectors] if global_relations_enabled() else vectors


def _dtype(heads: Sequence[AttentionHeads]) -> torch.dtype:
    return heads[0].out.weight.dtype


def _check_heads(name: str, heads: Sequence[AttentionHeads], dims: list[int]) -> None:
    pairs = [(h.front_dim, h.back_dim) for h in heads]
    if pairs != list(zip(dims, dims[1:], strict=False)):
        raise ValueError(
            f"{name}: the heads were built for layer widths {pairs}, but the teacher's features have "
            f"widths {dims}; build the loss with the teacher's channels"
        )


def mhgd(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    heads: Sequence[AttentionHeads],
    candidates: int = 4,
    reduction: str = "sum",
    eps: float = 1e-4,
) -> torch.Tensor:
    """MHGD distillation loss through ``heads`` (one per consecutive layer pair, used with their
    running batch-norm statistics); see the module docstring for the formula."""
    check_feature_lists("mhgd", student, teacher)
    _check_heads("mhgd", heads, [t.shape[1] for t in teacher])
    with ops.full_precision(student[0].device):
        vs, vt = [], []
        for s, t in zip(student, teacher, strict=True):
            v_s, v_t, _ = aligned_singular_vectors(s, t, 1, candidates, eps=eps)
            vs.append(v_s[..., 0].to(_dtype(heads)))
            vt.append(v_t[..., 0].to(_dtype(heads)))
        vs, vt = _global(vs), _global(vt)
        if vs[0].shape[0] < 2:
            warn_once("mhgd", "mhgd: a batch of 1 sample has no relation to distil; the loss is 0")
        total = None
        for head, s_f, s_b, t_f, t_b in zip(heads, vs, vs[1:], vt, vt[1:], strict=False):
            with torch.no_grad():
                log_p_t = head.graph(t_f, t_b, batch_stats=False).tanh().log_softmax(-1)
            log_p_s = head.graph(s_f, s_b, batch_stats=False).tanh().log_softmax(-1)
            rows = log_p_s.shape[0] * log_p_s.shape[1]
            kl = (log_p_s.exp() * (log_p_s - log_p_t)).sum() / rows
            term = reduce(kl, rows, reduction, "mhgd")
            total = term if total is None else total + term
    return total


def mhgd_pretrain(
    teacher: Sequence[torch.Tensor],
    heads: Sequence[AttentionHeads],
    drop_heads: bool = True,
    batch_stats: bool = True,
    eps: float = 1e-4,
) -> torch.Tensor:
    """The heads' pretraining objective on the teacher's features (module docstring,
    ``L_pre``); gradients reach the heads only."""
    check_feature_lists("mhgd_pretrain", teacher, teacher)
    _check_heads("mhgd_pretrain", heads, [t.shape[1] for t in teacher])
    with ops.full_precision(teacher[0].device):
        vt = _global([v.to(_dtype(heads)) for v in _teacher_vectors(teacher, eps)])
        total = None
        for head, front, back in zip(heads, vt, vt[1:], strict=False):
            graph = head.graph(front, back, batch_stats)
            guess = head.estimate(front, graph, batch_stats, drop_heads)
            term = (1.0 - (guess * back).sum(-1)).mean()
            total = term if total is None else total + term
    return total


@register("mhgd")
class MHGDLoss(DistillLoss):
    """Module form of :func:`mhgd` that owns the heads (``loss.heads``) and their two-stage training.

    The engine runs two stages (``pretrain = True``):

    1. Pretrain the heads on the teacher. Optimise ``loss.heads.parameters()`` (the authors: 40
       epochs, SGD with Nesterov momentum 0.9, lr 0.1, no weight decay besides ``head_decay``); each
       step, with the teacher in eval mode and the loss module in train mode (batch-norm
       statistics)::

           loss.pretrain_step(teacher_feats, batch).backward()  # teacher_feats: {tap: tensor}

    2. Call ``loss.freeze_heads()``, then distil like any loss: ``loss.distill(student_feats,
       teacher_feats, batch)``. The heads get no gradient; the connectors (built where
       ``student_channels`` and ``teacher_channels`` differ) are trained with the student through
       ``loss.parameters()``.

    Distilling with heads that were never frozen freezes them on the spot, with a warning. The heads
    are built from ``teacher_channels``; without it they are built on the first call from the
    teacher's feature shapes, so the head optimiser must be created after that call.

    Args:
        student_channels, teacher_channels: channels of each tapped layer (connectors where they
            differ; the heads are built from the teacher's).
        num_heads: attention heads per layer pair; candidates: student vectors offered to the
            alignment; reduction: ``"sum"`` or ``"mean"``; drop_heads: random head dropping in
            pretraining; eps: relative bound on the SVD backward.
        head_decay: ``lambda`` of the penalty ``lambda * sum(theta^2)`` that :meth:`pretrain_loss` adds
            over the head parameters (the authors' 5e-4).

    Config (the authors' recipe; the ``mhgd`` method adds the stages and the clipping)::

        losses:
          mhgd: {weight: 1.0, num_heads: 8, head_decay: 5.0e-4}
    """

    taps = ("stage1", "stage2", "stage3")
    pretrain: ClassVar[bool] = True

    def __init__(
        self,
        student_channels: Sequence[int] | None = None,
        teacher_channels: Sequence[int] | None = None,
        num_heads: int = 8,
        candidates: int = 4,
        reduction: str = "sum",
        drop_heads: bool = True,
        eps: float = 1e-4,
        head_decay: float = 5e-4,
    ) -> None:
        super().__init__()
        if num_heads < 1 or candidates < 1:
            raise ValueError(f"mhgd: num_heads and candidates must be >= 1, got {num_heads} and {candidates}")
        if head_decay < 0:
            raise ValueError(f"mhgd: head_decay must be >= 0, got {head_decay}")
        self.num_heads, self.candidates, self.reduction = num_heads, candidates, reduction
        self.drop_heads, self.eps, self.head_decay = drop_heads, eps, head_decay
        self.connectors = build_connectors(student_channels, teacher_channels)
        self.heads = nn.ModuleList()
        self._frozen = False
        if teacher_channels is not None:
            self._build_heads(list(teacher_channels))

    def _build_heads(self, dims: list[int], device: torch.device | None = None) -> None:
        self.heads.extend(AttentionHeads(f, b, self.num_heads) for f, b in zip(dims, dims[1:], strict=False))
        if device is not None:
            self.heads.to(device)

    def _ensure_heads(self, teacher: Sequence[torch.Tensor]) -> None:
        if not len(self.heads) and not isinstance(teacher, torch.Tensor) and len(teacher) >= 2:
            self._build_heads([t.shape[1] for t in teacher], teacher[0].device)

    @property
    def heads_frozen(self) -> bool:
        return self._frozen

    def freeze_heads(self) -> None:
        """End of pretraining: the heads stop requiring gradients and use their running statistics."""
        self.heads.requires_grad_(False)
        self._frozen = True

    def pretrain_loss(self, teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        """:func:`mhgd_pretrain` on the teacher's stage features (batch statistics in train mode) plus
        ``head_decay * sum(theta^2)`` over the head parameters."""
        if self._frozen:
            raise RuntimeError("mhgd: the heads are frozen; pretrain before calling freeze_heads()")
        self._ensure_heads(teacher)
        loss = mhgd_pretrain(teacher, self.heads, self.drop_heads, batch_stats=self.training, eps=self.eps)
        if self.head_decay:
            loss = loss + self.head_decay * sum(p.square().sum() for p in self.heads.parameters())
        return loss

    def pretrain_step(
        self, teacher: Mapping[str, Any], batch: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """:meth:`pretrain_loss` on the teacher's tapped features (``{tap: tensor}``, like ``distill``)."""
        return self.pretrain_loss([teacher[k] for k in self.taps])

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        self._ensure_heads(teacher)
        if not self._frozen:
            # once per loss: it freezes itself right after
            warnings.warn(
                "mhgd: distilling through heads that were not frozen; freezing them now. Run "
                "pretrain_step on the teacher, then freeze_heads(), before distilling",
                stacklevel=2,
            )
            self.freeze_heads()
        return mhgd(
            connect(self.connectors, student),
            teacher,
            self.heads,
            candidates=self.candidates,
            reduction=self.reduction,
            eps=self.eps,
        )

    def get_extra_state(self) -> dict[str, bool]:
        return {"heads_frozen": self._frozen}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        if state.get("heads_frozen", False):
            self.freeze_heads()

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, candidates={self.candidates}, head_decay={self.head_decay}, "
            f"reduction={self.reduction!r}, heads_frozen={self._frozen}"
        )
