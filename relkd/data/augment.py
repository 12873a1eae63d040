"""Batched image augmentation on any device: random crop with zero padding, flip, normalise.

The random draws (crop offsets, flip decisions) come from a CPU ``torch.Generator`` and are then
moved to the images' device, so a seeded run augments identically on CPU and GPU. Crop padding is
applied to pixel values in [0, 1] *before* normalisation, i.e. the border is black, as with
torchvision's ``RandomCrop(size, padding)`` followed by ``Normalize``.

The loaders draw one epoch's augmentation for every item of the dataset at once
(:func:`draw_augment`) and apply each item's own draws wherever the item lands (:func:`apply_augment`):
an image is augmented the same way whichever batch, position or process it is drawn in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AugmentSpec", "apply_augment", "augment_batch", "crop", "draw_augment", "hflip", "normalize"]


@dataclass(frozen=True)
class AugmentSpec:
    """The standard training augmentation of an in-memory dataset.

    Args:
        padding: zero padding (pixels) on every side before a random crop back to the original size;
            ``0`` disables the crop.
        flip: flip each image horizontally with probability 1/2.
    """

    padding: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.padding < 0:
            raise ValueError(f"crop padding must be >= 0 pixels, got {self.padding}")

    @property
    def is_identity(self) -> bool:
        """True when the spec changes nothing (no crop, no flip)."""
        return self.padding == 0 and not self.flip


def crop(images: Tensor, padding: int, top: Tensor, left: Tensor) -> Tensor:
    """Zero-pad ``images`` by ``padding`` on every side, then cut each back to size at an offset.

    Args:
        images: ``[B, C, H, W]`` float images.
        padding: pixels of zero padding on each side.
        top, left: ``[B]`` integer offsets into the padded image, each in ``[0, 2 * padding]``;
            ``top = left = padding`` returns the images unchanged.

    Returns:
        ``[B, C, H, W]``: ``out[b] = pad(images[b])[:, top[b]:top[b]+H, left[b]:left[b]+W]``.
    """
    b, c, h, w = images.shape
    if padding == 0:
        return images
    padded = F.pad(images, (padding, padding, padding, padding))
    device = images.device
    rows = top.to(device)[:, None] + torch.arange(h, device=device)
    cols = left.to(device)[:, None] + torch.arange(w, device=device)
    return padded[
        torch.arange(b, device=device)[:, None, None, None],
        torch.arange(c, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def hflip(images: Tensor, mask: Tensor) -> Tensor:
    """Mirror left-right the images of a ``[B, C, H, W]`` batch where ``mask`` [B] is true."""
    mask = mask.to(images.device)[:, None, None, None]
    return torch.where(mask, images.flip(-1), images)


def draw_augment(spec: AugmentSpec, n: int, generator: torch.Generator) -> Tensor:
    """The random draws of ``n`` images under ``spec``, from ``generator``.

    Returns:
        ``[3, n]`` int64 on the CPU: crop offsets ``top`` and ``left`` (in ``[0, 2 padding]``; ``padding``
        when there is no crop) and the flip decision (0 or 1; 0 without flips).
    """
    draws = torch.zeros(3, n, dtype=torch.long)
    draws[:2] = spec.padding
    if spec.padding:
        draws[:2] = torch.randint(0, 2 * spec.padding + 1, (2, n), generator=generator)
    if spec.flip:
        draws[2] = (torch.rand(n, generator=generator) < 0.5).long()
    return draws


def apply_augment(images: Tensor, spec: AugmentSpec, draws: Tensor) -> Tensor:
    """Apply ``spec`` to a ``[B, C, H, W]`` float batch in [0, 1] with each image's ``[3, B]`` draws
    (:func:`draw_augment`'s, indexed by the batch's items)."""
    if spec.padding:
        images = crop(images, spec.padding, draws[0], draws[1])
    if spec.flip:
        images = hflip(images, draws[2].bool())
    return images


def augment_batch(images: Tensor, spec: AugmentSpec, generator: torch.Generator) -> Tensor:
    """Apply ``spec`` to a ``[B, C, H, W]`` float batch in [0, 1]; draws come from ``generator``."""
    return apply_augment(images, spec, draw_augment(spec, images.shape[0], generator))


def normalize(images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """``(images - mean) / std`` per channel; ``images`` is ``[B, C, H, W]`` with C == len(mean)."""
    shape = (1, -1, 1, 1)
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return (images - m) / s
