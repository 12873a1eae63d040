r"""ArcFace: a normalised classifier with an additive angular margin on the labelled class.

With a classifier :math:`W \in \mathbb{R}^{K \times d}` and an embedding :math:`f_i` of label
:math:`y_i`, :math:`\cos\theta_{ij} = \langle f_i / \lVert f_i \rVert, W_j / \lVert W_j \rVert \rangle`
and

.. math::
    \psi(\theta) = \begin{cases} \cos(\theta + m) & \cos\theta > \cos(\pi - m) \\
    \cos\theta - m \sin m & \text{otherwise} \end{cases}, \qquad
    \mathcal{L} = -\frac{1}{B} \sum_i \log \frac{e^{s\,\psi(\theta_{i y_i})}}
    {e^{s\,\psi(\theta_{i y_i})} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}}

Deng, Guo, Xue & Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR
2019. The defaults are those of Learning Compatible Embeddings (Meng et al., ICCV 2021), whose code
(github.com/IrvingMeng/LCE, ``losses/arcface_loss.py``, ``configs/res50_arcface.yaml``,
``models/Classifier.py`` ``NormalizedClassifier``) trains its old and new models with this head:

- ``scale`` :math:`s = 16`, ``margin`` :math:`m = 0.1`, ``easy_margin=False``: beyond
  :math:`\theta + m > \pi` the margin would make the target logit grow again, so the code switches to
  the linear fallback :math:`\cos\theta - m \sin m` (its ``cos_t - sin(pi - m) * m``);
  ``easy_margin=True`` applies the margin only where :math:`\cos\theta > 0` and keeps
  :math:`\cos\theta` elsewhere. The switch is strict (``>``) in both, as there.
- :math:`W` rows are drawn uniformly in :math:`[-1, 1]^d` and scaled to unit norm (the code's
  ``uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5)``); the loss normalises them at every call, so their
  norm never matters.

Where we differ: :math:`\sin\theta = \sqrt{\max(1 - \cos^2\theta, 10^{-12})}`, so the gradient stays
finite at :math:`\lvert\cos\theta\rvert = 1` (the code's ``sqrt(1 - cos^2)`` has an infinite one there;
the values differ by less than :math:`10^{-6} m`). Rows with target ``-1`` (unlabelled transfer images)
have no class: they are left out and the mean runs over the labelled rows (0 without any). The
cosines are computed in float32 (float64 stays float64), also inside an autocast region.

With :math:`m = 0` the loss is the cross-entropy of the scaled cosines :math:`s \cos\theta`.

Shapes:
    embeddings ``[B, d]`` (or ``[B, ...]``, flattened), weight ``[K, d]``, target ``[B]`` (class
    indices, ``-1`` for unlabelled rows) -> scalar.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from relkd._debug import check_finite
from relkd.graphs.ops import compute_dtype, full_precision
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register

__all__ = ["arcface", "arcface_cosine", "ArcFaceLoss"]
FUNCTIONAL = ("arcface", "arcface_cosine")

# Below this, 1 - cos^2 is rounding noise; the floor keeps d sin / d cos finite at |cos| = 1.
_SIN2_FLOOR = 1e-12


def arcface_cosine(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``cos(f_i, W_j)`` ``[B, K]`` of embeddings ``[B, d]`` (or ``[B, ...]``) and classifier rows
    ``[K, d]``, in float32 (float64 stays float64) even under autocast.

    Raises:
        ValueError: the embedding width differs from the classifier's.
    """
    x = embeddings.flatten(1)
    if weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"arcface: expected embeddings of width {weight.shape[-1]} (the classifier's, "
            f"{tuple(weight.shape)}), got {tuple(embeddings.shape)}"
        )
    dtype = compute_dtype(torch.promote_types(x.dtype, weight.dtype))
    with full_precision(x.device):
        return F.normalize(x.to(dtype), dim=1) @ F.normalize(weight.to(dtype), dim=1).T


def arcface(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    scale: float = 16.0,
    margin: float = 0.1,
    easy_margin: bool = False,
) -> torch.Tensor:
    """ArcFace loss of ``embeddings`` against the classifier ``weight`` (see the module docstring);
    the mean over the labelled rows (``target >= 0``).

    Raises:
        ValueError: wrong shapes (the messages name them).
    """
    if target.dim() != 1 or target.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"arcface: expected one target per embedding, got embeddings {tuple(embeddings.shape)} and "
            f"target {tuple(target.shape)}"
        )
    check_finite("arcface", "student input", embeddings)
    cos = arcface_cosine(embeddings, weight)
    with full_precision(cos.device):
        labelled = target >= 0
        label = target.long().clamp(min=0)
        cos_t = cos.gather(1, label[:, None])
        sin_t = (1.0 - cos_t * cos_t).clamp(min=_SIN2_FLOOR).sqrt()
        with_margin = cos_t * math.cos(margin) - sin_t * math.sin(margin)
        if easy_margin:
            target_cos = torch.where(cos_t > 0, with_margin, cos_t)
        else:
            target_cos = torch.where(
                cos_t > math.cos(math.pi - margin), with_margin, cos_t - margin * math.sin(margin)
            )
        logits = scale * cos.scatter(1, label[:, None], target_cos)
        per_row = F.cross_entropy(logits, label, reduction="none")
        total = torch.where(labelled, per_row, torch.zeros_like(per_row)).sum()
        loss = total / labelled.sum().clamp(min=1).to(total.dtype)
    check_finite("arcface", "loss", loss)
    return loss


def _num_classes(name: str, num_classes: int | None, targets: torch.Tensor | None) -> int:
    if num_classes is None:
        if targets is None or targets.numel() == 0:
            raise ValueError(f"{name}: give num_classes, or the training labels as targets")
        num_classes = int(targets.max()) + 1
    if num_classes < 2:
        raise ValueError(f"{name}: needs at least 2 classes, got {num_classes}")
    return num_classes


@register("arcface")
class ArcFaceLoss(DistillLoss):
    """Module form of :func:`arcface`: owns the classifier ``weight`` ``[K, d]`` (trainable), reads
    the student's embedding and the batch's labels; no teacher.

    A method trains a network with it in place of the softmax cross-entropy (``ce_weight: 0``); the
    network's own classifier is then untrained. :meth:`normalized_weight` gives the unit rows of the
    classifier (class directions, which LCE aligns with an old model's class centres), :meth:`cosine`
    the cosine logits a prediction takes the argmax of.

    Args:
        student_dim: width ``d`` of the embedding (the engine measures it).
        num_classes: ``K``; null takes ``max(targets) + 1``.
        targets: the training labels (filled in by the engine).
        scale, margin, easy_margin: see :func:`arcface`.

    Config (LCE's old and new models)::

        losses:
          arcface: {weight: 1.0, scale: 16.0, margin: 0.1}
        train:
          ce_weight: 0.0
    """

    taps = ("penultimate",)
    batch_keys = ("target",)
    needs_teacher = False

    def __init__(
        self,
        student_dim: int,
        num_classes: int | None = None,
        targets: torch.Tensor | None = None,
        scale: float = 16.0,
        margin: float = 0.1,
        easy_margin: bool = False,
    ) -> None:
        super().__init__()
        if scale <= 0 or not 0.0 <= margin < math.pi:
            raise ValueError(f"arcface: expected scale > 0 and margin in [0, pi), got {scale} and {margin}")
        self.num_classes = _num_classes("arcface", num_classes, targets)
        self.scale, self.margin, self.easy_margin = scale, margin, easy_margin
        self.weight = nn.Parameter(torch.empty(self.num_classes, student_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Rows uniform in ``[-1, 1]^d``, scaled to unit norm (the authors' initialisation)."""
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self.weight.copy_(F.normalize(self.weight, dim=1))

    def normalized_weight(self) -> torch.Tensor:
        """The classifier's unit rows ``[K, d]`` (differentiable)."""
        return F.normalize(self.weight, dim=1)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine logits ``[B, K]`` of ``embeddings`` ``[B, d]`` (no margin, no scale)."""
        return arcface_cosine(embeddings, self.weight)

    def forward(self, embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return arcface(embeddings, self.weight, target, self.scale, self.margin, self.easy_margin)

    @torch.no_grad()
    def copy_to(self, linear: nn.Linear) -> None:
        """Write the classifier into a network's last linear layer: weight = the unit rows, bias 0.

        ``argmax_k cos(f, w_k) = argmax_k <f, w_k / |w_k|>`` because ``|f|`` is the same for every
        class, so the network then ranks the classes as the cosine classifier does (top-1 and top-5
        are equal) and can be evaluated and deployed on its own: a stage's
        ``after_epoch: [loss.<term>.copy_to(student.fc)]``.
        """
        if not isinstance(linear, nn.Linear) or linear.weight.shape != self.weight.shape:
            shape = tuple(getattr(linear, "weight", torch.empty(0)).shape)
            raise ValueError(
                f"arcface.copy_to: expected an nn.Linear with weight {tuple(self.weight.shape)} (classes x "
                f"embedding), got {type(linear).__name__} {shape}"
            )
        linear.weight.copy_(self.normalized_weight())
        if linear.bias is not None:
            linear.bias.zero_()

    def distill(
        self,
        student: Mapping[str, Any],
        teacher: Mapping[str, Any] | None = None,
        batch: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """The loss on the student's embedding and ``batch["target"]``; a teacher's features are ignored."""
        return self.student_step(student, batch)

    def student_step(
        self, student: Mapping[str, Any], batch: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """The loss on one network's tapped features (``{tap: tensor}``) and ``batch["target"]``: a
        stage's ``{call: student_step, network: NAME}``."""
        if batch is None or "target" not in batch:
            raise KeyError("arcface needs the labels of the batch as batch['target']")
        return self(student[self.taps[0]], batch["target"])

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, dim={self.weight.shape[1]}, scale={self.scale}, "
            f"margin={self.margin}, easy_margin={self.easy_margin}"
        )
