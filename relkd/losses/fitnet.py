r"""FitNet hints: regress a student layer onto a teacher layer with a trainable regressor.

.. math::
    \mathcal{L}_{hint} = \frac{1}{N} \big\lVert r(v_s) - u_t \big\rVert_2^2

with :math:`v_s` the student's guided layer, :math:`u_t` the teacher's hint layer (a constant) and
:math:`N` the number of entries of :math:`u_t` over the batch.

Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015. We follow RepDistiller (Tian et al.,
ICLR 2020; ``distiller_zoo/FitNet.py`` ``HintLoss``, ``models/util.py`` ``ConvReg``), whose numbers the
CIFAR-100 benchmark reports:

- The loss is ``nn.MSELoss()``, the mean over every entry; the paper writes
  :math:`\frac{1}{2} \lVert u_h - r(v_g) \rVert^2`, half the sum. RepDistiller weighs it by 100 with the
  cross-entropy at 1 and no logit KD (``-a 0 -b 100``), in one stage; the paper's two stages are a
  method recipe (``fitnet_2stage``), not the loss's business.
- The hint is RepDistiller's ``feat[2]`` (``--hint_layer 2``), the output of the second residual stage of
  the CIFAR ResNets and WRNs: the zoo models' tap ``stage2``, the default ``taps``.
- The regressor maps the student's map ``[C_s, H_s, W_s]`` to the teacher's ``[C_t, H_t, W_t]`` with,
  in this order: a 3x3 convolution of stride 2 (padding 1) when ``H_s = 2 H_t``, a 4x4 transposed
  convolution of stride 2 (padding 1) when ``2 H_s = H_t``, else a convolution of kernel
  ``(1 + H_s - H_t, 1 + W_s - W_t)`` when the student's map is at least as large; then batch norm and
  ReLU. RepDistiller tests the first two cases on ``H`` alone (its maps are square); we require the
  ratio in both dimensions. For vectors ``[D_s] -> [D_t]`` (e.g. ``penultimate``) it is a linear layer
  and ReLU (RepDistiller's ``Regress``). ``relu=False`` drops the ReLU (``ConvReg(use_relu=False)``).
- ``regressor="none"`` compares the features as they are (same shapes), e.g. for stagewise training
  of a student whose stages have the teacher's shapes.

The regressor is built in the constructor, so the optimiser sees its parameters from the first step.
It needs the per-sample shapes of the two taps: pass ``student_shape`` and ``teacher_shape``
(``[C, H, W]`` or ``[D]``), or let them be read from ``student_channels`` / ``teacher_channels`` and
``student_dim`` / ``teacher_dim``, which the experiment engine fills in from a probe batch; that
reading assumes square maps (``H = W``) and says so when ``dim / channels`` is not a square.

Shapes:
    student ``[B, C_s, H_s, W_s]`` or ``[B, D_s]``, teacher ``[B, C_t, H_t, W_t]`` or ``[B, D_t]`` ->
    scalar.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from relkd._debug import check_finite
from relkd.graphs.ops import compute_dtype, full_precision
from relkd.losses.base import DistillLoss
from relkd.losses.registry import register

__all__ = ["hint", "HintRegressor", "FitNetLoss"]
FUNCTIONAL = ("hint",)

_REGRESSORS = ("auto", "none")


def hint(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the (regressed) student features and the teacher's, which must
    have the same shape; the teacher is a constant."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"fitnet: expected student and teacher features of the same shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    check_finite("fitnet", "student input", student)
    check_finite("fitnet", "teacher input", teacher)
    dtype = compute_dtype(student.dtype)
    with full_precision(student.device):
        loss = F.mse_loss(student.to(dtype), teacher.detach().to(dtype))
    check_finite("fitnet", "loss", loss)
    return loss


class HintRegressor(nn.Module):
    """RepDistiller's regressor from a student shape to a teacher shape (see the module docstring).

    Args:
        student_shape, teacher_shape: per-sample shapes, ``(C, H, W)`` or ``(D,)``, both of one kind.
        relu: end with a ReLU.

    Raises:
        ValueError: shapes of different kinds, or a student map smaller than the teacher's without the
            exact ratio 1/2.

    Shapes:
        ``[B, *student_shape]`` -> ``[B, *teacher_shape]``.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], relu: bool = True) -> None:
        super().__init__()
        s, t = tuple(int(x) for x in student_shape), tuple(int(x) for x in teacher_shape)
        self.student_shape, self.teacher_shape = s, t
        if len(s) == len(t) == 1:
            self.map: nn.Module = nn.Linear(s[0], t[0])
            self.norm: nn.Module = nn.Identity()
        elif len(s) == len(t) == 3:
            (cs, hs, ws), (ct, ht, wt) = s, t
            if (hs, ws) == (2 * ht, 2 * wt):
                self.map = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
            elif (2 * hs, 2 * ws) == (ht, wt):
                self.map = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
            elif hs >= ht and ws >= wt:
                self.map = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
            else:
                raise ValueError(
                    f"fitnet: no regressor maps a student map of {hs}x{ws} to a teacher map of {ht}x{wt}: "
                    "the student's must be twice, half, or at least the teacher's size in both dimensions"
                )
            self.norm = nn.BatchNorm2d(ct)
        else:
            raise ValueError(
                f"fitnet: expected student and teacher shapes both (C, H, W) or both (D,), got {s} and {t}"
            )
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.student_shape:
            raise ValueError(
                f"fitnet: the regressor was built for student features of shape {self.student_shape} per "
                f"sample, got {tuple(x.shape)}; pass student_shape and teacher_shape"
            )
        return self.relu(self.norm(self.map(x.to(self.map.weight.dtype))))


def _shape(
    side: str, shape: Sequence[int] | None, channels: int | Sequence[int] | None, dim: int | None
) -> tuple[int, ...] | None:
    """The per-sample shape given, or read from ``channels`` and ``dim`` assuming a square map."""
    if shape is not None:
        return tuple(int(x) for x in shape)
    if channels is None or dim is None:
        return None
    if not isinstance(channels, int):
        if len(channels) != 1:
            raise ValueError(f"fitnet: reads one tap, got {side}_channels for {len(channels)} taps")
        channels = channels[0]
    area, rest = divmod(int(dim), int(channels))
    side_len = math.isqrt(area)
    if rest or side_len * side_len != area:
        raise ValueError(
            f"fitnet: cannot read a square map from {side}_dim={dim} and {side}_channels={channels}; "
            f"pass {side}_shape: [C, H, W]"
        )
    return (int(channels),) if area == 1 else (int(channels), side_len, side_len)


@register("fitnet")
class FitNetLoss(DistillLoss):
    """Module form of :func:`hint` after a trainable :class:`HintRegressor` (``loss.fitnet.regressor``).

    Args:
        student_shape, teacher_shape: per-sample shapes of the two taps (see the module docstring);
            read from the channels and dims below when not given.
        student_channels, teacher_channels, student_dim, teacher_dim: filled in by the engine.
        regressor: ``"auto"`` (the regressor the shapes call for) or ``"none"`` (identity).
        relu: end the regressor with a ReLU.

    Config (RepDistiller's CIFAR-100 weight)::

        losses:
          fitnet: {weight: 100.0}
    """

    taps = ("stage2",)

    def __init__(
        self,
        student_shape: Sequence[int] | None = None,
        teacher_shape: Sequence[int] | None = None,
        student_channels: int | Sequence[int] | None = None,
        teacher_channels: int | Sequence[int] | None = None,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        regressor: str = "auto",
        relu: bool = True,
    ) -> None:
        super().__init__()
        if regressor not in _REGRESSORS:
            raise ValueError(f"fitnet: regressor must be one of {_REGRESSORS}, got {regressor!r}")
        self.kind = regressor
        if regressor == "none":
            self.regressor: nn.Module = nn.Identity()
            return
        s = _shape("student", student_shape, student_channels, student_dim)
        t = _shape("teacher", teacher_shape, teacher_channels, teacher_dim)
        if s is None or t is None:
            raise ValueError(
                "fitnet: the regressor needs the shapes of both taps: pass student_shape and "
                "teacher_shape, or student_channels/teacher_channels with student_dim/teacher_dim "
                "(the experiment engine fills these in), or use regressor='none'"
            )
        self.regressor = HintRegressor(s, t, relu=relu)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.dim() < 2 or teacher.dim() < 2:
            raise ValueError(
                f"fitnet: expected features [B, ...], got student {tuple(student.shape)} and teacher "
                f"{tuple(teacher.shape)}"
            )
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(
                f"fitnet: expected student and teacher with the same batch size, got {student.shape[0]} "
                f"and {teacher.shape[0]}"
            )
        if isinstance(self.regressor, HintRegressor):
            if len(self.regressor.student_shape) == 1:
                # A [B, C, 1, 1] map read through channels/dim is regressed as the vector it is.
                student, teacher = student.flatten(1), teacher.flatten(1)
            with full_precision(student.device):
                student = self.regressor(student)
            if student.shape != teacher.shape:
                raise ValueError(
                    f"fitnet: the regressor maps the student to {tuple(student.shape)} but the teacher is "
                    f"{tuple(teacher.shape)}; pass teacher_shape (and student_shape) explicitly"
                )
        return hint(student, teacher)

    def extra_repr(self) -> str:
        return f"regressor={self.kind!r}"
