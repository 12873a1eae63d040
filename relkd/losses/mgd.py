r"""Multi-granularity knowledge distillation (MGD): bottleneck "tubes" on the pooled embedding.

Each network gets two tubes on its pooled embedding ``f`` (width ``F``), each an encoder
``E: F -> F -> d`` (linear, ReLU, linear): the high-pressure tube with ``d = 64`` and the
low-pressure tube with ``d = 256``. On the teacher each encoder also has a decoder
``D: d -> F -> C`` (linear, ReLU, linear). No batch norm anywhere.

First the teacher's tubes are trained on the frozen teacher (:func:`mgd_pretrain`), each to
reproduce the teacher's logits ``z_t`` and the labels:

.. math::
    \mathcal{L}_{\text{tube}} = \sum_{(E, D, \tau) \in \{(E_a, D_a, 2), (E_d, D_d, 8)\}}
    \mathrm{CE}\big(D(E(f_t)), y\big) + \mathrm{KL}_\tau\big(z_t \,\|\, D(E(f_t))\big)

then frozen. The student loss (:func:`mgd`) treats the encoder outputs as the logits of 64-way and
256-way distributions:

.. math::
    \mathcal{L} = w_{div} \, \mathrm{KL}_T(\hat z_t \,\|\, z_s)
    + \mathrm{KL}_{2}\big(E_a^t(f_t) \,\|\, E_a^s(f_s)\big) + \mathrm{KL}_{8}\big(E_d^t(f_t) \,\|\,
    E_d^s(f_s)\big)

with :math:`\mathrm{KL}_T(a \| b) = T^2 \frac{1}{B} \sum_i \mathrm{KL}(\mathrm{softmax}(a_i / T) \|
\mathrm{softmax}(b_i / T))` (relkd's :func:`~relkd.losses.kd.kd`) and ``T = 4``. The target
:math:`\hat z_t` is the teacher's logits ``z_t`` ("MAG", the default) or, with ``stable=True``, the
stable excitation :math:`(z_t + D_a(E_a(f_t)) + D_d(E_d(f_t))) / 3` ("MAS"). The cross-entropy and
the base distillation loss (AT, FitNet, CRD ...) are separate terms of the method.

Shao & Chen, "Multi-granularity for knowledge distillation", Image and Vision Computing 2021
(arXiv 2108.06681). Defaults follow the authors' code (github.com/shaoeric/multi-granularity-distillation,
``wrapper.py``, ``train_teacher_wrapper.py``, ``student.py``, ``student_stable.py``) and the scripts
that produced their tables (``scripts/cifar100_*.sh``): tube widths 64 and 256, temperatures 2 and 8,
``T = 4``, ``w_div = 1`` (the code's argument default is 0; every "MAG/MAS + X" script passes 1, except
``+KD``, which passes 0.8 with cross-entropy weight 0.2), batch-mean KLs. Where we differ:

- The authors train the two teacher tubes in two passes over the data per epoch with two optimisers;
  we sum the two objectives in one step with one optimiser: the tubes share no parameter and SGD
  updates each parameter on its own, so the only change is that both tubes see the same batches. We
  keep the last tubes rather than those of the best test epoch.
- ``student.py`` names its two code KLs the other way round (``dk_encoder_loss`` holds the 64-d
  code's, at ``low_T = 2``); the pairing of code width and temperature is the one above.
- The student's tubes have no decoder: the authors build one but never use it (it gets no gradient).
- Rows without a label (target ``-1``, the transfer images of the data-efficient setting): the tube
  cross-entropy averages over the labelled rows only (0 when there are none); every KL reads all rows.
- The teacher's tubes run without gradient during distillation (the authors leave them out of the
  student's optimiser).

Shapes:
    logits ``[B, C]``, pooled embeddings ``[B, F_s]`` / ``[B, F_t]``, labels ``[B]`` -> scalar.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from relkd.graphs import ops
from relkd.losses.base import DistillLoss
from relkd.losses.kd import kd
from relkd.losses.registry import register

__all__ = ["MGDLoss", "Tube", "Tubes", "mgd", "mgd_pretrain", "stable_target"]
FUNCTIONAL = ("mgd", "mgd_pretrain", "stable_target")


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class Tube(nn.Module):
    """An encoder ``dim -> dim -> code_dim`` and, with ``num_classes``, a decoder
    ``code_dim -> dim -> num_classes`` (linear, ReLU, linear each).

    Runs in the weights' dtype outside autocast, like the KLs that read it.

    Shapes:
        ``encode``: ``[B, dim]`` (or ``[B, ...]`` with ``dim`` values per sample) -> ``[B, code_dim]``;
        ``decode``: ``[B, code_dim]`` -> ``[B, num_classes]``.
    """

    def __init__(self, dim: int, code_dim: int, num_classes: int | None = None) -> None:
        super().__init__()
        self.encoder = _mlp(dim, dim, code_dim)
        self.decoder = None if num_classes is None else _mlp(code_dim, dim, num_classes)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        dim = self.encoder[0].in_features
        if x.shape[1] != dim:
            raise ValueError(
                f"expected features with {dim} values per sample, got {x.shape[1]}; pass the width of "
                "the tapped feature as student_dim / teacher_dim"
            )
        with ops.full_precision(x.device):
            return self.encoder(x.to(self.encoder[0].weight.dtype))

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise RuntimeError("this tube was built without a decoder (num_classes=None)")
        with ops.full_precision(code.device):
            return self.decoder(code)


class Tubes(nn.Module):
    """A network's two tubes: ``high`` (high pressure, ``high_dim = 64``) and ``low`` (low
    pressure, ``low_dim = 256``)."""

    def __init__(
        self, dim: int, high_dim: int = 64, low_dim: int = 256, num_classes: int | None = None
    ) -> None:
        super().__init__()
        self.high = Tube(dim, high_dim, num_classes)
        self.low = Tube(dim, low_dim, num_classes)


def stable_target(
    teacher_logits: torch.Tensor, high_decoded: torch.Tensor, low_decoded: torch.Tensor
) -> torch.Tensor:
    """MAS's stable excitation: the mean of the teacher's logits and its two tubes' decoded logits.

    Shapes:
        three ``[B, C]`` -> ``[B, C]``.
    """
    if not teacher_logits.shape == high_decoded.shape == low_decoded.shape:
        raise ValueError(
            "stable_target: expected three logit tensors of one shape [B, C], got "
            f"{tuple(teacher_logits.shape)}, {tuple(high_decoded.shape)} and {tuple(low_decoded.shape)}"
        )
    return (teacher_logits + high_decoded + low_decoded) / 3.0


def mgd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_codes: Sequence[torch.Tensor],
    teacher_codes: Sequence[torch.Tensor],
    T: float = 4.0,
    temperatures: Sequence[float] = (2.0, 8.0),
    div_weight: float = 1.0,
) -> torch.Tensor:
    """MGD's student loss (module docstring): ``div_weight * KL_T(teacher_logits || student_logits)``
    plus ``KL_tau`` between each pair of tube codes, ``tau`` from ``temperatures``.

    ``teacher_logits`` is the distillation target: the teacher's logits, or :func:`stable_target`.

    Shapes:
        logits ``[B, C]``; codes: one ``[B, d_k]`` per tube and network -> scalar.
    """
    if not len(student_codes) == len(teacher_codes) == len(temperatures):
        raise ValueError(
            f"mgd: expected one student code, teacher code and temperature per tube, got "
            f"{len(student_codes)}, {len(teacher_codes)} and {len(temperatures)}"
        )
    loss = div_weight * kd(student_logits, teacher_logits, T=T)
    for s, t, tau in zip(student_codes, teacher_codes, temperatures, strict=True):
        loss = loss + kd(s, t, T=tau)
    return loss


def _labelled_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the rows with ``target >= 0``; 0 when there are none."""
    with ops.full_precision(logits.device):
        total = F.cross_entropy(
            logits.to(ops.compute_dtype(logits.dtype)), target, ignore_index=-1, reduction="sum"
        )
    return total / (target >= 0).sum().clamp_min(1)


def mgd_pretrain(
    teacher_logits: torch.Tensor,
    decoded: Sequence[torch.Tensor],
    target: torch.Tensor,
    temperatures: Sequence[float] = (2.0, 8.0),
) -> torch.Tensor:
    """The teacher tubes' objective: for each tube, ``CE(decoded, target) + KL_tau(teacher_logits ||
    decoded)``, summed over the tubes; rows with target ``-1`` are left out of the cross-entropy.

    Shapes:
        teacher_logits ``[B, C]``, decoded: one ``[B, C]`` per tube, target ``[B]`` -> scalar.
    """
    if len(decoded) != len(temperatures):
        raise ValueError(
            f"mgd_pretrain: expected one temperature per tube, got {len(decoded)} tubes and "
            f"{len(temperatures)} temperatures"
        )
    if target.shape != teacher_logits.shape[:1]:
        raise ValueError(
            f"mgd_pretrain: expected target [B] for B = {teacher_logits.shape[0]}, got shape "
            f"{tuple(target.shape)}"
        )
    loss = teacher_logits.new_zeros((), dtype=ops.compute_dtype(teacher_logits.dtype))
    for out, tau in zip(decoded, temperatures, strict=True):
        loss = loss + _labelled_ce(out, target.long()) + kd(out, teacher_logits.detach(), T=tau)
    return loss


@register("mgd")
class MGDLoss(DistillLoss):
    """Module form of :func:`mgd`: owns both networks' tubes and the teacher tubes' training.

    Trained in two stages (``pretrain = True``):

    1. The teacher's tubes alone, the teacher frozen and in eval mode (the authors: 60 epochs, SGD
       momentum 0.9, lr 0.01, weight decay 5e-4, lr x0.1 at epochs 30 and 45)::

           loss.pretrain_step(teacher_feats, batch).backward()   # optimise loss.teacher_tubes

    2. ``loss.freeze_heads()`` (the teacher's tubes stop requiring gradients), then distil with
       ``loss.distill(student_feats, teacher_feats, batch)``; the student's encoders train with the
       student. Add the base loss (e.g. AT) as another term.

    Distilling before ``freeze_heads()`` freezes the teacher's tubes on the spot, with a warning.

    Args:
        student_dim, teacher_dim: widths of the pooled embeddings (the engine fills them in).
        num_classes: the decoders' output width; None takes the width of the teacher's last tap
            (its logits) from ``teacher_channels``, which the engine fills in.
        T: temperature of the logit KL; div_weight: its weight.
        high_dim, low_dim: code widths of the two tubes; high_T, low_T: their temperatures.
        stable: distil the stable excitation (MAS) instead of the teacher's logits (MAG).

    Config::

        losses:
          at: {weight: 1000.0}
          mgd: {weight: 1.0, div_weight: 1.0}
    """

    taps = ("penultimate", "logits")
    pretrain: ClassVar[bool] = True

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        num_classes: int | None = None,
        teacher_channels: Sequence[int] | None = None,
        T: float = 4.0,
        div_weight: float = 1.0,
        high_dim: int = 64,
        low_dim: int = 256,
        high_T: float = 2.0,
        low_T: float = 8.0,
        stable: bool = False,
    ) -> None:
        super().__init__()
        if num_classes is None:
            if not teacher_channels:
                raise ValueError("mgd: give num_classes (the width of the logits) for the teacher's decoders")
            num_classes = int(teacher_channels[-1])
        for name, value in (("T", T), ("high_T", high_T), ("low_T", low_T)):
            if value <= 0:
                raise ValueError(f"mgd: {name} must be positive, got {value}")
        self.T, self.div_weight, self.stable = T, div_weight, stable
        self.temperatures = (high_T, low_T)
        self.num_classes = num_classes
        self.student_tubes = Tubes(student_dim, high_dim, low_dim)
        self.teacher_tubes = Tubes(teacher_dim, high_dim, low_dim, num_classes)
        self._frozen = False

    @property
    def heads_frozen(self) -> bool:
        return self._frozen

    def freeze_heads(self) -> None:
        """End of the teacher tubes' training: they stop requiring gradients (the student's train on)."""
        self.teacher_tubes.requires_grad_(False)
        self._frozen = True

    def _teacher_pass(
        self, feat: torch.Tensor, decode: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tubes = (self.teacher_tubes.high, self.teacher_tubes.low)
        codes = [tube.encode(feat.detach()) for tube in tubes]
        decoded = [tube.decode(c) for tube, c in zip(tubes, codes, strict=True)] if decode else []
        return codes, decoded

    def pretrain_step(
        self, teacher: Mapping[str, Any], batch: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """:func:`mgd_pretrain` on the teacher's tapped features (``{tap: tensor}``, like
        ``distill``) and ``batch["target"]``."""
        if self._frozen:
            raise RuntimeError("mgd: the teacher's tubes are frozen; pretrain before calling freeze_heads()")
        if batch is None or "target" not in batch:
            raise KeyError(
                "mgd: the tubes' training needs the labels as batch['target'] (-1 for unlabelled rows)"
            )
        feat, logits = self.taps
        _, decoded = self._teacher_pass(teacher[feat], decode=True)
        return mgd_pretrain(teacher[logits].detach(), decoded, batch["target"], self.temperatures)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_feat: torch.Tensor,
        teacher_feat: torch.Tensor,
    ) -> torch.Tensor:
        """The loss from the logits ``[B, C]`` and the pooled embeddings ``[B, F]`` (before the tubes)."""
        if not self._frozen:
            # once per loss: it freezes itself right after
            warnings.warn(
                "mgd: distilling through teacher tubes that were not frozen; freezing them now. Run "
                "pretrain_step on the teacher, then freeze_heads(), before distilling",
                stacklevel=2,
            )
            self.freeze_heads()
        if student_feat.shape[0] != teacher_feat.shape[0]:
            raise ValueError(
                "mgd: expected student and teacher with the same batch size, got "
                f"{student_feat.shape[0]} and {teacher_feat.shape[0]}"
            )
        student_codes = [
            self.student_tubes.high.encode(student_feat),
            self.student_tubes.low.encode(student_feat),
        ]
        with torch.no_grad():
            teacher_codes, decoded = self._teacher_pass(teacher_feat, decode=self.stable)
            target = (
                stable_target(teacher_logits.detach(), *decoded) if self.stable else teacher_logits.detach()
            )
        return mgd(
            student_logits, target, student_codes, teacher_codes, self.T, self.temperatures, self.div_weight
        )

    def distill(
        self,
        student: Mapping[str, Any],
        teacher: Mapping[str, Any],
        batch: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        feat, logits = self.taps
        return self(student[logits], teacher[logits], student[feat], teacher[feat])

    def get_extra_state(self) -> dict[str, bool]:
        return {"heads_frozen": self._frozen}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        if state.get("heads_frozen", False):
            self.freeze_heads()

    def extra_repr(self) -> str:
        high, low = self.temperatures
        return (
            f"T={self.T}, div_weight={self.div_weight}, high_T={high}, low_T={low}, stable={self.stable}, "
            f"num_classes={self.num_classes}, heads_frozen={self._frozen}"
        )
