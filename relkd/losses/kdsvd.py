r"""Self-supervised knowledge distillation using singular value decomposition (KD-SVD).

Each tapped feature map ``[B, C, H, W]`` is read as an ``HW x C`` matrix per sample; its leading right
singular vectors are the layer's distilled feature vectors. The student's vectors are aligned to the
teacher's (largest ``|cos|`` among ``k + 3`` candidates, sign-corrected), both are weighted by the
teacher's L2-normalised singular values, and consecutive layers are related by a bipartite RBF graph
over the entries of their vectors (:func:`relkd.graphs.svd.rbf_correlation`):

.. math::
    G^{(l)}_{b,k,i,j} = \exp\!\big(-(v^{(l)}_{b,i,k} - v^{(l+1)}_{b,j,k})^2 / \sigma\big), \qquad
    \mathcal{L}_{\text{KD-SVD}} = \sum_{l} \sum_{b,k,i,j} \big(G^{(l),s}_{b,k,i,j}
    - G^{(l),t}_{b,k,i,j}\big)^2

Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition",
ECCV 2018. Defaults follow the authors' CIFAR-100 code, github.com/sseung0703/KD_methods_with_TF
(``nets/Shared.py`` ``KD_SVD``, ``nets/SVP.py``, ``op_util.py``, ``train_w_distill.py``; the KD-SVD row
of its README): the last block of each stage tapped, ``k = 1`` vector per layer, ``k + 3 = 4`` student
candidates (``extra_candidates=3``; RepDistiller's port ``distiller_zoo/KDSVD.py`` also takes ``k + 3``),
``sigma = 8``, a plain sum over the batch (``reduction="sum"``), weight 1 next to the cross-entropy,
and the distillation gradient clipped to the cross-entropy's, ramped by ``sigmoid(epoch)`` (the
method's ``train: {clip_to_ce: true, clip_to_ce_ramp: sigmoid}``). The paper and the original ECCV code
(github.com/sseung0703/SSKD_SVD ``nets/Distillation.py``) take ``k + 1`` candidates:
``extra_candidates=1``. Where we differ, and why:

- Sign: the ECCV code flips the *teacher's* vector towards the student's; we flip the student's
  (as KD_methods_with_TF does), so a sign flip of a student vector cannot change the loss, and fix the
  teacher's sign canonically (:func:`relkd.graphs.svd.canonical_sign`), so the loss does not depend on
  the sign LAPACK or cuSOLVER happen to return.
- Gradients: the authors' custom SVD gradient divides by ``s_i^2 - s_j^2`` and zeroes the NaN/inf that
  follow, sample by sample. We bound ``1 / (s_i^2 - s_j^2)`` instead
  (:func:`relkd.graphs.svd.truncated_svd`), so no sample is dropped and ties give finite gradients.
- Scale: the ECCV code uses ``tf.nn.l2_loss`` (half the sum) times ``sqrt(k)``; KD_methods_with_TF
  uses the plain sum, which we follow; RepDistiller divides it by the batch size. ``reduction="mean"``
  averages each layer pair's graph entries instead (then sums over pairs). The authors clip the
  distillation gradient to the cross-entropy's norm, which the plain sum relies on: the engine does it
  with ``train.clip_to_ce`` (and ``clip_to_ce_ramp: sigmoid``); in one's own loop call
  ``relkd.train.clip_to_ce_backward(ce, loss, params, ramp=relkd.train.sigmoid(epoch))`` instead of
  ``backward()`` (without the clipping the sum swamps the cross-entropy).
- Channels: the paper pairs layers with equal student and teacher widths. When they differ, pass
  ``student_channels`` and ``teacher_channels``: a trainable 1x1 convolution + batch norm maps the
  student's feature map to the teacher's width (as the authors' TF2 code does), and is a submodule of
  the loss (``loss.connectors``), so ``loss.parameters()`` exposes it to the optimiser.

Shapes:
    student, teacher: lists of ``L >= 2`` feature maps ``[B, C_l, *spatial_l]`` (or ``[B, C_l]``);
    spatial sizes may differ between student and teacher -> scalar.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from relkd._debug import check_finite
from relkd.distributed import global_relations_enabled, world_size
from relkd.graphs import ops
from relkd.graphs.svd import aligned_singular_vectors, rbf_correlation_mse
from relkd.losses._inputs import reduce
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register

__all__ = ["kd_svd", "KDSVDLoss", "ChannelConnector", "build_connectors", "check_feature_lists"]
FUNCTIONAL = ("kd_svd",)


def check_feature_lists(
    name: str, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], min_layers: int = 2
) -> None:
    """Raise ``ValueError`` unless student and teacher are equally long lists of feature maps with the
    same batch size and, layer by layer, the same channel count."""
    if isinstance(student, torch.Tensor) or isinstance(teacher, torch.Tensor):
        raise TypeError(f"{name}: expected lists of feature maps (one per tapped layer), got a single tensor")
    if len(student) != len(teacher):
        raise ValueError(
            f"{name}: expected as many student as teacher feature maps, got {len(student)} and {len(teacher)}"
        )
    if len(student) < min_layers:
        raise ValueError(
            f"{name}: relates consecutive layers, so it needs at least {min_layers} feature maps, "
            f"got {len(student)}; tap more stages"
        )
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if s.dim() < 2 or t.dim() < 2:
            raise ValueError(
                f"{name}: expected feature maps [B, C, ...] at layer {i}, got student "
                f"{tuple(s.shape)} and teacher {tuple(t.shape)}"
            )
        if s.shape[0] != t.shape[0]:
            raise ValueError(
                f"{name}: expected student and teacher with the same batch size, got "
                f"{s.shape[0]} and {t.shape[0]} at layer {i}"
            )
        if s.shape[1] != t.shape[1]:
            raise ValueError(
                f"{name}: expected student and teacher with the same channels at layer {i}, got "
                f"{s.shape[1]} and {t.shape[1]}; pass student_channels and teacher_channels so the "
                "loss maps the student's features with a 1x1 convolution"
            )
        check_finite(name, f"student input {i}", s)
        check_finite(name, f"teacher input {i}", t)


class ChannelConnector(nn.Module):
    """1x1 convolution (no bias) + batch norm from ``in_channels`` to ``out_channels``.

    Shapes:
        ``[B, C_in, *spatial]`` -> ``[B, C_out, *spatial]`` (any number of spatial dims, also none).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, *spatial = x.shape
        x = x.reshape(b, x.shape[1], -1).to(self.conv.weight.dtype)
        y = self.bn(self.conv(x))
        return y.reshape(b, y.shape[1], *spatial)


def build_connectors(
    student_channels: Sequence[int] | None, teacher_channels: Sequence[int] | None
) -> nn.ModuleList:
    """One connector per layer (``Identity`` where the widths agree); none unless both lists are given."""
    if student_channels is None or teacher_channels is None:
        return nn.ModuleList()
    if len(student_channels) != len(teacher_channels):
        raise ValueError(
            f"expected one channel count per tapped layer on both sides, got "
            f"{len(student_channels)} student and {len(teacher_channels)} teacher channel counts"
        )
    return nn.ModuleList(
        nn.Identity() if cs == ct else ChannelConnector(cs, ct)
        for cs, ct in zip(student_channels, teacher_channels, strict=True)
    )


def connect(connectors: nn.ModuleList, student: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Apply the per-layer connectors (none: the features as they are)."""
    if isinstance(student, torch.Tensor):
        raise TypeError("expected a list of feature maps (one per tapped layer), got a single tensor")
    if not len(connectors):
        return list(student)
    if len(connectors) != len(student):
        raise ValueError(
            f"the loss was built for {len(connectors)} layers (student_channels), got "
            f"{len(student)} feature maps"
        )
    return [c(s) for c, s in zip(connectors, student, strict=True)]


def kd_svd(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    k: int = 1,
    sigma: float = 8.0,
    reduction: str = "sum",
    eps: float = 1e-4,
    extra_candidates: int = 3,
) -> torch.Tensor:
    """KD-SVD loss between lists of feature maps (see the module docstring for the formula).

    Args:
        student, teacher: ``L >= 2`` feature maps each, same batch size and channels per layer.
        k: singular vectors distilled per layer.
        sigma: RBF width, ``exp(-d^2 / sigma)``.
        reduction: ``"sum"`` (authors) or ``"mean"`` over each pair's graph entries, summed over pairs.
        eps: relative bound on the SVD backward (:func:`relkd.graphs.svd.truncated_svd`).
        extra_candidates: the student offers its top ``k + extra_candidates`` vectors (at most its
            rank) to be aligned with the teacher's ``k``: 3 in the authors' CIFAR-100 code, 1 in the
            paper.
    """
    if k < 1:
        raise ValueError(f"kd_svd: k must be >= 1, got {k}")
    if extra_candidates < 0:
        raise ValueError(f"kd_svd: extra_candidates must be >= 0, got {extra_candidates}")
    check_feature_lists("kd_svd", student, teacher)
    candidates = k + extra_candidates
    with ops.full_precision(student[0].device):
        layers = [
            aligned_singular_vectors(s, t, k, candidates, eps=eps)
            for s, t in zip(student, teacher, strict=True)
        ]
        total = None
        for (vs_f, vt_f, st_f), (vs_b, vt_b, st_b) in zip(layers, layers[1:], strict=False):
            n = min(vt_f.shape[-1], vt_b.shape[-1])
            w_f, w_b = _value_weights(st_f[..., :n]), _value_weights(st_b[..., :n])
            mse = rbf_correlation_mse(
                vs_f[..., :n] * w_f, vs_b[..., :n] * w_b, vt_f[..., :n] * w_f, vt_b[..., :n] * w_b, sigma
            )
            entries = vs_f.shape[0] * n * vs_f.shape[-2] * vs_b.shape[-2]  # the [B, n, C_f, C_b] graph's
            # "sum" is over the global batch: under global relations W times this shard's entries, so
            # the value and gradient scale do not change with W (relkd.distributed's convention)
            count = entries * (world_size() if global_relations_enabled() else 1)
            term = reduce(mse, count, reduction, "kd_svd")
            total = term if total is None else total + term
    return total


def _value_weights(s: torch.Tensor) -> torch.Tensor:
    """Teacher singular values scaled to unit L2 norm, ``[B, k]`` -> ``[B, 1, k]`` (0 for a zero map)."""
    return (s * ops.inv_or_zero(s.norm(dim=-1, keepdim=True))).unsqueeze(-2)


@register("kd_svd", "kdsvd")
class KDSVDLoss(DistillLoss):
    """Module form of :func:`kd_svd`; reads the stage taps of both networks.

    The connectors (built only when ``student_channels`` and ``teacher_channels`` differ somewhere) are
    trainable submodules: the engine optimises them with the student through ``loss.parameters()``.

    Config (the authors' CIFAR-100 recipe)::

        losses:
          kd_svd: {weight: 1.0, k: 1, sigma: 8.0, extra_candidates: 3}
        train: {clip_to_ce: true, clip_to_ce_ramp: sigmoid}
    """

    taps = ("stage1", "stage2", "stage3")

    def __init__(
        self,
        k: int = 1,
        sigma: float = 8.0,
        student_channels: Sequence[int] | None = None,
        teacher_channels: Sequence[int] | None = None,
        reduction: str = "sum",
        eps: float = 1e-4,
        extra_candidates: int = 3,
    ) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"kd_svd: k must be >= 1, got {k}")
        if extra_candidates < 0:
            raise ValueError(f"kd_svd: extra_candidates must be >= 0, got {extra_candidates}")
        self.k, self.sigma, self.reduction, self.eps = k, sigma, reduction, eps
        self.extra_candidates = extra_candidates
        self.connectors = build_connectors(student_channels, teacher_channels)

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        return kd_svd(
            connect(self.connectors, student),
            teacher,
            k=self.k,
            sigma=self.sigma,
            reduction=self.reduction,
            eps=self.eps,
            extra_candidates=self.extra_candidates,
        )

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, sigma={self.sigma}, extra_candidates={self.extra_candidates}, "
            f"reduction={self.reduction!r}"
        )
