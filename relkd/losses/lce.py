r"""Learning Compatible Embeddings (LCE): a new model whose embeddings an old model's gallery can search.

**Phase A** (the old model :math:`\phi_o`, frozen: the run's teacher). Over the labelled training set,
for each class :math:`k`

.. math::
    c_k = \mathrm{normalize}\Big(\frac{1}{n_k} \sum_{y_i = k} \mathrm{normalize}\big(\phi_o(x_i)\big)\Big),
    \qquad b_k = \min_{y_i = k} \cos\big(\phi_o(x_i), c_k\big),

the class centres :math:`C \in \mathbb{R}^{K \times d_o}` and boundaries :math:`b \in \mathbb{R}^K`.

**Phase B** (the new model :math:`\phi_n`, embeddings :math:`f_i`, trained with an ArcFace classifier
:math:`W \in \mathbb{R}^{K \times d_n}`, :math:`\tilde W` its unit rows):

.. math::
    \mathcal{L} = \mathcal{L}_{\text{ArcFace}}(f, W) + \lambda_a \mathcal{L}_{\text{align}}
    + \lambda_b \mathcal{L}_{\text{bound}}, \qquad
    \mathcal{L}_{\text{align}} = \frac{1}{K d} \sum_{k, j} (\tilde W_{kj} - C_{kj})^2, \qquad
    \mathcal{L}_{\text{bound}} = \frac{1}{B} \sum_i \max\big(0,\, b_{y_i} - \cos(f_i, c_{y_i})\big).

When the two embedding spaces differ (widths or semantics), a forward transform :math:`T_f` (old to
new) and a backward one :math:`T_b` (new to old) are learned with the new model:
:math:`\mathcal{L}_{\text{align}} = \tfrac12 [\mathrm{MSE}(\tilde W, T_f(C)) + \mathrm{MSE}(T_b(\tilde W),
C)]` and the boundary term compares :math:`T_b(f_i)` with :math:`c_{y_i}`. Each transform is a stack of
residual bottleneck ("RBT") blocks, :math:`x \mapsto x + \sum_p P_p(x)`, every path :math:`P_p` being
Linear → 16 → 16 → out, each Linear (no bias) followed by batch norm and PReLU (:class:`RBTBlock`).

Meng, Zhang, Xu & Zhou, "Learning Compatible Embeddings", ICCV 2021. Defaults follow the authors' code
(github.com/IrvingMeng/LCE: ``main.py`` ``train`` and ``save_lcefeat``, ``models/trans.py``
``RBTBlock``, ``models/__init__.py``, ``configs/default.py``, ``scripts/train_lce.sh``):
:math:`\lambda_a = 100`, :math:`\lambda_b = 1`, ArcFace :math:`s = 16`, :math:`m = 0.1` (see
:mod:`relkd.losses.arcface`), the MSE a mean over all :math:`K d` entries and the boundary term a
mean over the batch; transforms of 4 blocks of 4 paths of width 16, batch norm with ``eps = 2e-5`` and
``momentum = 0.9`` (torch's convention: the new batch weighs 0.9). Where we differ, and why:

- **The boundary cosine** (``boundary_on``). The code takes :math:`\langle f_i, c_{y_i} \rangle` of the
  *un-normalised* embedding (the backbone's batch-norm output) and clamps it to :math:`[-1, 1]` (with
  transforms: :math:`\langle T_b(f_i), c_{y_i} \rangle`, unclamped), which is a cosine only for unit
  :math:`f_i`. The paper's criterion is a cosine, as :math:`b_k` is, so ``"normalized"`` (default)
  compares :math:`\cos(f_i, c_{y_i})` (with transforms :math:`\cos(T_b(\hat f_i), c_{y_i})`,
  :math:`\hat f_i` the unit embedding, the domain :math:`T_b` is aligned on: the unit rows of
  :math:`W`); ``"raw"`` is the code's form.
- **Fitting the centres.** The code embeds the whole training set once with test-time preprocessing
  and adds the embedding of the horizontally flipped image. Here the centres are accumulated over the
  training batches of one epoch per pass (:meth:`LCELoss.fit_step`, :meth:`LCELoss.boundary_step`),
  with whatever augmentation the run's training data has and no flip; each labelled image counts once
  (by ``batch["index"]``, when the loss knows ``num_data``), however often the epoch repeats it.
- **When transforms are learned.** The code learns them only when asked (``USE_TRANS``, off by
  default); without them it needs equal widths. ``transform=None`` (default) learns them exactly when
  the widths differ, so equal widths give the code's default and different widths do not fail.
- **Transforms between different widths.** The released blocks add their input to the paths' output,
  so they need equal widths (the code's transform branch also refers to undefined names and never ran
  as released). Where the widths differ, the first block's skip connection is a linear map (no bias).
- Classes without a labelled image have no centre: they are left out of both terms (with a warning);
  the code's classes all have images.
- Rows with target ``-1`` (unlabelled transfer images) are left out of every term and of the fitting.
- Under data parallelism each rank accumulates its shard; the passes' ends (``finalize_*``) sum the
  class sums and take the minimum of the cosines over ranks.

The classifier :math:`W` is the :class:`relkd.losses.ArcFaceLoss` this loss owns (``loss.arcface``):
the ArcFace term and the alignment act on one parameter, so the method has one term, ``lce``, and
``ce_weight: 0`` (the network's own classifier is not trained).

Shapes:
    embeddings ``[B, d_n]`` (or ``[B, ...]``), target ``[B]`` -> scalar; teacher features in the
    fitting passes ``[B, d_o]``; centres ``[K, d_o]``, boundaries ``[K]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from relkd import distributed as D
from relkd._debug import check_finite
from relkd.graphs.ops import compute_dtype, full_precision
from relkd.losses.arcface import ArcFaceLoss
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register

__all__ = [
    "class_centres",
    "class_boundaries",
    "lce_align",
    "lce_boundary",
    "RBTBlock",
    "rbt_transform",
    "LCELoss",
]
FUNCTIONAL = ("class_centres", "class_boundaries", "lce_align", "lce_boundary")

BOUNDARY_ON = ("normalized", "raw")
_BN = {"eps": 2e-5, "momentum": 0.9}


# --- phase A: class centres and boundaries ------------------------------------------------------


def _rows(name: str, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.dim() != 1 or features.dim() < 2 or target.shape[0] != features.shape[0]:
        raise ValueError(
            f"{name}: expected features [B, d] and one target per row, got {tuple(features.shape)} and "
            f"{tuple(target.shape)}"
        )
    x = features.detach().flatten(1)
    return F.normalize(x.to(compute_dtype(x.dtype)), dim=1)


def _class_sums(features: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, ...]:
    """Per-class sums of the unit features ``[K, d]`` and counts ``[K]`` over the rows with target >= 0."""
    x = _rows("lce", features, target)
    labelled = target >= 0
    label = target.long().clamp(min=0)
    sums = x.new_zeros(num_classes, x.shape[1]).index_add_(0, label, x * labelled[:, None].to(x.dtype))
    counts = torch.zeros(num_classes, dtype=torch.long, device=x.device).index_add_(0, label, labelled.long())
    return sums, counts


def _class_min_cos(features: torch.Tensor, target: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Per-class minimum of ``cos(feature, own centre)`` ``[K]`` (``+inf`` for a class without rows)."""
    x = _rows("lce", features, target).to(centres.dtype)
    if x.shape[1] != centres.shape[1]:
        raise ValueError(
            f"lce: expected features of width {centres.shape[1]} (the centres'), got {tuple(features.shape)}"
        )
    label = target.long().clamp(min=0)
    cos = (x * centres.index_select(0, label)).sum(1)
    cos = torch.where(target >= 0, cos, torch.full_like(cos, float("inf")))
    out = torch.full((centres.shape[0],), float("inf"), dtype=cos.dtype, device=cos.device)
    return out.scatter_reduce(0, label, cos, reduce="amin")


def _boundaries(min_cos: torch.Tensor) -> torch.Tensor:
    # A class no row reached puts no constraint on the new model: its boundary is the least cosine.
    return torch.where(torch.isfinite(min_cos), min_cos, torch.full_like(min_cos, -1.0))


def class_centres(features: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``c_k = normalize(mean over class k of normalize(feature))`` ``[K, d]`` over the rows with
    target >= 0; a class without rows gets a zero centre."""
    sums, _ = _class_sums(features, target, num_classes)
    return F.normalize(sums, dim=1)  # normalize(mean) = normalize(sum): the count cancels


def class_boundaries(features: torch.Tensor, target: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``b_k = min over class k of cos(feature, c_k)`` ``[K]`` over the rows with target >= 0; a class
    without rows gets ``-1``."""
    return _boundaries(_class_min_cos(features, target, centres))


# --- phase B: alignment and boundary terms ------------------------------------------------------


def _row_mse(a: torch.Tensor, b: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``(a - b)^2`` over the columns and the ``present`` rows (all rows when None)."""
    per_row = (a - b).pow(2).mean(1)
    if present is None:
        return per_row.mean()
    w = present.to(per_row.dtype)
    return (per_row * w).sum() / w.sum().clamp(min=1)


def lce_align(
    normalized_weight: torch.Tensor,
    centres: torch.Tensor,
    forward: nn.Module | None = None,
    backward: nn.Module | None = None,
    present: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""``L_align``: mean of :math:`(\tilde W - C)^2` over :math:`K d` entries, or with the transforms
    ``forward`` (old to new) and ``backward`` (new to old) :math:`\tfrac12[\mathrm{MSE}(\tilde W,
    T_f(C)) + \mathrm{MSE}(T_b(\tilde W), C)]`; ``present`` ``[K]`` (bool) keeps only those classes.

    Raises:
        ValueError: one transform without the other, or shapes that do not fit.
    """
    if (forward is None) != (backward is None):
        raise ValueError("lce_align: give both transforms (forward and backward) or neither")
    if normalized_weight.shape[0] != centres.shape[0]:
        raise ValueError(
            f"lce_align: expected one classifier row per class centre, got {tuple(normalized_weight.shape)} "
            f"and {tuple(centres.shape)}"
        )
    if forward is None and normalized_weight.shape != centres.shape:
        raise ValueError(
            f"lce_align: the classifier {tuple(normalized_weight.shape)} and the centres "
            f"{tuple(centres.shape)} have different widths; learn transforms between the two spaces"
        )
    c = centres.detach()
    with full_precision(normalized_weight.device):
        w = normalized_weight.to(c.dtype)
        if forward is None:
            loss = _row_mse(w, c, present)
        else:
            loss = 0.5 * (_row_mse(w, forward(c), present) + _row_mse(backward(w), c, present))
    check_finite("lce_align", "loss", loss)
    return loss


def lce_boundary(
    embeddings: torch.Tensor,
    target: torch.Tensor,
    centres: torch.Tensor,
    boundaries: torch.Tensor,
    backward: nn.Module | None = None,
    on: str = "normalized",
) -> torch.Tensor:
    r"""``L_bound``: mean over the labelled rows of :math:`\max(0, b_{y_i} - \cos(f_i, c_{y_i}))`
    (through ``backward`` = :math:`T_b` when given). ``on="raw"`` is the authors' code:
    :math:`\langle f_i, c_{y_i} \rangle` of the un-normalised embedding, clamped to :math:`[-1, 1]`
    without a transform (see the module docstring).

    Raises:
        ValueError: an unknown ``on``, or shapes that do not fit.
    """
    if on not in BOUNDARY_ON:
        raise ValueError(f"lce_boundary: on must be one of {BOUNDARY_ON}, got {on!r}")
    if target.dim() != 1 or target.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"lce_boundary: expected one target per embedding, got embeddings {tuple(embeddings.shape)} "
            f"and target {tuple(target.shape)}"
        )
    if boundaries.shape != centres.shape[:1]:
        raise ValueError(
            f"lce_boundary: expected one boundary per centre, got {tuple(boundaries.shape)} and "
            f"{tuple(centres.shape)}"
        )
    check_finite("lce_boundary", "student input", embeddings)
    labelled = target >= 0
    label = target.long().clamp(min=0)
    c = centres.detach().index_select(0, label)
    b = boundaries.detach().index_select(0, label)
    with full_precision(embeddings.device):
        x = embeddings.flatten(1).to(c.dtype)
        if on == "normalized":
            x = F.normalize(x, dim=1)
            if backward is not None:
                x = F.normalize(backward(x), dim=1)
        elif backward is not None:
            x = backward(x)
        if x.shape[1] != c.shape[1]:
            raise ValueError(
                f"lce_boundary: embeddings {tuple(embeddings.shape)} do not fit centres of width "
                f"{centres.shape[1]}; learn a backward transform between the two spaces"
            )
        cos = (x * c).sum(1)
        if on == "raw" and backward is None:
            cos = cos.clamp(-1.0, 1.0)
        per_row = F.relu(b - cos)
        total = torch.where(labelled, per_row, torch.zeros_like(per_row)).sum()
        loss = total / labelled.sum().clamp(min=1).to(total.dtype)
    check_finite("lce_boundary", "loss", loss)
    return loss


# --- transforms ---------------------------------------------------------------------------------


def _path(in_dim: int, out_dim: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in ((in_dim, width), (width, width), (width, out_dim)):
        layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b, **_BN), nn.PReLU(b)]
    return nn.Sequential(*layers)


class RBTBlock(nn.Module):
    """A residual bottleneck transformation block: ``x -> skip(x) + sum_p path_p(x)``.

    ``skip`` is the identity for equal widths, otherwise a linear map without bias; each path is
    ``Linear(in, width) -> BN -> PReLU -> Linear(width, width) -> BN -> PReLU -> Linear(width, out) ->
    BN -> PReLU`` (Linear layers without bias). With 0 paths and equal widths it is the identity.

    **Shapes:** ``[B, in_dim]`` -> ``[B, out_dim]``.
    """

    def __init__(self, in_dim: int, out_dim: int, num_paths: int = 4, width: int = 16) -> None:
        super().__init__()
        if num_paths < 0 or width < 1:
            raise ValueError(f"RBTBlock: expected num_paths >= 0 and width >= 1, got {num_paths} and {width}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.skip = nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim, bias=False)
        self.paths = nn.ModuleList(_path(in_dim, out_dim, width) for _ in range(num_paths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.skip(x)
        for path in self.paths:
            out = out + path(x)
        return out

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_paths={len(self.paths)}"


def rbt_transform(
    in_dim: int, out_dim: int, blocks: int = 4, paths: int = 4, width: int = 16
) -> nn.Sequential:
    """``blocks`` :class:`RBTBlock` s in a row, the first from ``in_dim`` to ``out_dim``, the others
    ``out_dim -> out_dim`` (the authors: 4 blocks of 4 paths of width 16)."""
    if blocks < 1:
        raise ValueError(f"rbt_transform: expected at least 1 block, got {blocks}")
    return nn.Sequential(
        *(RBTBlock(in_dim if i == 0 else out_dim, out_dim, paths, width) for i in range(blocks))
    )


# --- the loss -----------------------------------------------------------------------------------


@register("lce")
class LCELoss(DistillLoss):
    """Module form of LCE: owns the ArcFace classifier (``arcface``), the old model's class centres and
    boundaries (buffers), and the transforms :math:`T_f`, :math:`T_b` when it learns them.

    Three passes, which a method runs as stages (``relkd/configs/methods/lce.yaml``):

    1. centres, on the frozen old model (the teacher): ``fit_step(teacher_feats, batch)`` on every
       training batch, then ``finalize_centres()``;
    2. boundaries, likewise: ``boundary_step(teacher_feats, batch)``, then ``finalize_boundaries()``;
    3. the new model: ``loss(embeddings, target)`` = ArcFace + ``align_weight`` * L_align +
       ``boundary_weight`` * L_bound, trained with ``loss.parameters()`` (the classifier and the
       transforms). ``student_step(student_feats, batch)`` is the same on tapped features; ``distill``
       ignores the teacher. The old model is no longer needed.

    ``fit(features, target)`` runs passes 1 and 2 on features held in memory. The passes return a zero
    without gradient. What they accumulate and their result are buffers, so a checkpoint holds them.

    Args:
        student_dim, teacher_dim: widths of the new and old embeddings (the engine measures them).
        num_classes: ``K``; null takes ``max(targets) + 1``.
        targets: the training labels; num_data: the training set's size (both filled in by the engine;
            with ``num_data`` each labelled image counts once in the centres, by ``batch["index"]``).
        scale, margin, easy_margin: the ArcFace head's (:class:`relkd.losses.ArcFaceLoss`).
        align_weight, boundary_weight: the weights lambda_a, lambda_b of L_align and L_bound.
        boundary_on: ``"normalized"`` (a cosine) or ``"raw"`` (the authors' code).
        transform: learn the transforms :math:`T_f`, :math:`T_b`; null (default) learns them exactly
            when the widths differ (the authors' default, no transforms, needs equal widths).
        transform_blocks, transform_paths, transform_width: their shape (:func:`rbt_transform`).

    Config::

        losses:
          lce: {weight: 1.0, align_weight: 100.0, boundary_weight: 1.0}
        train:
          ce_weight: 0.0
    """

    taps = ("penultimate",)
    batch_keys = ("target",)

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        num_classes: int | None = None,
        targets: torch.Tensor | None = None,
        num_data: int | None = None,
        scale: float = 16.0,
        margin: float = 0.1,
        easy_margin: bool = False,
        align_weight: float = 100.0,
        boundary_weight: float = 1.0,
        boundary_on: str = "normalized",
        transform: bool | None = None,
        transform_blocks: int = 4,
        transform_paths: int = 4,
        transform_width: int = 16,
    ) -> None:
        super().__init__()
        if boundary_on not in BOUNDARY_ON:
            raise ValueError(f"lce: boundary_on must be one of {BOUNDARY_ON}, got {boundary_on!r}")
        if transform is None:
            transform = student_dim != teacher_dim
        if student_dim != teacher_dim and not transform:
            raise ValueError(
                f"lce: the new embedding has {student_dim} dimensions and the old one {teacher_dim}; "
                "transforms between the two spaces are needed (transform: true or null)"
            )
        self.arcface = ArcFaceLoss(student_dim, num_classes, targets, scale, margin, easy_margin)
        k = self.arcface.num_classes
        self.align_weight, self.boundary_weight, self.boundary_on = align_weight, boundary_weight, boundary_on
        self.forward_transform: nn.Module | None = None
        self.backward_transform: nn.Module | None = None
        if transform:
            shape = (transform_blocks, transform_paths, transform_width)
            self.forward_transform = rbt_transform(teacher_dim, student_dim, *shape)
            self.backward_transform = rbt_transform(student_dim, teacher_dim, *shape)
        self.register_buffer("centre_sums", torch.zeros(k, teacher_dim))
        self.register_buffer("counts", torch.zeros(k, dtype=torch.long))
        self.register_buffer("seen", torch.zeros(num_data or 0, dtype=torch.bool))
        self.register_buffer("min_cos", torch.full((k,), float("inf")))
        self.register_buffer("centres", torch.zeros(k, teacher_dim))
        self.register_buffer("boundaries", torch.full((k,), -1.0))
        self.register_buffer("present", torch.zeros(k, dtype=torch.bool))
        self._centres_fitted = False
        self._boundaries_fitted = False

    # --- phase A ---

    @property
    def fitted(self) -> bool:
        """Whether the centres and boundaries are final (phase B may run)."""
        return self._boundaries_fitted

    def _features(self, teacher: Mapping[str, Any]) -> torch.Tensor:
        return teacher[self.taps[0]].detach()

    @torch.no_grad()
    def fit_step(self, teacher: Mapping[str, Any], batch: Mapping[str, Any]) -> torch.Tensor:
        """Add the old model's unit embeddings of the batch's labelled rows to their class sums.

        Args:
            teacher: the old model's tapped features ``{tap: [B, d_o]}``.
            batch: with ``"target"`` ``[B]``; with ``"index"`` ``[B]`` an image already counted is skipped.

        Returns:
            A zero scalar without gradient (nothing is trained).
        """
        if self._centres_fitted:
            raise RuntimeError("lce: the class centres are final; fit_step belongs before finalize_centres()")
        x = self._features(teacher)
        target = _target(batch)
        keep = target >= 0
        index = batch.get("index")
        if index is not None and self.seen.numel():
            index = index.to(self.seen.device).long()
            keep = keep & ~self.seen[index]
            self.seen[index] = self.seen[index] | (target >= 0)
        sums, counts = _class_sums(x, torch.where(keep, target, -1), self.centre_sums.shape[0])
        self.centre_sums += sums.to(self.centre_sums.dtype)
        self.counts += counts
        return self.centre_sums.new_zeros(())

    @torch.no_grad()
    def finalize_centres(self) -> None:
        """End of the centres pass: ``c_k = normalize(sum_k)`` (summed over ranks first)."""
        if D.is_distributed():
            dist.all_reduce(self.centre_sums)
            dist.all_reduce(self.counts)
        self.present.copy_(self.counts > 0)
        self.centres.copy_(F.normalize(self.centre_sums, dim=1))
        missing = int((~self.present).sum())
        if missing:
            warnings.warn(
                f"lce: {missing} of {self.present.numel()} classes have no labelled image in the centres "
                "pass; they are left out of the alignment and boundary terms",
                stacklevel=2,
            )
        self._centres_fitted = True

    @torch.no_grad()
    def boundary_step(self, teacher: Mapping[str, Any], batch: Mapping[str, Any]) -> torch.Tensor:
        """Lower each class's running minimum of ``cos(old embedding, c_k)`` with the batch's labelled
        rows. Returns a zero scalar without gradient."""
        if not self._centres_fitted:
            raise RuntimeError("lce: the boundaries need the centres; call finalize_centres() first")
        if self._boundaries_fitted:
            raise RuntimeError(
                "lce: the boundaries are final; boundary_step belongs before finalize_boundaries()"
            )
        m = _class_min_cos(self._features(teacher), _target(batch), self.centres)
        torch.minimum(self.min_cos, m.to(self.min_cos.dtype), out=self.min_cos)
        return self.min_cos.new_zeros(())

    @torch.no_grad()
    def finalize_boundaries(self) -> None:
        """End of the boundaries pass: ``b_k`` = the minimum (over ranks); a class no row reached gets -1."""
        if not self._centres_fitted:
            raise RuntimeError("lce: call finalize_centres() and run the boundaries pass first")
        if D.is_distributed():
            dist.all_reduce(self.min_cos, op=dist.ReduceOp.MIN)
        self.boundaries.copy_(_boundaries(self.min_cos))
        self._boundaries_fitted = True

    def fit(self, features: torch.Tensor, target: torch.Tensor) -> None:
        """Both passes on the old model's embeddings ``[N, d_o]`` of the training set and its labels
        ``[N]``, replacing any earlier fit."""
        for name in ("centre_sums", "counts", "seen"):
            getattr(self, name).zero_()
        self.min_cos.fill_(float("inf"))
        self._centres_fitted = self._boundaries_fitted = False
        feats, batch = {self.taps[0]: features}, {"target": target}
        self.fit_step(feats, batch)
        self.finalize_centres()
        self.boundary_step(feats, batch)
        self.finalize_boundaries()

    # --- phase B ---

    def forward(self, embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self._boundaries_fitted:
            raise RuntimeError(
                "lce: the old model's class centres and boundaries are not fitted; run the fitting stages "
                "(fit_step / finalize_centres, boundary_step / finalize_boundaries) or fit() first"
            )
        loss = self.arcface(embeddings, target)
        align = lce_align(
            self.arcface.normalized_weight(),
            self.centres,
            self.forward_transform,
            self.backward_transform,
            self.present,
        )
        bound = lce_boundary(
            embeddings, target, self.centres, self.boundaries, self.backward_transform, self.boundary_on
        )
        return loss + self.align_weight * align + self.boundary_weight * bound

    def student_step(
        self, student: Mapping[str, Any], batch: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """Phase B on the new model's tapped features (``{tap: tensor}``) and ``batch["target"]``: a
        stage's ``{call: student_step, network: student}``, which does not run the old model."""
        return self(student[self.taps[0]], _target(batch))

    def distill(
        self,
        student: Mapping[str, Any],
        teacher: Mapping[str, Any] | None = None,
        batch: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """Phase B; the teacher's features are ignored (the old model enters through the centres)."""
        return self.student_step(student, batch)

    def get_extra_state(self) -> dict[str, bool]:
        return {"centres_fitted": self._centres_fitted, "boundaries_fitted": self._boundaries_fitted}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        self._centres_fitted = bool(state.get("centres_fitted", False))
        self._boundaries_fitted = bool(state.get("boundaries_fitted", False))

    def extra_repr(self) -> str:
        return (
            f"align_weight={self.align_weight}, boundary_weight={self.boundary_weight}, "
            f"boundary_on={self.boundary_on!r}, fitted={self.fitted}"
        )


def _target(batch: Mapping[str, Any] | None) -> torch.Tensor:
    if batch is None or "target" not in batch:
        raise KeyError("lce needs the labels of the batch as batch['target']")
    return batch["target"]
