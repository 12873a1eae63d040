"""A data set from arrays or tensors in memory: one's own data in a few lines.

>>> import relkd.data as data
>>> @data.register("mnist5k")
... def mnist5k(root=None, augment=True):
...     (x_train, y_train), (x_test, y_test) = my_loader()          # numpy or torch, uint8 or float
...     return data.from_arrays("mnist5k", (x_train, y_train), (x_test, y_test), augment=augment)

Then ``relkd run "imports=[my_module]" data.name=mnist5k ...`` trains on it (see :mod:`relkd.plugins`).
The bundle is held in memory and augmented on the training device in batches, like the built-in
digits and Fashion-MNIST sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from relkd.data.augment import AugmentSpec
from relkd.data.bundle import DataBundle
from relkd.data.tensor_dataset import in_memory_bundle

__all__ = ["from_arrays"]


def _images(x: Any, channels_last: bool | None, what: str) -> Tensor:
    x = torch.as_tensor(np.asarray(x)) if not isinstance(x, Tensor) else x
    if x.dim() == 3:  # [N, H, W]: one channel
        return x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(
            f"from_arrays: {what} images must be [N, H, W], [N, C, H, W] or [N, H, W, C], "
            f"got {tuple(x.shape)}"
        )
    if channels_last is None:
        channels_last = x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4)
    return x.permute(0, 3, 1, 2).contiguous() if channels_last else x


def _labels(y: Any, n: int, what: str) -> Tensor:
    y = torch.as_tensor(np.asarray(y)) if not isinstance(y, Tensor) else y
    if y.dim() != 1 or y.numel() != n:
        raise ValueError(
            f"from_arrays: expected {n} {what} labels (one per image), got shape {tuple(y.shape)}"
        )
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise ValueError(f"from_arrays: {what} labels must be class integers, got fractional values")
    return y.long()


def from_arrays(
    name: str,
    train: tuple[Any, Any],
    test: tuple[Any, Any],
    *,
    augment: bool = True,
    num_classes: int | None = None,
    channels_last: bool | None = None,
    max_value: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_padding: int = 0,
    flip: bool = False,
    classes: Sequence[str] = (),
) -> DataBundle:
    """A :class:`DataBundle` of in-memory images and labels.

    Args:
        name: the data set's name (in logs and tables).
        train, test: ``(images, labels)`` each; images ``[N, H, W]`` (one channel), ``[N, C, H, W]`` or
            ``[N, H, W, C]``, any numeric dtype (numpy arrays or tensors); labels ``[N]`` class integers.
        augment: loaders augment the training images by default (with the spec below).
        num_classes: default ``max label + 1``.
        channels_last: the images are ``[N, H, W, C]``; default guessed from the shape (1, 3 or 4
            channels).
        max_value: the pixel value that means white; default 255 for uint8 images, else 1 when every
            value is in [0, 1], else the largest value.
        mean, std: per-channel normalisation of pixels in [0, 1]; default computed from the training
            images.
        crop_padding: training augmentation: a random crop after zero padding of this many pixels
            (0: none).
        flip: training augmentation: a random horizontal flip (wrong for digits and text).
        classes: class names.

    Raises:
        ValueError: shapes or labels that do not fit, or NaN / infinite pixels (naming them).
    """
    x_train, x_test = _images(train[0], channels_last, "training"), _images(test[0], channels_last, "test")
    y_train = _labels(train[1], x_train.shape[0], "training")
    y_test = _labels(test[1], x_test.shape[0], "test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"from_arrays: training and test images differ in shape: {tuple(x_train.shape[1:])} and "
            f"{tuple(x_test.shape[1:])}"
        )
    if min(int(y_train.min()), int(y_test.min())) < 0:
        raise ValueError("from_arrays: labels must be >= 0 (unlabelled images are made by data.unlabeled)")
    k = int(max(int(y_train.max()), int(y_test.max()))) + 1
    if num_classes is None:
        num_classes = k
    elif num_classes < k:
        raise ValueError(f"from_arrays: a label is {k - 1} but num_classes is {num_classes}")
    if max_value is None:
        if x_train.dtype == torch.uint8:
            max_value = 255.0
        else:
            top = float(x_train.max()) if x_train.numel() else 1.0
            max_value = 1.0 if top <= 1.0 else top
    pixels = x_train.double() / max_value
    if not bool(torch.isfinite(pixels).all()):
        bad = (~torch.isfinite(pixels)).flatten(1).any(1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"from_arrays: training images {bad} hold NaN or infinite pixel values")
    c = x_train.shape[1]
    if mean is None:
        mean = pixels.mean(dim=(0, 2, 3)).tolist()
    if std is None:
        std = pixels.std(dim=(0, 2, 3), unbiased=False).clamp(min=1e-6).tolist()
    if len(mean) != c or len(std) != c:
        raise ValueError(f"from_arrays: give one mean and one std per channel ({c}), got {mean} and {std}")
    return in_memory_bundle(
        name,
        (x_train, y_train),
        (x_test, y_test),
        num_classes=num_classes,
        max_value=max_value,
        mean=tuple(mean),
        std=tuple(std),
        augment_spec=AugmentSpec(padding=crop_padding, flip=flip),
        augment=augment,
        classes=tuple(classes),
    )
