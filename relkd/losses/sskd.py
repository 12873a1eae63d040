r"""Knowledge distillation meets self-supervision (SSKD).

Every image of a batch is shown four times, rotated by 0, 90, 180 and 270 degrees
(:func:`rotate_views`). Both networks get a projection head ``g: F -> F -> F`` (linear, ReLU, linear)
on their pooled embedding, and the rotated views are related to the unrotated ones: ``A`` is the
``3N x N`` matrix of cosine similarities between the projection of each rotated view and those of
the ``N`` unrotated views (a :class:`relkd.graphs.BipartiteGraph`), whose positive entries are the
views' own source images. The student loss is

.. math::
    \mathcal{L} = w_{kd} \, \mathrm{KL}_{T_{kd}}\big(z^t_{nor} \,\|\, z^s_{nor}\big)
    + w_{tf} \, \mathrm{KL}_{T_{tf}}\big(z^t_{rot} \,\|\, z^s_{rot}\big)\big|_{M_{tf}}
    + w_{ss} \, \mathrm{KL}_{T_{ss}}\big(A^t \,\|\, A^s\big)\big|_{M_{ss}}

with :math:`\mathrm{KL}_T(a \| b) = T^2 \frac{1}{|M|} \sum_{i \in M} \mathrm{KL}(\mathrm{softmax}(a_i / T)
\| \mathrm{softmax}(b_i / T))` over the rows ``M`` kept by the error filter (:func:`error_filter`):
rows where the teacher ranks the true class (``M_tf``) or the true source image (``M_ss``) first, plus
the best-ranked fraction ``r`` of the other rows. The cross-entropy on the unrotated labelled rows
(weight 0.1) is the trainer's. Before distillation the teacher's head is trained alone, the teacher
frozen (:func:`sskd_pretrain`): cross-entropy over each row of ``A^t``, the target its source image.

Xu, Liu, Li & Loy, "Knowledge Distillation Meets Self-Supervision", ECCV 2020. Defaults follow the
authors' code (github.com/xuguodong03/SSKD, ``student.py``, ``wrapper.py``, ``cifar.py``): weights
0.1 (cross-entropy), 0.9, 2.7, 10; temperatures 4, 4, 0.5, each KL multiplied by ``T^2`` (0.25 for the
similarity term); ratios ``r = 1.0`` (rotated logits) and 0.75 (similarities); the head pre-training
has no temperature (the cosines are the logits); batch-mean KL over the kept rows. Where we differ:

- Layout: the authors' data set returns the 4 views of an image together, so the flattened batch is
  image-major: row ``4i + k`` is image ``i`` rotated by ``k * 90`` degrees (``np.rot90``'s direction,
  from the first spatial axis towards the second, which is ``torch.rot90(x, k, dims=(-2, -1))`` on
  ``[..., H, W]``). We keep that layout; rotated rows are ordered ``(i, k = 1, 2, 3)``.
- The authors rotate each image before their random crop, so every view gets its own crop (the flip
  is shared). Here the rotation is a batch transform applied after the loader's augmentation: the four
  views share one crop.
- Ranks: the true class's rank is the number of classes scored strictly higher (ties favour the
  true class); among wrong rows of equal rank the earlier row is kept first. The authors' unstable
  ``argsort`` breaks both ties arbitrarily.
- A filter that keeps no row gives 0 (the authors' batch mean would be NaN).
- Rows without a label (target ``-1``, the transfer images of the data-efficient setting, or every
  row when no labels are given) are distilled like the others. The logit filter cannot judge them and
  keeps them; they count as neither correct nor wrong, so ``r`` applies to the labelled wrong rows
  only. The similarity filter needs no label (the target is the source image) and treats every row
  alike.
- With one image the similarity matrix has a single column, and its term is 0.
- Under global relations (:mod:`relkd.distributed`) the projections are gathered from every rank, so
  ``A`` relates the rotated views to the unrotated images of the global batch.
- The student's projection head is trained with the student, as in the authors' code; the teacher's
  head runs without gradient during distillation (the authors leave it out of the optimiser).

Shapes:
    logits ``[4N, C]``, embeddings ``[4N, F_s]`` / ``[4N, F_t]`` (image-major views), labels ``[N]``
    (or ``[4N]`` view targets in the batch) -> scalar.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from relkd._debug import check_finite
from relkd.distributed import all_gather, global_relations_enabled
from relkd.graphs import cross_cosine, ops
from relkd.losses.base import DistillLoss
from relkd.losses.kd import kd
from relkd.losses.registry import register

__all__ = [
    "VIEWS",
    "ProjectionHead",
    "SSKDLoss",
    "error_filter",
    "rotate_views",
    "rotation_batch",
    "rotation_similarity",
    "rotation_sources",
    "split_views",
    "sskd",
    "sskd_pretrain",
]
FUNCTIONAL = ("sskd", "sskd_pretrain")

VIEWS = 4
VIEW_TARGET = "view_target"


def rotate_views(inputs: torch.Tensor) -> torch.Tensor:
    """Each image as its 4 rotations, image-major: row ``4i + k`` is image ``i`` rotated by ``k * 90``
    degrees (``torch.rot90(x, k, dims=(-2, -1))``, the direction of the authors' ``np.rot90``).

    Raises ``ValueError`` for non-square images: a 90-degree rotation of an ``H x W`` image is
    ``W x H`` and cannot be stacked with the unrotated view; crop or resize to a square first.

    Shapes:
        ``[N, ..., H, W]`` with ``H == W`` -> ``[4N, ..., H, W]``.
    """
    if inputs.dim() < 3:
        raise ValueError(f"rotate_views: expected images [N, ..., H, W], got shape {tuple(inputs.shape)}")
    h, w = inputs.shape[-2:]
    if h != w:
        raise ValueError(
            f"rotate_views: a 90-degree rotation of a {h}x{w} image is {w}x{h} and cannot be stacked with "
            "the unrotated view; use square images (e.g. a square crop)"
        )
    views = torch.stack([torch.rot90(inputs, k, dims=(-2, -1)) for k in range(VIEWS)], dim=1)
    return views.flatten(0, 1)


def rotation_batch(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch of the ``4N`` views of :func:`rotate_views` (image-major).

    ``input`` is rotated; every other per-row field (``index`` ...) is repeated for each view of its
    image. ``target`` keeps the labels of the unrotated rows and is ``-1`` on the rotated rows, so a
    cross-entropy that reads rows with target ``>= 0`` sees the unrotated labelled images only;
    ``view_target`` holds the source image's target on every row (``-1`` for transfer images) for the
    loss's error filter.

    Shapes:
        ``{input: [N, ..., H, W], target: [N], ...}`` -> ``{input: [4N, ...], target: [4N],
        view_target: [4N], ...}``.
    """
    if "input" not in batch or "target" not in batch:
        raise KeyError(
            f"rotation_batch: expected a batch with 'input' and 'target', got keys {sorted(batch)}"
        )
    n = batch["input"].shape[0]
    out = {}
    for key, value in batch.items():
        if key == "input":
            out[key] = rotate_views(value)
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value.repeat_interleave(VIEWS, dim=0)
        else:
            out[key] = value
    rotated = torch.arange(n * VIEWS, device=batch["target"].device) % VIEWS != 0
    out[VIEW_TARGET] = out["target"]
    out["target"] = out["target"].masked_fill(rotated, -1)
    return out


def split_views(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unrotated [N, ...], rotated [3N, ...])`` rows of an image-major ``[4N, ...]`` tensor; the
    rotated rows in the order ``(image i, rotation k = 1, 2, 3)``."""
    if x.dim() < 1 or x.shape[0] % VIEWS:
        raise ValueError(
            f"expected {VIEWS} views per image (4N rows, image-major, from rotate_views), got shape "
            f"{tuple(x.shape)}"
        )
    views = x.unflatten(0, (x.shape[0] // VIEWS, VIEWS))
    return views[:, 0], views[:, 1:].flatten(0, 1)


def rotation_sources(num_images: int, device: torch.device | None = None) -> torch.Tensor:
    """The source image of each rotated row, ``[3N]``: ``(0, 0, 0, 1, 1, 1, ...)`` (the positive
    column of each row of :func:`rotation_similarity`)."""
    return torch.arange(num_images * (VIEWS - 1), device=device) // (VIEWS - 1)


def rotation_similarity(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[3N, N]`` between each rotated view and the ``N`` unrotated views of an
    image-major ``[4N, D]`` batch; row ``r``'s positive column is ``r // 3``."""
    normal, rotated = split_views(embeddings)
    return cross_cosine(rotated.flatten(1), normal.flatten(1))


def error_filter(scores: torch.Tensor, target: torch.Tensor, ratio: float) -> torch.Tensor:
    """SSKD's error-level ranking: which rows to distil, as a mask ``[R]``.

    A row is correct when the teacher scores its target highest (rank 0, the rank being the number of
    entries scored strictly higher than the target). Kept: every correct row, plus the
    ``floor(ratio * wrong)`` wrong rows of smallest rank (earlier rows first among equal ranks), plus
    every row whose target is unknown (``-1``). Computed on the device, without a host sync.

    Shapes:
        scores ``[R, K]`` (teacher logits, probabilities or similarities), target ``[R]`` -> bool ``[R]``.
    """
    if scores.dim() != 2 or target.shape != scores.shape[:1]:
        raise ValueError(
            f"error_filter: expected scores [R, K] and target [R], got {tuple(scores.shape)} and "
            f"{tuple(target.shape)}"
        )
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"error_filter: ratio must be in [0, 1], got {ratio}")
    rows = scores.shape[0]
    target = target.long()
    known = target >= 0
    true_score = scores.gather(1, target.clamp_min(0).unsqueeze(1))
    rank = (scores > true_score).sum(1)
    wrong = known & (rank > 0)
    budget = (wrong.sum().to(torch.float64) * ratio).floor().long()
    order = torch.arange(rows, device=scores.device)
    # Wrong rows first, by rank then position; the first `budget` of them are kept.
    key = torch.where(wrong, rank * rows + order, rows * (scores.shape[1] + 1) + order)
    position = torch.argsort(torch.argsort(key, stable=True), stable=True)
    return ~wrong | (position < budget)


def _global(x: torch.Tensor) -> torch.Tensor:
    """``x`` gathered from every rank under global relations (the rows stay image-major)."""
    return all_gather(x) if global_relations_enabled() else x


def _filtered_kl(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor, T: float) -> torch.Tensor:
    """``T^2`` times the mean over the kept rows of ``KL(softmax(teacher / T) || softmax(student / T))``;
    0 when no row is kept."""
    dtype = ops.compute_dtype(student.dtype)
    with ops.full_precision(student.device):
        log_p_s = F.log_softmax(student.to(dtype) / T, dim=1)
        log_p_t = F.log_softmax(teacher.detach().to(dtype) / T, dim=1)
        per_row = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)
        kept = keep.to(dtype)
        return T * T * (per_row * kept).sum() / kept.sum().clamp_min(1.0)


def _check(student_logits, teacher_logits, student_embed, teacher_embed, labels) -> None:
    for what, s, t in (
        ("logits", student_logits, teacher_logits),
        ("embeddings", student_embed, teacher_embed),
    ):
        if s.shape[0] != t.shape[0]:
            raise ValueError(
                f"sskd: expected student and teacher {what} with the same batch size, got {s.shape[0]} "
                f"and {t.shape[0]}"
            )
        split_views(s)
    if student_logits.shape[0] != student_embed.shape[0]:
        raise ValueError(
            f"sskd: expected logits and embeddings of the same {student_logits.shape[0]} views, got "
            f"{student_embed.shape[0]} embeddings"
        )
    if labels is not None and labels.shape != (student_logits.shape[0] // VIEWS,):
        raise ValueError(
            f"sskd: expected labels [N] for the N = {student_logits.shape[0] // VIEWS} source images, got "
            f"shape {tuple(labels.shape)}"
        )


def sskd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_embed: torch.Tensor,
    teacher_embed: torch.Tensor,
    labels: torch.Tensor | None = None,
    kd_weight: float = 0.9,
    tf_weight: float = 2.7,
    ss_weight: float = 10.0,
    kd_T: float = 4.0,
    tf_T: float = 4.0,
    ss_T: float = 0.5,
    tf_ratio: float = 1.0,
    ss_ratio: float = 0.75,
) -> torch.Tensor:
    """SSKD's three distillation terms, weighted and summed (module docstring), on image-major views.

    Args:
        student_logits, teacher_logits: ``[4N, C]``.
        student_embed, teacher_embed: the heads' projections ``[4N, D_s]``, ``[4N, D_t]``.
        labels: ``[N]`` labels of the source images, ``-1`` where unknown; None: all unknown.
    """
    _check(student_logits, teacher_logits, student_embed, teacher_embed, labels)
    for what, x in (("student", student_logits), ("teacher", teacher_logits)):
        check_finite("sskd", f"{what} logits", x)
    s_nor, s_rot = split_views(student_logits)
    t_nor, t_rot = split_views(teacher_logits.detach())
    n = s_nor.shape[0]
    if labels is None:
        labels = torch.full((n,), -1, dtype=torch.long, device=student_logits.device)
    rotated_labels = labels.to(student_logits.device)[rotation_sources(n, student_logits.device)]
    keep_tf = error_filter(t_rot, rotated_labels, tf_ratio)
    a_s = rotation_similarity(_global(student_embed))
    a_t = rotation_similarity(_global(teacher_embed.detach()))
    keep_ss = error_filter(a_t, rotation_sources(a_t.shape[1], a_t.device), ss_ratio)
    loss = (
        kd_weight * kd(s_nor, t_nor, T=kd_T)
        + tf_weight * _filtered_kl(s_rot, t_rot, keep_tf, tf_T)
        + ss_weight * _filtered_kl(a_s, a_t, keep_ss, ss_T)
    )
    check_finite("sskd", "loss", loss)
    return loss


def sskd_pretrain(teacher_embed: torch.Tensor) -> torch.Tensor:
    """The teacher head's objective: mean cross-entropy over the rows of the ``[3N, N]`` similarity
    matrix of the teacher's projections ``[4N, D]``, each row's target its source image (no
    temperature)."""
    split_views(teacher_embed)
    a = rotation_similarity(_global(teacher_embed))
    with ops.full_precision(a.device):
        return F.cross_entropy(a, rotation_sources(a.shape[1], a.device))


class ProjectionHead(nn.Module):
    """The authors' head ``g(f) = W_2 ReLU(W_1 f + b_1) + b_2`` with ``W_1, W_2`` of ``dim x dim``.

    Runs in the weights' dtype outside autocast (the relations after it are float32 anyway).

    Shapes:
        ``[B, dim]`` (or ``[B, ...]`` with ``dim`` values per sample) -> ``[B, dim]``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        dim = self.net[0].in_features
        if x.shape[1] != dim:
            raise ValueError(
                f"expected features with {dim} values per sample, got {x.shape[1]}; pass the width of "
                "the tapped feature as student_dim / teacher_dim"
            )
        with ops.full_precision(x.device):
            return self.net(x.to(self.net[0].weight.dtype))


@register("sskd")
class SSKDLoss(DistillLoss):
    """Module form of :func:`sskd`: owns both projection heads and the teacher head's pre-training.

    Trained in two stages (``pretrain = True``):

    1. The teacher head alone, the teacher frozen and in eval mode (the authors: 60 epochs, SGD
       momentum 0.9, lr 0.05, weight decay 5e-4, lr x0.1 at epochs 30 and 45), on rotated batches::

           loss.pretrain_step(teacher_feats, batch).backward()   # optimise loss.teacher_head

    2. ``loss.freeze_heads()`` (the teacher head stops requiring gradients), then distil with
       ``loss.distill(student_feats, teacher_feats, batch)``; the student head trains with the student.

    The batch must come from :func:`rotation_batch` (the ``rotate4`` batch transform): ``distill``
    reads the source images' labels from ``batch["view_target"]``. Distilling before
    ``freeze_heads()`` freezes the teacher head on the spot, with a warning.

    Args:
        student_dim, teacher_dim: widths of the pooled embeddings (the engine fills them in).
        kd_weight, tf_weight, ss_weight: weights of the three terms; kd_T, tf_T, ss_T: their
            temperatures; tf_ratio, ss_ratio: the error filters' kept fractions of wrong rows.

    Config::

        losses:
          sskd: {weight: 1.0}
        train: {ce_weight: 0.1, batch_transform: {name: rotate4}}
    """

    taps = ("penultimate", "logits")
    pretrain: ClassVar[bool] = True

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        kd_weight: float = 0.9,
        tf_weight: float = 2.7,
        ss_weight: float = 10.0,
        kd_T: float = 4.0,
        tf_T: float = 4.0,
        ss_T: float = 0.5,
        tf_ratio: float = 1.0,
        ss_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        for name, T in (("kd_T", kd_T), ("tf_T", tf_T), ("ss_T", ss_T)):
            if T <= 0:
                raise ValueError(f"sskd: {name} must be positive, got {T}")
        for name, r in (("tf_ratio", tf_ratio), ("ss_ratio", ss_ratio)):
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"sskd: {name} must be in [0, 1], got {r}")
        self.options = {
            "kd_weight": kd_weight,
            "tf_weight": tf_weight,
            "ss_weight": ss_weight,
            "kd_T": kd_T,
            "tf_T": tf_T,
            "ss_T": ss_T,
            "tf_ratio": tf_ratio,
            "ss_ratio": ss_ratio,
        }
        self.student_head = ProjectionHead(student_dim)
        self.teacher_head = ProjectionHead(teacher_dim)
        self._frozen = False

    @property
    def heads_frozen(self) -> bool:
        return self._frozen

    def freeze_heads(self) -> None:
        """End of the teacher head's training: it stops requiring gradients (the student head trains
        on)."""
        self.teacher_head.requires_grad_(False)
        self._frozen = True

    def pretrain_step(
        self, teacher: Mapping[str, Any], batch: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """:func:`sskd_pretrain` through the teacher head on the teacher's tapped features
        (``{tap: tensor}``, like ``distill``; rotated views)."""
        if self._frozen:
            raise RuntimeError("sskd: the teacher head is frozen; pretrain before calling freeze_heads()")
        feat = teacher[self.taps[0]].detach()
        return sskd_pretrain(self.teacher_head(feat))

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_feat: torch.Tensor,
        teacher_feat: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss from logits ``[4N, C]`` and pooled embeddings ``[4N, F]`` (before the heads);
        ``labels`` ``[N]`` of the source images (``-1`` or None: unknown)."""
        if not self._frozen:
            # once per loss: it freezes itself right after
            warnings.warn(
                "sskd: distilling through a teacher head that was not frozen; freezing it now. Run "
                "pretrain_step on the teacher, then freeze_heads(), before distilling",
                stacklevel=2,
            )
            self.freeze_heads()
        s = self.student_head(student_feat)
        with torch.no_grad():
            t = self.teacher_head(teacher_feat.detach())
        return sskd(student_logits, teacher_logits, s, t, labels, **self.options)

    def distill(
        self,
        student: Mapping[str, Any],
        teacher: Mapping[str, Any],
        batch: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        feat, logits = self.taps
        batch = batch or {}
        if VIEW_TARGET not in batch and "target" in batch:
            raise KeyError(
                "sskd: the batch has no 'view_target'; train with the rotate4 batch transform "
                "(train: {batch_transform: {name: rotate4}}), which makes the 4 rotated views"
            )
        labels = batch.get(VIEW_TARGET)
        if labels is not None:
            labels = split_views(labels)[0]
        return self(student[logits], teacher[logits], student[feat], teacher[feat], labels)

    def get_extra_state(self) -> dict[str, bool]:
        return {"heads_frozen": self._frozen}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        if state.get("heads_frozen", False):
            self.freeze_heads()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items()) + f", heads_frozen={self._frozen}"
