"""The sizes a loss's constructor asks for, measured on features instead of written by hand.

A loss declares what it needs by naming constructor arguments: ``student_dim`` / ``teacher_dim``
(values per sample of its first tap), ``student_channels`` / ``teacher_channels`` (``shape[1]`` of every
tap), ``student_shape`` / ``teacher_shape`` (the first tap's shape without the batch dimension),
``num_data`` (the training set's size), ``targets`` (its labels, ``-1`` where hidden) and
``num_classes``. :func:`measured_sizes` fills in those it asks for from a batch's features; the engine
and :func:`relkd.losses.build` with ``student=``, ``teacher=``, ``example=`` both use it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

__all__ = ["INJECTED", "measured_sizes"]

INJECTED = (
    "student_dim", "teacher_dim", "student_channels", "teacher_channels", "student_shape", "teacher_shape",
    "num_data", "targets", "num_classes",
)  # fmt: skip


def _sizes(features: Mapping[str, Tensor], taps: Sequence[str]) -> tuple[int, list[int], tuple[int, ...]]:
    missing = [t for t in taps if t not in features]
    if missing:
        raise KeyError(f"no features for the tap(s) {missing}; got {sorted(features)}")
    first = features[taps[0]]
    shape = tuple(int(s) for s in first.shape[1:])
    return math.prod(shape), [int(features[t].shape[1]) for t in taps], shape


def measured_sizes(
    cls: type,
    student_features: Mapping[str, Tensor],
    teacher_features: Mapping[str, Tensor] | None,
    student_taps: Sequence[str],
    teacher_taps: Sequence[str] | None = None,
    given: Mapping[str, Any] | None = None,
    **known: Any,
) -> dict[str, Any]:
    """The constructor arguments of ``cls`` among :data:`INJECTED` that ``given`` does not set.

    Args:
        cls: the loss class.
        student_features, teacher_features: ``{tap: [B, ...]}`` of one batch (teacher None for a loss
            without a teacher).
        student_taps, teacher_taps: the taps whose sizes are measured (teacher default: the student's).
        given: the options already chosen (never overridden).
        known: ``num_data``, ``targets``, ``num_classes`` when known.
    """
    s_dim, s_channels, s_shape = _sizes(student_features, student_taps)
    t_dim = t_channels = t_shape = None
    if teacher_features is not None:
        t_dim, t_channels, t_shape = _sizes(teacher_features, teacher_taps or student_taps)
    available = {
        "student_dim": s_dim,
        "teacher_dim": t_dim,
        "student_channels": s_channels,
        "teacher_channels": t_channels,
        "student_shape": s_shape,
        "teacher_shape": t_shape,
        **known,
    }
    params = inspect.signature(cls).parameters
    given = given or {}
    return {k: v for k, v in available.items() if k in params and k not in given and v is not None}
