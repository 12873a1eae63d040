"""Batch transforms: what a step's networks are shown, made once per step before any network runs.

A transform maps the batch dict to a batch dict; the teachers and students of the default step then
all see the identical ``input`` (the seam for mixup, rotated views and other inputs a method makes).
Register one with ``@register_transform("name")`` on a factory that takes the config's options and
returns ``transform(batch, ctx) -> batch``; ``ctx`` is the step's :class:`relkd.methods.StepContext`
(epoch, step, stage ...). Its randomness must come from the global torch RNG (checkpointed), so that
resumed runs stay exact::

    train:
      batch_transform: {name: identity}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from relkd.registry import Registry

__all__ = ["BATCH_TRANSFORMS", "Batch", "Transform", "build_transform", "register_transform"]

Batch = dict[str, Tensor]
Transform = Callable[[Batch, Any], Batch]
BATCH_TRANSFORMS = Registry("batch transform")
register_transform = BATCH_TRANSFORMS.register


@register_transform("identity")
def identity() -> Transform:
    """The batch as it comes from the loader."""
    return lambda batch, ctx: batch


def build_transform(spec: Mapping[str, Any]) -> Transform:
    """The transform ``{name, **options}`` from :data:`BATCH_TRANSFORMS`."""
    return BATCH_TRANSFORMS.build(spec["name"], **{k: v for k, v in spec.items() if k != "name"})


@register_transform("rotate4")
def rotate4() -> Transform:
    """Every image as its four rotations by 0, 90, 180 and 270 degrees, image-major (SSKD, Xu et al.,
    ECCV 2020): the cross-entropy sees the unrotated labelled rows only, ``view_target`` keeps every
    row's source label (:func:`relkd.losses.sskd.rotation_batch`)."""
    from relkd.losses.sskd import rotation_batch

    return lambda batch, ctx: rotation_batch(batch)
